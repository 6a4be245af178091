"""Advantages for GRPO-family training: group-relative (GRPO, Dr. GRPO, RLOO) and blockwise (BAE).

Pure functions of rewards: no model, no randomness, no state. Every function is jit- and
vmap-able; mode arguments are keyword-only Python values (strings, tuples, numbers), so pass them
with ``functools.partial`` or ``static_argnames`` under ``jax.jit``. Every output is wrapped in
``jax.lax.stop_gradient``: advantages are constants of the policy-gradient loss.

Degenerate inputs give exactly 0, never NaN: invalid samples, groups (or strata, or batches)
whose valid rewards are all equal (detected exactly, not through ``std == 0`` after rounding),
and groups with fewer valid samples than a statistic needs.

Hyper-parameters: ``eps`` and ``ocb_kappa`` may be Python numbers (checked >= 0 at trace time) or
traced float scalars (not range-checked; a new value does not recompile). ``std_ddof``, the modes
and ``baselines`` are static; a traced ``std_ddof`` is refused with a ``TypeError``.

NaN rewards are not checked (values are unknown at trace time) and are not hidden: a NaN (or
inf) reward of a *valid* sample makes NaN every advantage whose baseline or scale averages over
it, i.e. its whole group (``group_relative`` with ``scale="group"`` or ``"none"``; the whole
batch with ``scale="batch"``), and in ``blockwise`` that block's advantages of its group
(``"group_mean"``), its stratum (``"ocb"`` variants) or the batch (``"batch_mean"``), or its own
entry only (``"none"``); with ``std_normalize``, also every advantage divided by a std taken
over it. Other groups are unaffected. Mark samples
that could not be scored ``valid=False`` instead: rewards at invalid positions are ignored, NaN
included.

Layout (see AGENTS.md): rewards ``[P, G]`` (``[P, G, K]`` for blocks), token arrays ``[N, T]``
with row ``n = p * G + g``; ``flatten_groups`` turns ``[P, G, ...]`` into ``[N, ...]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxgrpo.core import modes
from jaxgrpo.core.masked import (
    masked_all_equal,
    masked_count,
    masked_mean_std,
    masked_sum,
    safe_div,
)

GROUP_BASELINES = modes.GROUP_BASELINES
GROUP_SCALES = modes.GROUP_SCALES
BLOCK_BASELINES = tuple(modes.BLOCK_BASELINES)
OCB_BASELINES = tuple(n for n, b in modes.BLOCK_BASELINES.items() if b.outcome_conditioned)
# Weight of the group mean in "ocb_shrink", in pseudo-samples: lam = n / (n + kappa).
DEFAULT_OCB_KAPPA = 1.0

_INTS = (int, np.integer)
_REALS = (int, float, np.integer, np.floating)


# --------------------------------------------------------------------------------------------
# Validation (trace time, before compile)
# --------------------------------------------------------------------------------------------


def _check_choice(name: str, value, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _check_nonneg_number(name: str, value):
    """A Python number >= 0 (returned as float), or a traced scalar (returned unchecked)."""
    if isinstance(value, jax.core.Tracer):
        if value.shape != () or not jnp.issubdtype(value.dtype, jnp.floating):
            raise TypeError(f"{name} must be a float scalar, got a traced "
                            f"{value.dtype}{value.shape}")
        return value
    if isinstance(value, bool) or not isinstance(value, _REALS):
        raise TypeError(f"{name} must be a Python number, got {type(value).__name__}")
    if not (value >= 0 and value != float("inf")):
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return float(value)


def _check_ddof(value) -> int:
    if isinstance(value, jax.core.Tracer):
        raise TypeError("std_ddof must be a static Python int (0 or 1), not a traced value: it "
                        "decides which groups have a std (mark it static under jax.jit)")
    if isinstance(value, bool) or not isinstance(value, _INTS):
        raise TypeError(f"std_ddof must be a Python int (0 or 1), got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"std_ddof must be >= 0, got {value}")
    return int(value)


def _float_input(name: str, x, ndim: int, layout: str) -> jax.Array:
    x = jnp.asarray(x)
    chex.assert_type(x, float, custom_message=f"{name} must be a floating-point array {layout}: "
                     "cast it with .astype(jnp.float32)", exception_type=TypeError)
    chex.assert_rank(x, ndim, custom_message=f"{name} must be {layout}", exception_type=ValueError)
    # Float32 unless the caller already works in a wider type.
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _int_input(name: str, x, shape: tuple[int, ...], layout: str) -> jax.Array:
    x = jnp.asarray(x)
    if not (jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == jnp.bool_):
        raise TypeError(f"{name} must be an integer (or bool) array {layout}, got dtype {x.dtype}")
    if x.shape != shape:
        raise ValueError(f"{name} must have shape {shape} {layout}, got {x.shape}")
    return x


def _valid_input(valid, shape: tuple[int, ...]) -> jax.Array:
    if valid is None:
        return jnp.ones(shape, dtype=bool)
    valid = jnp.asarray(valid)
    if valid.dtype != jnp.bool_:
        raise TypeError(f"valid must be a bool array [P, G], got dtype {valid.dtype}")
    if valid.shape != shape:
        raise ValueError(
            f"valid must have shape [P, G] = {shape} to match rewards, got {valid.shape}"
        )
    return valid


def _check_baselines(baselines, num_blocks: int) -> tuple[str, ...]:
    if isinstance(baselines, str) or not isinstance(baselines, Sequence):
        raise TypeError(
            "baselines must be a sequence (tuple) of K baseline names, one per block, e.g. "
            f"('group_mean', 'ocb'); got {baselines!r}"
        )
    baselines = tuple(baselines)
    if len(baselines) != num_blocks:
        raise ValueError(
            f"baselines must name one baseline per block: rewards has K={num_blocks} blocks, "
            f"baselines has {len(baselines)} entries {baselines!r}"
        )
    for k, name in enumerate(baselines):
        _check_choice(f"baselines[{k}]", name, BLOCK_BASELINES)
    return baselines


# --------------------------------------------------------------------------------------------
# Group-relative advantages
# --------------------------------------------------------------------------------------------


def group_relative(
    rewards: jax.Array,
    valid: jax.Array | None = None,
    *,
    baseline: str = "mean",
    scale: str = "group",
    std_ddof: int = 0,
    eps: float = 1e-6,
) -> jax.Array:
    r"""Group-relative advantages: GRPO, Dr. GRPO, RLOO and the peers' conventions.

    For prompt p and completion g, over the valid samples V_p of group p (n_p = |V_p|):

        A[p, g] = (r[p, g] - b[p, g]) / (s + eps)

    * ``baseline="mean"``: b = (1/n_p) sum_{j in V_p} r[p, j]  (own reward included).
    * ``baseline="leave_one_out"``: b = (1/(n_p - 1)) sum_{j in V_p, j != g} r[p, j]  (RLOO).
    * ``scale="group"``: s = std of r[p, V_p] with ``std_ddof`` (GRPO's z-score).
    * ``scale="batch"``: s = std of all valid rewards of the batch with ``std_ddof``, taken about
      the batch mean of the raw rewards, while the numerator stays centred on the *group*
      baseline. This is TRL's ``scale_rewards="batch"``: it centres with the per-group mean and
      divides by ``rewards.std()`` over the whole (gathered) batch, not by the std of the
      group-centred residuals.
    * ``scale="none"``: s + eps is replaced by 1 (Dr. GRPO; ``std_ddof`` and ``eps`` unused).

    Exactly 0 is returned for invalid samples, for every sample of a group whose valid rewards are
    all equal (detected exactly, so float rounding in ``r - mean`` never leaks through), for
    groups with fewer valid samples than the baseline or the std needs (n_p < 2 for
    leave-one-out; n_p <= std_ddof when scaled by the group std), and for the whole batch when
    ``scale="batch"`` and the batch has at most ``std_ddof`` valid rewards. Rewards at invalid
    positions are ignored even if NaN.

    Which arguments reproduce whom (for groups with at least two distinct valid rewards):

    ============  ==============================================================  ================
    convention    arguments                                                       source
    ============  ==============================================================  ================
    GRPO paper    ``scale="group", std_ddof=0`` (eps not stated)                  Shao et al. 2024
    Tunix         ``scale="group", std_ddof=1, eps=1e-6``                         algo_core grpo
    verl          ``scale="group", std_ddof=1, eps=1e-6``                         core_algos grpo
    TRL           ``scale="group" | "batch", std_ddof=1, eps=1e-4``               GRPOTrainer
    EasyDeL       ``scale="group", std_ddof=0, eps=1e-4``                         grpo_trainer
    Dr. GRPO      ``scale="none"``                                                Liu et al. 2025
    RLOO          ``baseline="leave_one_out", scale="none"``                      Ahmadian 2024
    ============  ==============================================================  ================

    Where the peers differ on degenerate groups we give 0: verl gives a singleton group r / (1 +
    eps) (mean 0, std 1), Tunix and TRL would divide rounding error by eps for an all-equal group.

    Args:
      rewards: float ``[P, G]``, one scalar reward per completion.
      valid: optional bool ``[P, G]``; False marks padding or unscorable samples. None = all valid.
      baseline: ``"mean"`` or ``"leave_one_out"``.
      scale: ``"group"``, ``"batch"`` or ``"none"``.
      std_ddof: delta degrees of freedom of the std (0 population, 1 Bessel).
      eps: added to the std before dividing.

    Returns:
      Float ``[P, G]`` advantages (float32 unless the input is wider), gradient-stopped.

    References:
      Shao et al., DeepSeekMath (GRPO), arXiv:2402.03300. Liu et al., Understanding R1-Zero-Like
      Training (Dr. GRPO), arXiv:2503.20783. Ahmadian et al., Back to Basics (RLOO),
      arXiv:2402.14740. Kool et al., Buy 4 REINFORCE Samples, Get a Baseline for Free!, 2019.
    """
    _check_choice("baseline", baseline, GROUP_BASELINES)
    _check_choice("scale", scale, GROUP_SCALES)
    std_ddof = _check_ddof(std_ddof)
    eps = _check_nonneg_number("eps", eps)
    r = _float_input("rewards", rewards, 2, "[P, G]")
    valid = _valid_input(valid, r.shape)

    r = jnp.where(valid, r, 0)
    n = masked_count(valid, axis=-1, keepdims=True, dtype=r.dtype)  # [P, 1]
    total = masked_sum(r, valid, axis=-1, keepdims=True)  # [P, 1]
    keep = valid & ~masked_all_equal(r, valid, axis=-1, keepdims=True)
    if baseline == "mean":
        b = safe_div(total, n)
    else:
        b = safe_div(total - r, n - 1)
        keep = keep & (n >= 2)
    adv = r - b

    if scale == "group":
        _, std, _ = masked_mean_std(r, valid, axis=-1, keepdims=True, ddof=std_ddof)
        keep = keep & (n > std_ddof)
        adv = safe_div(adv, std + eps)
    elif scale == "batch":
        _, std, n_batch = masked_mean_std(r, valid, axis=None, keepdims=True, ddof=std_ddof)
        keep = keep & (n_batch > std_ddof)
        adv = safe_div(adv, std + eps)
    return jax.lax.stop_gradient(jnp.where(keep, adv, 0))


# --------------------------------------------------------------------------------------------
# Blockwise advantages (BAE) with the Outcome-Conditioned Baseline
# --------------------------------------------------------------------------------------------


def _sqrt0(x: jax.Array) -> jax.Array:
    """``sqrt(x)`` with a finite gradient at 0; NaN stays NaN (not a zero spread)."""
    pos = x > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, 1)), jnp.where(jnp.isnan(x), x, 0))


def blockwise(
    rewards: jax.Array,
    outcomes: jax.Array | None = None,
    valid: jax.Array | None = None,
    *,
    baselines: Sequence[str],
    std_normalize: bool = False,
    ocb_kappa: float = DEFAULT_OCB_KAPPA,
    eps: float = 1e-6,
) -> jax.Array:
    r"""Blockwise Advantage Estimation: one advantage per completion and block.

    A completion is split into K contiguous blocks with their own rewards r[p, g, k]; block k's
    advantage is A[p, g, k] = r[p, g, k] - b[p, g, k] with the baseline named by
    ``baselines[k]`` (Pavlenko et al. 2026, §4.2-4.3, Alg. 1). Over valid samples only:

    * ``"none"``: b = 0 (raw reward).
    * ``"batch_mean"``: b = mean of r[:, :, k] over all valid samples of the batch.
    * ``"group_mean"``: b = mean of r[p, :, k] over the group (the paper's block-1 baseline).
    * ``"ocb"``: Outcome-Conditioned Baseline, b = mean of r[p, j, k] over the stratum
      S = {j valid : outcomes[p, j, k] == outcomes[p, g, k]}, own sample included as in the paper,
      so a singleton stratum gives A = 0 exactly.
    * ``"ocb_loo"`` (extension, not in the paper): leave-one-out within the stratum,
      b = mean over S minus {g}; a singleton stratum gives 0.
    * ``"ocb_shrink"`` (extension, not in the paper; the paper's §6.2 only suggests shrinkage):
      b = lam * mu_S + (1 - lam) * mu_group with lam = n_S / (n_S + ocb_kappa). ``ocb_kappa`` is
      the group mean's weight in pseudo-samples: 0 gives ``"ocb"``, infinity ``"group_mean"``.
      The default 1.0 is the weakest informative prior (one pseudo-sample): a singleton stratum
      gets half its deviation from the group mean instead of 0, a stratum of 8 keeps 8/9 of OCB.

    ``std_normalize`` (off in all the paper's experiments, "optional ... as in GRPO") divides by
    (sigma + eps), where sigma is the population std (ddof 0, as the paper's GRPO) over the same set
    the baseline averages: the batch, the group, or the stratum (per-stratum sigma, our reading of
    a recommended refinement, like Stratified GRPO). For ``"ocb_loo"`` it is the stratum
    std; for ``"ocb_shrink"`` sigma^2 = lam * sigma_S^2 + (1 - lam) * sigma_group^2; for
    ``"none"`` it is the root mean square of r over the batch (the spread about the baseline 0).

    Exactly 0 for invalid samples and wherever the set the baseline centres on has all-equal
    valid rewards (singleton strata included); for ``"ocb_shrink"`` the stratum part is zeroed
    that way and the whole advantage is 0 when the group's rewards are all equal.

    Args:
      rewards: float ``[P, G, K]`` per-block rewards.
      outcomes: integer or bool ``[P, G, K]`` discrete outcome of the prefix before block k (for
        the paper's confidence block, the correctness of the answer). Required if any baseline is
        an OCB variant; read only for those blocks. Any integer values work (no range needed).
      valid: optional bool ``[P, G]``; None = all valid.
      baselines: K baseline names, one per block (a tuple when passed as a static jit argument).
        The paper uses ``("group_mean", "ocb")``.
      std_normalize: divide by the std of the baseline's set, as described above.
      ocb_kappa: shrinkage strength of ``"ocb_shrink"`` (>= 0).
      eps: added to sigma when ``std_normalize``.

    Returns:
      Float ``[P, G, K]`` advantages, gradient-stopped. Memory for the OCB variants is
      O(P * G * G * K) (pairwise stratum membership), small for any practical group size.

    References:
      Pavlenko, Golubev, Karasik, Yangel, Blockwise Advantage Estimation for Multi-Objective RL
      with Verifiable Rewards, arXiv:2602.10231.
    """
    r = _float_input("rewards", rewards, 3, "[P, G, K]")
    num_blocks = r.shape[-1]
    baselines = _check_baselines(baselines, num_blocks)
    if not isinstance(std_normalize, bool):
        raise TypeError(f"std_normalize must be a Python bool, got {type(std_normalize).__name__}")
    ocb_kappa = _check_nonneg_number("ocb_kappa", ocb_kappa)
    eps = _check_nonneg_number("eps", eps)
    valid = _valid_input(valid, r.shape[:2])
    needs_outcomes = any(name in OCB_BASELINES for name in baselines)
    if needs_outcomes and outcomes is None:
        raise ValueError(
            "outcomes is required because baselines contains an OCB variant "
            f"({[b for b in baselines if b in OCB_BASELINES]}); pass int outcomes [P, G, K]"
        )
    if outcomes is not None:
        outcomes = _int_input("outcomes", outcomes, r.shape, "[P, G, K] matching rewards")

    valid_k = jnp.broadcast_to(valid[:, :, None], r.shape)  # [P, G, K]
    r = jnp.where(valid_k, r, 0)
    used = set(baselines)
    adv, sigma = {}, {}

    if "none" in used:
        adv["none"] = r
        n_b = masked_count(valid_k, axis=(0, 1), keepdims=True, dtype=r.dtype)
        sigma["none"] = _sqrt0(safe_div(masked_sum(jnp.square(r), valid_k, (0, 1), True), n_b))
    if "batch_mean" in used:
        mu_b, std_b, _ = masked_mean_std(r, valid_k, axis=(0, 1), keepdims=True)
        flat_b = masked_all_equal(r, valid_k, axis=(0, 1), keepdims=True)
        adv["batch_mean"] = jnp.where(flat_b, 0, r - mu_b)
        sigma["batch_mean"] = std_b
    mu_g, std_g, _ = masked_mean_std(r, valid_k, axis=1, keepdims=True)  # [P, 1, K]
    flat_g = masked_all_equal(r, valid_k, axis=1, keepdims=True)
    if "group_mean" in used:
        adv["group_mean"] = jnp.where(flat_g, 0, r - mu_g)
        sigma["group_mean"] = std_g

    if needs_outcomes:
        # same[p, g, j, k]: sample j is valid and shares sample g's outcome in block k.
        same = (outcomes[:, :, None, :] == outcomes[:, None, :, :]) & valid[:, None, :, None]
        r_j = jnp.broadcast_to(r[:, None, :, :], same.shape)
        mu_s, std_s, n_s = masked_mean_std(r_j, same, axis=2)  # [P, G, K]
        flat_s = masked_all_equal(r_j, same, axis=2)
        d_s = jnp.where(flat_s, 0, r - mu_s)
        if "ocb" in used:
            adv["ocb"] = d_s
            sigma["ocb"] = std_s
        if "ocb_loo" in used:
            loo = safe_div(masked_sum(r_j, same, axis=2) - r, n_s - 1)
            adv["ocb_loo"] = jnp.where(flat_s | (n_s < 2), 0, r - loo)
            sigma["ocb_loo"] = std_s
        if "ocb_shrink" in used:
            lam = safe_div(n_s, n_s + ocb_kappa)
            shrunk = d_s + (1 - lam) * (mu_s - mu_g)
            adv["ocb_shrink"] = jnp.where(flat_g, 0, shrunk)
            sigma["ocb_shrink"] = _sqrt0(lam * jnp.square(std_s) + (1 - lam) * jnp.square(std_g))

    def block(k: int, name: str) -> jax.Array:
        a = adv[name][..., k]
        if std_normalize:
            s = jnp.broadcast_to(sigma[name], r.shape)[..., k]
            a = safe_div(a, s + eps)
        return a

    out = jnp.stack([block(k, name) for k, name in enumerate(baselines)], axis=-1)
    return jax.lax.stop_gradient(jnp.where(valid_k, out, 0))


# --------------------------------------------------------------------------------------------
# From sequences and blocks to tokens
# --------------------------------------------------------------------------------------------


def flatten_groups(x: jax.Array) -> jax.Array:
    """``[P, G, ...] -> [N, ...]`` with row ``n = p * G + g`` (the token arrays' layout)."""
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"x must have rank >= 2 ([P, G, ...]), got shape {x.shape}")
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _block_ids_input(name: str, block_ids, rows: int | None = None) -> jax.Array:
    block_ids = jnp.asarray(block_ids)
    if not jnp.issubdtype(block_ids.dtype, jnp.integer):
        raise TypeError(
            f"{name} must be an integer array [N, T] of block ids (-1 = no block), "
            f"got dtype {block_ids.dtype}"
        )
    if block_ids.ndim != 2 or (rows is not None and block_ids.shape[0] != rows):
        want = "[N, T]" if rows is None else f"[N={rows}, T]"
        raise ValueError(f"{name} must have shape {want}, got {block_ids.shape}")
    return block_ids


def _gather_blocks(per_block: jax.Array, block_ids: jax.Array) -> jax.Array:
    """``per_block[n, block_ids[n, t]]``, 0 where the id is outside ``0..K-1``."""
    num_blocks = per_block.shape[1]
    inside = (block_ids >= 0) & (block_ids < num_blocks)
    idx = jnp.clip(block_ids, 0, max(num_blocks - 1, 0))
    return jnp.where(inside, jnp.take_along_axis(per_block, idx, axis=1), 0)


def token_advantages(advantages: jax.Array, block_ids_or_mask: jax.Array) -> jax.Array:
    """Broadcast sequence- or block-level advantages onto tokens: ``[N, T]``.

    * ``advantages [N]`` (one per sequence) with a bool mask ``[N, T]``: A_tok[n, t] =
      advantages[n] where the mask is true, else 0. With int block ids instead, every token in
      some block (id >= 0) gets the sequence's advantage.
    * ``advantages [N, K]`` (from ``flatten_groups(blockwise(...))``) with int block ids ``[N, T]``:
      A_tok[n, t] = advantages[n, k] for the block k = block_ids[n, t] (BAE, Alg. 1 line 12:
      block k's advantage only on block k's tokens). Ids outside ``0..K-1`` (-1 for prompt,
      padding or unassigned text) give 0.

    Returns:
      Float ``[N, T]``, gradient-stopped.
    """
    adv = jnp.asarray(advantages)
    if not jnp.issubdtype(adv.dtype, jnp.floating):
        raise TypeError(f"advantages must be a floating-point array [N] or [N, K], got {adv.dtype}")
    tok = jnp.asarray(block_ids_or_mask)
    if adv.ndim == 1:
        if tok.ndim != 2 or tok.shape[0] != adv.shape[0]:
            raise ValueError(
                f"block_ids_or_mask must have shape [N={adv.shape[0]}, T], got {tok.shape}"
            )
        if tok.dtype == jnp.bool_:
            inside = tok
        elif jnp.issubdtype(tok.dtype, jnp.integer):
            inside = tok >= 0
        else:
            raise TypeError(
                f"block_ids_or_mask must be a bool mask or int block ids [N, T], got {tok.dtype}"
            )
        out = jnp.where(inside, adv[:, None], 0)
    elif adv.ndim == 2:
        if tok.dtype == jnp.bool_:
            raise TypeError(
                "block_ids_or_mask must be int block ids [N, T] for block advantages [N, K]: a "
                "bool mask cannot say which block a token belongs to"
            )
        tok = _block_ids_input("block_ids_or_mask", tok, rows=adv.shape[0])
        out = _gather_blocks(adv, tok)
    else:
        raise ValueError(f"advantages must have shape [N] or [N, K], got {adv.shape}")
    return jax.lax.stop_gradient(out)


def block_token_weights(
    block_ids: jax.Array, num_blocks: int, *, block_weights: jax.Array | None = None
) -> jax.Array:
    """Per-token weights of BAE's per-block token mean: ``[N, T]``.

    w[n, t] = w_k / |T_k(n)| for the block k = block_ids[n, t], where |T_k(n)| is the number of
    block k's tokens in sequence n, and 0 for tokens in no block (id -1 or outside 0..K-1). So
    sum_t w[n, t] * loss[n, t] = sum_k w_k * mean_{t in T_k(n)} loss[n, t]: a token mean within
    each block, summed over blocks (the paper's §4.2). An empty block (e.g. a completion truncated before
    its confidence block) has no tokens, so it contributes nothing and nothing divides by zero.
    The loss then averages over sequences (``policy_loss(..., token_weights=w, agg="block_mean")``).

    Args:
      block_ids: int ``[N, T]``, k in ``0..K-1`` for block k's tokens, -1 for none.
      num_blocks: K, a Python int.
      block_weights: optional float ``[K]`` weights w_k (the paper uses 1 for every block).

    Returns:
      Float32 ``[N, T]``.
    """
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, _INTS):
        raise TypeError(f"num_blocks must be a Python int, got {type(num_blocks).__name__}")
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    block_ids = _block_ids_input("block_ids", block_ids)
    if block_weights is None:
        w = jnp.ones((num_blocks,), jnp.float32)
    else:
        w = jnp.asarray(block_weights)
        if not jnp.issubdtype(w.dtype, jnp.floating):
            raise TypeError(f"block_weights must be a float array [K], got dtype {w.dtype}")
        if w.shape != (num_blocks,):
            raise ValueError(f"block_weights must have shape [K={num_blocks}], got {w.shape}")
        w = w.astype(jnp.promote_types(w.dtype, jnp.float32))
    onehot = block_ids[:, :, None] == jnp.arange(num_blocks)[None, None, :]  # [N, T, K]
    counts = jnp.sum(onehot, axis=1, dtype=w.dtype)  # [N, K]
    per_block = safe_div(jnp.broadcast_to(w[None, :], counts.shape), counts)
    return jax.lax.stop_gradient(_gather_blocks(per_block, block_ids))
