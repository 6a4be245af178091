"""Up-front memory check of a run's batch sizes, before anything is built, written or compiled.

:func:`estimate` adds up the largest arrays a run holds at once, from the config and the
model's dimensions alone (nothing allocated):

- **state**: parameters, Adam's two moments, gradients (and the KL reference parameters when
  ``loss.kl_coef > 0``), in ``model.param_dtype``;
- **rollout**: one sampler call of ``R`` rows (the prompts of one round, or
  ``rollout.max_prompts_per_call``, times ``rollout.group_size``; evaluation calls of
  ``tasks.eval_prompts x rollout.eval_samples`` rows alike): the KV cache
  ``R x L x 2 x Hkv x (Tp + max_new_tokens) x Dh`` in ``model.dtype`` and the float32 logits
  ``R x V`` (twice: logits and sampling probabilities);
- **train**: one micro-batch of ``P*G / (loss.minibatches * loss.micro_batches)`` rows of
  ``T = Tp + max_new_tokens`` tokens: one chunk of float32 logits, log-softmax and their
  gradient ``3 x max(256, rows) x V`` (log-probs are chunked) plus the activations kept for
  the backward pass (``rows x T x L x (12 D + 3 F)`` float32; with ``model.remat`` each
  block's input and one block's);
- **host**: the step's prompt pool on the host (every round's tokens, masks, log-probs and
  rewards, about 16 bytes a token per row, plus about 1 KB of Python records per prompt).

The peak is ``state + max(rollout, eval, train) + host``. On CPU (where every device shares
the host's RAM) it is compared with the RAM available now (``/proc/meminfo``'s MemAvailable,
``psutil`` if installed, or ``os.sysconf``), and a run that cannot fit is refused with one
line naming the keys and their values. The estimate is coarse (within a small factor): it
exists to refuse sizes that cannot run, not to plan ones that nearly do. On accelerators the
per-chip figures come from compiling the real programs (``jaxgrpo compile``), so nothing is
refused here.
"""

from __future__ import annotations

import dataclasses
import math
import os

