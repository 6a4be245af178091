"""Fidelity of BAE's compute-free baselines against Monte-Carlo advantages (BAE, arXiv 2602.10231 §5.1, Fig. 1).

For each prompt p, G sampled completions y = [X_sol; X_conf] have a confidence-block reward
``r[p, g]`` and a discrete outcome ``o[p, g]`` of the solution prefix (the answer's correctness).
From every fixed prefix ``(x, X_sol)`` M further confidence blocks are sampled; their mean reward
``v[p, g]`` estimates the value ``E[r | x, X_sol]``. The Monte-Carlo advantage is

    A_MC[p, g] = r[p, g] - v[p, g],

and each proxy ``A_b[p, g] = r[p, g] - b[p, g]`` with a compute-free baseline b:

* ``none``: b = 0;
* ``batch_mean``: the mean of r over every valid sample of the study (all prompts);
* ``group_mean``: the mean of r over the prompt's valid samples;
* ``ocb``: the mean of r over the prompt's valid samples with the same outcome (own sample
  included, as in the paper);
* ``ocb_loo`` (extension): the same mean without the sample itself (b = r for a singleton, so
  its advantage is 0, as in :func:`jaxgrpo.core.advantages.blockwise`);
* ``ocb_shrink`` (extension): ``lam * mu_S + (1 - lam) * mu_group``, ``lam = n_S/(n_S + kappa)``.

The error is ``A_b - A_MC = v - b`` and the study reports, per baseline, the root mean square
and the mean ("bias") of that error over the valid samples of each outcome stratum (``correct``
is outcome 1, ``incorrect`` outcome 0) and over all of them. The MC estimate itself is noisy:
``mc_noise`` is ``sqrt(mean(s^2 / M))`` with ``s^2`` the unbiased variance of a prefix's M
continuation rewards, the RMSE that a perfect baseline would still show; an RMSE close to it
means the baseline is as good as M rollouts can tell.

NumPy only; the rollouts live in :mod:`jaxgrpo.train.fidelity`.
"""

from __future__ import annotations

import math

import numpy as np

from jaxgrpo.core import modes

BASELINES = tuple(modes.BLOCK_BASELINES)
STRATA = (("correct", 1), ("incorrect", 0), ("all", None))


def _as(name, x, ndim, dtype):
    a = np.asarray(x)
    if a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {a.shape}")
    return a.astype(dtype)


def proxy_baselines(rewards, outcomes, valid=None, *, kappa: float = 1.0) -> dict[str, np.ndarray]:
    """Each baseline ``b[P, G]`` (float64) of the module docstring; 0 at invalid samples.

    Args:
      rewards: float ``[P, G]`` confidence-block rewards.
      outcomes: int or bool ``[P, G]`` prefix outcomes (strata).
      valid: bool ``[P, G]`` (None: all valid).
      kappa: ``ocb_shrink`` strength (>= 0).
    """
    r = _as("rewards", rewards, 2, np.float64)
    o = _as("outcomes", outcomes, 2, np.int64)
    if o.shape != r.shape:
        raise ValueError(f"outcomes must have the shape of rewards {r.shape}, got {o.shape}")
    v = np.ones(r.shape, bool) if valid is None else _as("valid", valid, 2, bool)
    if v.shape != r.shape:
        raise ValueError(f"valid must have the shape of rewards {r.shape}, got {v.shape}")
    if not np.all(np.isfinite(r[v])):
        raise ValueError("rewards must be finite at valid samples")
    if not (isinstance(kappa, int | float) and math.isfinite(kappa) and kappa >= 0):
        raise ValueError(f"kappa must be a finite number >= 0, got {kappa!r}")
    rv = np.where(v, r, 0.0)
    n_g = v.sum(1, keepdims=True)
    mu_g = rv.sum(1, keepdims=True) / np.maximum(n_g, 1)
    mu_b = rv.sum() / max(int(v.sum()), 1)
    same = (o[:, :, None] == o[:, None, :]) & v[:, None, :]  # [P, G, G]: j shares g's outcome
    n_s = same.sum(2)
    sum_s = (same * rv[:, None, :]).sum(2)
    mu_s = sum_s / np.maximum(n_s, 1)
    loo = np.where(n_s > 1, (sum_s - rv) / np.maximum(n_s - 1, 1), rv)
    lam = n_s / (n_s + kappa) if kappa > 0 else np.ones_like(mu_s)
    out = {
        "none": np.zeros_like(r),
        "batch_mean": np.full(r.shape, mu_b),
        "group_mean": np.broadcast_to(mu_g, r.shape).copy(),
        "ocb": mu_s,
        "ocb_loo": loo,
        "ocb_shrink": lam * mu_s + (1 - lam) * mu_g,
    }
    return {k: np.where(v, b, 0.0) for k, b in out.items()}


