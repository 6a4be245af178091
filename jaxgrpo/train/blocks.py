"""BAE on the host: per-token block ids of sampled completions, block rewards and outcomes.

The structured parser (:mod:`jaxgrpo.tasks.structured`) splits a completion's *text* into blocks;
training needs the block of every *sampled token*. :func:`token_offsets` maps each sampled token
to its character span in the decoded text, and :func:`rollout_block_ids` turns the parser's spans
into int32 block ids ``[P, G, Tc]`` (-1 outside every block, EOS to the last block as
our reading of the paper). :func:`blockwise_token_advantages` then computes
:func:`jaxgrpo.core.advantages.blockwise` advantages with OCB strata from the first block's
correctness, broadcasts them to tokens and builds the ``block_mean`` token weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from jaxgrpo.core import advantages as core_adv
from jaxgrpo.tasks.structured import StructuredTask, completion_block_ids


def token_offsets(tokenizer, ids: Sequence[int], text: str) -> list[tuple[int, int]]:
    """Character span ``(start, end)`` in ``text`` of each token in ``ids``.

    ``text`` is ``tokenizer.decode(ids, skip_special_tokens=True)``. Three ways, cheapest first:

    1. Re-tokenising ``text`` reproduces ``ids`` (special tokens aside): the tokenizer's own
       offsets.
    2. The per-token decodes concatenate to ``text`` (character tokenizers, most ASCII BPE):
       cumulative lengths.
    3. Otherwise, exact prefix decoding (quadratic in the length; rare).

    Special tokens (and tokens that decode to nothing) get the zero-width span ``(s, s)``.
    """
    ids = [int(i) for i in ids]
    special = set(tokenizer.all_special_ids)
    plain = [i for i in ids if i not in special]
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    if list(enc["input_ids"]) == plain:
        it = iter(enc["offset_mapping"])
        out, pos = [], 0
        for i in ids:
            if i in special:
                out.append((pos, pos))
            else:
                s, e = next(it)
                out.append((int(s), int(e)))
                pos = int(e)
        return out
    pieces = [
        "" if i in special else tokenizer.decode([i], skip_special_tokens=True) for i in ids
    ]
    if "".join(pieces) == text:
        out, pos = [], 0
        for p in pieces:
            out.append((pos, pos + len(p)))
            pos += len(p)
        return out
    out, prev = [], 0
    for t in range(len(ids)):
        cur = len(tokenizer.decode(ids[: t + 1], skip_special_tokens=True))
        out.append((prev, max(cur, prev)))
        prev = max(cur, prev)
    return out


def rollout_block_ids(
    task: StructuredTask,
    tokenizer,
    tokens: np.ndarray,
    mask: np.ndarray,
    texts: Sequence[str],
    truncated: np.ndarray,
    eos_ids: Sequence[int],
) -> np.ndarray:
    """Block ids ``[B, Tc]`` (int32, -1 outside blocks) of ``B`` sampled completions.

    Args:
      task: the structured task that scored the completions (format, ``on_malformed``).
      tokens: int ``[B, Tc]`` sampled tokens; ``mask`` bool ``[B, Tc]`` (up to and with EOS).
      texts: the ``B`` decoded completions (special tokens skipped).
      truncated: bool ``[B]``: the completion hit the length limit.
      eos_ids: the tokenizer's end-of-sequence ids (an EOS token joins the last block).
    """
    if not isinstance(task, StructuredTask):
        raise TypeError(
            f"blockwise training needs a structured task (confidence / two_attempt), got "
            f"{type(task).__name__} {getattr(task, 'name', '')!r}"
        )
    b, tc = tokens.shape
    offsets, eos_index = [], []
    eos = set(int(e) for e in eos_ids)
    for i in range(b):
        ids = tokens[i][mask[i]].tolist()
        offsets.append(token_offsets(tokenizer, ids, texts[i]))
        last = len(ids) - 1
        eos_index.append(last if last >= 0 and ids[last] in eos else None)
    return completion_block_ids(
        task, texts, offsets, length=tc, eos_index=eos_index, truncated=list(truncated)
    )


def block_outcomes(correct: np.ndarray, num_blocks: int) -> np.ndarray:
    """OCB strata ``[P, G, K]``: block k > 0 is stratified by the first block's correctness.

    For the confidence format this is c (the answer's correctness, the paper's §4.3); for two
    attempts it is c_1, the first attempt's. Block 0 has no prefix outcome (0).
    """
    c = np.asarray(correct).astype(np.int32)
    out = np.repeat(c[:, :, None], num_blocks, axis=2)
    out[:, :, 0] = 0
    return out


def blockwise_token_advantages(
    block_rewards: np.ndarray,
    correct: np.ndarray,
    valid: np.ndarray,
    block_ids: np.ndarray,
    *,
    baselines: Sequence[str],
    std_normalize: bool = False,
    eps: float = 1e-6,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BAE advantages on tokens.

    Args:
      block_rewards: float ``[P, G, K]``; ``correct`` bool ``[P, G]`` (first block);
        ``valid`` bool ``[P, G]``; ``block_ids`` int ``[P, G, Tc]``.
      baselines: K baseline names (``loss.block_baselines``).

    Returns:
      ``(block advantages [P, G, K], token advantages [P, G, Tc], token weights [P, G, Tc])``;
      block k's advantage sits only on block k's tokens, with weight ``1 / |T_k|`` there.
    """
    p, g, k = block_rewards.shape
    if block_ids.shape[:2] != (p, g):
        raise ValueError(
            f"block_ids must have shape [P={p}, G={g}, Tc], got {block_ids.shape}"
        )
    if len(baselines) != k:
        raise ValueError(
            f"loss.block_baselines has {len(baselines)} entries but the task has {k} blocks: "
            "give one baseline per block"
        )
    adv = core_adv.blockwise(
        jnp.asarray(block_rewards, jnp.float32),
        jnp.asarray(block_outcomes(correct, k)),
        jnp.asarray(valid, bool),
        baselines=tuple(str(b) for b in baselines),
        std_normalize=bool(std_normalize),
        eps=eps,
    )
    ids = jnp.asarray(block_ids.reshape(p * g, -1), jnp.int32)
    tok = core_adv.token_advantages(core_adv.flatten_groups(adv), ids)
    w = core_adv.block_token_weights(ids, k)
    shape = block_ids.shape
    return (
        np.asarray(adv),
        np.asarray(tok).reshape(shape),
        np.asarray(w).reshape(shape),
    )


class EntropyController:
    """Adaptive entropy coefficient (BAE, arXiv 2602.10231's setup, after Skywork-OR1's controller).

    After each step with measured mean token entropy e: coef += delta if e < target, else
    coef -= delta; then coef is clipped to ``[0, max_coef]``.
    """

    def __init__(self, *, target: float, delta: float, max_coef: float):
        for name, v in (("target", target), ("delta", delta), ("max_coef", max_coef)):
            if not np.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        self.target, self.delta, self.max_coef = float(target), float(delta), float(max_coef)

    def update(self, coef: float, entropy: float) -> float:
        """The next coefficient; a non-finite entropy leaves it unchanged."""
        if not np.isfinite(entropy):
            return float(coef)
        step = self.delta if entropy < self.target else -self.delta
        return float(np.clip(coef + step, 0.0, self.max_coef))