from jaxgrpo.config import Algo, ConfigError, ExperimentConfig

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Bytes of each part (see the module docstring) and what sets the largest one."""

    state: float
    rollout: float
    eval: float
    train: float
    host: float
    rollout_rows: int
    train_rows: int

    @property
    def peak(self) -> float:
        return self.state + max(self.rollout, self.eval, self.train) + self.host


def _rows_per_round(cfg: ExperimentConfig) -> int:
    p, ds = cfg.tasks.prompts_per_step, cfg.algo.sampling
    if cfg.algo.name == Algo.GRPO and not ds.enabled:
        return p
    return math.ceil(ds.oversample * p - 1e-9)


def estimate(cfg: ExperimentConfig, mcfg) -> Estimate:
    """The byte estimate of ``cfg``'s run with the model ``mcfg`` (a ``ModelConfig``)."""
    rc, lc = cfg.rollout, cfg.loss
    act = _DTYPE_BYTES[str(cfg.model.dtype)]
    par = _DTYPE_BYTES[str(cfg.model.param_dtype)]
    n_par = float(mcfg.num_params)
    state = n_par * par * (4 + (1 if lc.kl_coef > 0 else 0))
    tp = max(rc.prompt_buckets)
    t = tp + rc.max_new_tokens
    L, V, D = mcfg.num_layers, mcfg.vocab_size, mcfg.hidden_size
    kv_row = L * 2 * mcfg.num_kv_heads * mcfg.head_dim * t * act

    def sampler(prompts: int, samples: int) -> tuple[float, int]:
        if rc.max_prompts_per_call is not None:
            prompts = min(prompts, rc.max_prompts_per_call)
        rows = prompts * samples
        return float(rows) * (kv_row + 2 * V * 4), rows

    round_prompts = _rows_per_round(cfg)
    rollout, r_rows = sampler(round_prompts, rc.group_size)
    ev, _ = sampler(cfg.tasks.eval_prompts, rc.eval_samples)
    n_rows = cfg.tasks.prompts_per_step * rc.group_size
    m_rows = max(n_rows // (lc.minibatches * lc.micro_batches), 1)
    # Log-probs are computed in chunks of about max(logprob_chunk, rows) logit rows
    # (jaxgrpo.core.logprobs.chunked_token_logprobs): logits, softmax and their gradient.
    from jaxgrpo.train.step import StepConfig

    logit_rows = max(StepConfig.logprob_chunk, m_rows)
    block = float(m_rows) * t * (12 * D + 3 * mcfg.intermediate_size) * 4  # one layer's
    kept = (float(m_rows) * t * D * act * L + block if str(cfg.model.remat) != "none"
            else block * L)  # remat keeps only each block's input
    train = 3.0 * logit_rows * V * 4 + kept
    rounds = 1 if cfg.algo.name == Algo.GRPO and not cfg.algo.sampling.enabled else (
        cfg.algo.sampling.max_rounds)
    host = float(round_prompts) * rounds * (rc.group_size * t * 16 + 1024)
    return Estimate(state, rollout, ev, train, host, r_rows, m_rows)


def available_bytes() -> tuple[float, str]:
    """``(bytes, where the figure comes from)`` of host RAM available now."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024, "available RAM"
    except OSError:
        pass
    try:
        import psutil

        return float(psutil.virtual_memory().available), "available RAM"
    except ImportError:
        pass
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")), "free RAM"
    except (ValueError, OSError, AttributeError):
        return math.inf, "unknown"


def _gb(x: float) -> str:
    return f"{x / 1e9:.3g} GB"


def check(cfg: ExperimentConfig, mcfg, *, devices=None) -> Estimate:
    """Refuses (:class:`jaxgrpo.config.ConfigError`, one line) a run whose estimate does not
    fit; returns the estimate otherwise. ``devices``: the run's devices (default all)."""
    import jax

    devs = list(jax.devices() if devices is None else devices)
    est = estimate(cfg, mcfg)
    if devs and devs[0].platform != "cpu":
        return est  # `jaxgrpo compile` gives the per-chip figures
    limit, where = available_bytes()
    need = est.peak
    if need <= limit:
        return est
    rc, lc = cfg.rollout, cfg.loss
    parts = {"the rollout": est.rollout, "the evaluation rollout": est.eval,
             "the train step": est.train, "the host's prompt pool": est.host,
             "the parameters and optimiser state": est.state}
    what = max(parts, key=parts.get)
    pg = (f"tasks.prompts_per_step={cfg.tasks.prompts_per_step} x "
          f"rollout.group_size={rc.group_size}")
    fix = {
        "the rollout": (f"{pg} ({est.rollout_rows} rows per sampler call): its KV cache and "
                        "logits", "lower them, or set rollout.max_prompts_per_call"),
        "the evaluation rollout": (
            f"tasks.eval_prompts={cfg.tasks.eval_prompts} x "
            f"rollout.eval_samples={rc.eval_samples}: the evaluation's KV cache and logits",
            "lower them, or set rollout.max_prompts_per_call"),
        "the train step": (f"{pg} / loss.minibatches={lc.minibatches} / loss.micro_batches="
                           f"{lc.micro_batches} ({est.train_rows} rows per micro-batch): the "
                           "train step's logits and activations",
                           "lower them, or raise loss.micro_batches"),
        "the host's prompt pool": (f"{pg}: the host's prompt pool", "lower them"),
        "the parameters and optimiser state": (
            f"the model ({mcfg.num_params / 1e6:.1f}M parameters, model.param_dtype="
            f"{cfg.model.param_dtype}): parameters and optimiser state",
            "use a smaller model or a machine with more memory"),
    }[what]
    raise ConfigError(f"{fix[0]} need about {_gb(parts[what])} (run peak about {_gb(need)}), "
                      f"more than the {_gb(limit)} of {where}: {fix[1]}")
