"""Per-token log-probabilities and entropies, from logits or (chunked) from hidden states.

``token_logprobs`` takes full logits ``[N, T, V]``. ``chunked_token_logprobs`` takes the final
hidden states ``[N, T, D]`` and the unembedding ``[D, V]`` and never materialises ``[N, T, V]``:
the position axis ``T`` is cut into chunks of ``c = max(1, chunk_size // N)`` consecutive
positions, a ``lax.map`` (a scan) computes one chunk's ``[N, c, V]`` logits at a time, and
``jax.checkpoint`` on the per-chunk function makes the backward pass recompute each chunk's
logits instead of storing them. Peak temporary memory is then O(max(chunk_size, N) * V + D * V)
instead of O(N * T * V) (``benchmarks/logprobs_memory.py`` measures it). Every chunk holds whole
rows' positions ``[N, c]``, never a slice of the rows: when the rows are split over devices
(data parallelism) each device computes its own rows' share of every chunk, with no
communication.

Formulas, in float32 whatever the input dtype (bf16 logits are upcast before the reduction)::

    log_softmax(z) = (z - max z) - log sum_v exp(z_v - max z)
    logp[n, t]     = log_softmax(z[n, t])[targets[n, t]]
    entropy[n, t]  = -sum_v p[n, t, v] log p[n, t, v],   p = softmax(z[n, t])   (0 log 0 = 0)

Target ids outside ``[0, V)`` (negative ones included, which would otherwise wrap around) give
``logp = NaN`` at their positions, so a bad id cannot pass for a plausible log-prob; the entropy
does not depend on the target. Concrete (non-traced) targets are range-checked up front and
refused with a ``ValueError``; under ``jit`` the values are unknown at trace time and the NaN
is what marks them (a masked-out position's NaN never reaches ``policy_loss``'s value or
gradient).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np


def _check_targets(targets, shape: tuple[int, int], vocab_size: int) -> jax.Array:
    targets = jnp.asarray(targets)
    chex.assert_type(targets, int, custom_message="targets must be integer token ids",
                     exception_type=TypeError)
    if targets.shape != shape:
        raise ValueError(f"targets shape {targets.shape} must be [N, T] = {shape}")
    if not isinstance(targets, jax.core.Tracer) and targets.size:
        host = np.asarray(targets)
        lo, hi = int(host.min()), int(host.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"targets must be token ids in [0, V={vocab_size}), got values in "
                             f"[{lo}, {hi}]")
    return targets


def _logp_entropy_from_logits(z: jax.Array, targets: jax.Array, with_entropy: bool):
    """``z`` float32 ``[..., V]``, ``targets`` int ``[...]`` -> (logp, entropy or None)."""
    # Shift by the row max first: log-softmax values are then O(1) numbers, and the entropy is
    # -sum p log p over them (lse - sum p z would cancel catastrophically for large logits).
    shift = jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
    shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
    zs = z - shift
    lse = jnp.log(jnp.sum(jnp.exp(zs), axis=-1))
    v = z.shape[-1]
    inside = (targets >= 0) & (targets < v)
    idx = jnp.clip(targets, 0, v - 1).astype(jnp.int32)
    picked = jnp.take_along_axis(zs, idx[..., None], axis=-1)[..., 0]
    logp = jnp.where(inside, picked - lse, jnp.nan)
    if not with_entropy:
        return logp, None
    log_sm = zs - lse[..., None]
    p = jnp.exp(log_sm)
    # 0 * -inf (a -inf logit) would be NaN: such entries contribute exactly 0.
    entropy = -jnp.sum(p * jnp.where(p > 0, log_sm, 0.0), axis=-1)
    return logp, entropy


def token_logprobs(logits, targets, *, return_entropy: bool = False):
    """Log-probability of each target token under ``softmax(logits)``, and optionally the entropy.

    Args:
        logits: float ``[N, T, V]`` (any float dtype; computed in float32).
        targets: int ``[N, T]`` token ids in ``[0, V)`` (outside: ``ValueError`` if concrete,
            NaN log-probs if traced; see the module docstring).
        return_entropy: also return the entropy of each position's distribution.

    Returns:
        float32 ``[N, T]`` log-probs, or ``(logp, entropy)`` with ``entropy`` float32 ``[N, T]``.
    """
    logits = jnp.asarray(logits)
    chex.assert_rank(logits, 3, custom_message="logits must be [N, T, V]",
                     exception_type=ValueError)
    chex.assert_type(logits, float, custom_message="logits must be floating point",
                     exception_type=TypeError)
    targets = _check_targets(targets, logits.shape[:2], logits.shape[2])
    z = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    logp, entropy = _logp_entropy_from_logits(z, targets, return_entropy)
    return (logp, entropy) if return_entropy else logp


def chunked_token_logprobs(
    hidden,
    unembedding,
    targets,
    *,
    chunk_size: int,
    return_entropy: bool = False,
    bias=None,
):
    """``token_logprobs(hidden @ unembedding + bias, targets)`` without materialising the logits.

    The positions are zero-padded to a multiple of ``c = max(1, chunk_size // N)`` and processed
    ``c`` at a time, for all ``N`` rows together, under ``jax.checkpoint``: neither the forward
    nor the backward pass (w.r.t. ``hidden``, ``unembedding`` and ``bias``) ever holds more than
    one chunk's ``[N, c, V]`` logits (``N * c <= max(chunk_size, N)`` rows of ``V``) and their
    cotangent. Padded positions are dropped from the output, so they get zero gradient. The
    matmul accumulates in float32 (``preferred_element_type``) for bf16 weights. The row axis is
    never cut, so a row-sharded ``hidden`` stays local to its devices.

    Args:
        hidden: float ``[N, T, D]`` final hidden states.
        unembedding: float ``[D, V]`` output projection (the transposed embedding when tied).
        targets: int ``[N, T]`` token ids in ``[0, V)`` (as in :func:`token_logprobs`).
        chunk_size: logit rows (sequences x positions) per chunk, a Python int >= 1; a chunk
            covers ``max(1, chunk_size // N)`` positions of every sequence. Larger is faster,
            smaller saves memory.
        return_entropy: also return the per-position entropy.
        bias: optional float ``[V]`` output bias.

    Returns:
        float32 ``[N, T]`` log-probs, or ``(logp, entropy)``.
    """
    hidden = jnp.asarray(hidden)
    unembedding = jnp.asarray(unembedding)
    chex.assert_rank(hidden, 3, custom_message="hidden must be [N, T, D]",
                     exception_type=ValueError)
    chex.assert_rank(unembedding, 2, custom_message="unembedding must be [D, V]",
                     exception_type=ValueError)
    for name, x in (("hidden", hidden), ("unembedding", unembedding)):
        chex.assert_type(x, float, custom_message=f"{name} must be floating point",
                         exception_type=TypeError)
    n, t, d = hidden.shape
    if unembedding.shape[0] != d:
        raise ValueError(
            f"unembedding has {unembedding.shape[0]} rows, expected D={d} (hidden's last axis)"
        )
    v = unembedding.shape[1]
    if bias is not None:
        bias = jnp.asarray(bias)
        if bias.shape != (v,):
            raise ValueError(f"bias must be [V] = ({v},), got shape {bias.shape}")
        chex.assert_type(bias, float, custom_message="bias must be floating point",
                         exception_type=TypeError)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a Python int >= 1, got {chunk_size!r}")
    targets = _check_targets(targets, (n, t), v)

    c = min(max(1, chunk_size // max(n, 1)), max(t, 1))  # positions per chunk
    num_chunks = -(-t // c)
    pad = num_chunks * c - t
    tg = targets.astype(jnp.int32)
    h = hidden
    if pad:
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        tg = jnp.pad(tg, ((0, 0), (0, pad)))
    # [N, K*c, D] -> [K, N, c, D]: the scan runs over position chunks, every chunk all rows.
    h = jnp.moveaxis(h.reshape(n, num_chunks, c, d), 1, 0)
    tg = jnp.moveaxis(tg.reshape(n, num_chunks, c), 1, 0)

    @jax.checkpoint
    def one_chunk(w, b, h_c, t_c):
        # [N, c, D] -> [N*c, D]: one 2-D matmul per chunk (rows stay whole on their devices).
        z = jnp.einsum("cd,dv->cv", h_c.reshape(n * c, d), w, preferred_element_type=jnp.float32)
        if b is not None:
            z = z + b.astype(jnp.float32)[None, :]
        logp_c, entropy_c = _logp_entropy_from_logits(z, t_c.reshape(n * c), return_entropy)
        if not return_entropy:
            return logp_c.reshape(n, c)
        return logp_c.reshape(n, c), entropy_c.reshape(n, c)

    out = jax.lax.map(lambda xs: one_chunk(unembedding, bias, *xs), (h, tg))
    unchunk = lambda x: jnp.moveaxis(x, 0, 1).reshape(n, num_chunks * c)[:, :t]
    if not return_entropy:
        return unchunk(out)
    return unchunk(out[0]), unchunk(out[1])
