"""The training batch: what the jitted step consumes, and how it is built from a rollout.

Layout. A row ``n = p*G + g`` holds prompt ``p`` (left-padded to ``Tp``) followed by its ``g``-th
completion (right-padded to ``Tc``), so ``tokens`` is ``[N, T]`` with ``T = Tp + Tc``. The model
reads ``tokens[:, :-1]`` and predicts ``tokens[:, 1:]``; every per-token array below is therefore
``[N, T-1]`` and aligned with the *targets*: entry ``t`` concerns the token ``tokens[:, t+1]``.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainBatch:
    """One step's data. All fields are arrays; shapes use N rows and S = T-1 target positions."""

    tokens: jax.Array  # int32 [N, T]   prompt (left-padded) + completion (right-padded)
    attn_mask: jax.Array  # bool [N, T]  real tokens (padding is never attended)
    loss_mask: jax.Array  # bool [N, S]  targets that are completion tokens of a valid sample
    advantages: jax.Array  # float32 [N] or [N, S]
    old_logp: jax.Array  # float32 [N, S] sampler log-probs (used when the step does not recompute)
    token_weights: jax.Array  # float32 [N, S] (BAE block weights; ones otherwise)
    sequence_weights: jax.Array  # float32 [N]
    task_ids: jax.Array  # int32 [N]


def assemble(
    prompt_tokens: np.ndarray,
    prompt_mask: np.ndarray,
    completion_tokens: np.ndarray,
    completion_mask: np.ndarray,
    advantages: np.ndarray,
    *,
    old_logp: np.ndarray | None = None,
    valid: np.ndarray | None = None,
    task_ids: np.ndarray | None = None,
    token_weights: np.ndarray | None = None,
    sequence_weights: np.ndarray | None = None,
    pad_id: int = 0,
) -> TrainBatch:
    """Builds a host-side :class:`TrainBatch` from a rollout laid out ``[P, G, ...]``.

    Args:
      prompt_tokens: int ``[P, Tp]`` left-padded prompts; ``prompt_mask`` bool ``[P, Tp]``.
      completion_tokens: int ``[P, G, Tc]``; ``completion_mask`` bool ``[P, G, Tc]`` (tokens up to
        and including EOS).
      advantages: ``[P, G]`` (one per sample) or ``[P, G, Tc]`` (per completion token).
      old_logp: sampler log-probs ``[P, G, Tc]`` of the completion tokens, if known.
      valid: bool ``[P, G]``; invalid samples get no loss (they still occupy a row, so shapes
        stay static).
      task_ids: int ``[P]`` task index of each prompt.
      token_weights: ``[P, G, Tc]`` per-completion-token weights (BAE ``block_mean``).
      sequence_weights: ``[P, G]``.
    """
    p_count, tp = prompt_tokens.shape
    _, g_count, tc = completion_tokens.shape
    n = p_count * g_count
    rep = lambda a: np.repeat(np.asarray(a), g_count, axis=0)  # [P, ...] -> [N, ...]
    flat = lambda a: np.asarray(a).reshape((n,) + np.asarray(a).shape[2:])  # [P, G, ...] -> [N, ...]

    tokens = np.concatenate([rep(prompt_tokens), flat(completion_tokens)], axis=1).astype(np.int32)
    cmask = flat(completion_mask).astype(bool)
    if valid is not None:
        cmask = cmask & flat(valid)[:, None]
    tokens = np.where(np.concatenate([rep(prompt_mask), cmask], axis=1), tokens, pad_id)
    attn = np.concatenate([rep(prompt_mask).astype(bool), flat(completion_mask).astype(bool)], 1)

    def to_targets(c):  # a completion-aligned [N, Tc] array -> target-aligned [N, T-1]
        out = np.zeros((n, tp + tc - 1), dtype=c.dtype)
        out[:, tp - 1 :] = c
        return out

    adv = np.asarray(advantages, np.float32)
    adv = flat(adv) if adv.ndim == 2 else to_targets(flat(adv))
    return TrainBatch(
        tokens=tokens,
        attn_mask=attn,
        loss_mask=to_targets(cmask),
        advantages=adv,
        old_logp=to_targets(flat(old_logp).astype(np.float32))
        if old_logp is not None
        else np.zeros((n, tp + tc - 1), np.float32),
        token_weights=to_targets(flat(token_weights).astype(np.float32))
        if token_weights is not None
        else to_targets(np.ones((n, tc), np.float32)),
        sequence_weights=flat(sequence_weights).astype(np.float32)
        if sequence_weights is not None
        else np.ones((n,), np.float32),
        task_ids=rep(task_ids).astype(np.int32)
        if task_ids is not None
        else np.zeros((n,), np.int32),
    )