def fidelity_table(rewards, outcomes, mc_values, valid=None, *, mc_var=None, num_mc=None,
                   kappa: float = 1.0) -> dict:
    """RMSE and bias of each proxy advantage against the MC advantage, split by outcome.

    Args:
      rewards, outcomes, valid, kappa: as for :func:`proxy_baselines`.
      mc_values: float ``[P, G]``, the mean confidence-block reward of the M continuations.
      mc_var: optional float ``[P, G]``, their unbiased (ddof 1) variance; with ``num_mc`` = M it
        gives the ``mc_noise`` row.
      num_mc: M.

    Returns:
      ``{stratum: {"n": count, "mc_noise": float or None, baseline: {"rmse", "bias"}}}`` for the
      strata ``correct``, ``incorrect`` and ``all``; NaN for an empty stratum.
    """
    base = proxy_baselines(rewards, outcomes, valid, kappa=kappa)
    r = _as("rewards", rewards, 2, np.float64)
    mc = _as("mc_values", mc_values, 2, np.float64)
    if mc.shape != r.shape:
        raise ValueError(f"mc_values must have the shape of rewards {r.shape}, got {mc.shape}")
    v = np.ones(r.shape, bool) if valid is None else np.asarray(valid, bool)
    if not np.all(np.isfinite(mc[v])):
        raise ValueError("mc_values must be finite at valid samples")
    noise = None
    if mc_var is not None:
        if not isinstance(num_mc, int) or num_mc < 2:
            raise ValueError(f"num_mc must be an int >= 2 when mc_var is given, got {num_mc!r}")
        noise = _as("mc_var", mc_var, 2, np.float64) / num_mc
    o = np.asarray(outcomes).astype(np.int64)
    out = {}
    for name, value in STRATA:
        sel = v if value is None else v & (o == value)
        n = int(sel.sum())
        row: dict = {"n": n}
        row["mc_noise"] = (None if noise is None else
                           (float(np.sqrt(noise[sel].mean())) if n else math.nan))
        for b_name, b in base.items():
            err = (mc - b)[sel]  # (r - b) - (r - mc)
            row[b_name] = ({"rmse": float(np.sqrt(np.mean(err**2))), "bias": float(err.mean())}
                           if n else {"rmse": math.nan, "bias": math.nan})
        out[name] = row
    return out


def format_table(table: dict, *, baselines=BASELINES) -> str:
    """A markdown table: one row per baseline, RMSE (bias) per stratum, then the MC noise."""
    names = [s for s, _ in STRATA]
    head = "| baseline | " + " | ".join(f"{s} (n={table[s]['n']}) RMSE (bias)" for s in names)
    lines = [head + " |", "|---|" + "---|" * len(names)]
    for b in baselines:
        cells = [f"{table[s][b]['rmse']:.4f} ({table[s][b]['bias']:+.4f})" for s in names]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    if all(table[s].get("mc_noise") is not None for s in names):
        lines.append("| MC noise floor | " +
                     " | ".join(f"{table[s]['mc_noise']:.4f}" for s in names) + " |")
    return "\n".join(lines)
