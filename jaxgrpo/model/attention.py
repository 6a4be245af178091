"""Grouped-query attention over cache slots: plain, chunked (memory-efficient) and splash (TPU).

Every implementation computes, for a batch row ``b``, query slot ``q_t = q_offset + t``, query
head ``n = j * r + i`` (KV group ``j``, ``r = H / Hkv`` query heads per KV head) and key slot
``s``::

    allowed[b, t, s] = key_valid[b, s] and s <= q_offset + t
    score[b, n, t, s] = <q[b, t, n], k[b, j, s]> / sqrt(Dh)
    out[b, t, n] = sum_s softmax_s(score | allowed) * v[b, j, s]

with the softmax statistics in float32. A query row with no allowed key (a left-padded slot
before the row's first real token) gives exactly 0 in every implementation, and its gradients
are 0, never NaN; such rows are padding and their outputs are never used.

Shapes: ``q [B, T, H, Dh]``, ``k, v [B, Hkv, S, Dh]`` (the KV-cache layout), ``key_valid [B, S]``
bool; the output is ``[B, T, H, Dh]`` in ``q``'s dtype (the compute dtype; ``k`` and ``v`` are
cast to it).

Implementations (``ATTENTION_IMPLS``):

* ``plain``: materialises the float32 scores ``[B, Hkv, r, T, S]``. The decode step uses it
  against the KV cache (``T`` is a few tokens there), and it is the reference.
* ``chunked``: flash-style online softmax in pure JAX with a hand-written backward pass
  (``jax.custom_vjp``): query blocks of ``block_size`` (a ``lax.map``) and, inside each, a loop
  over the key blocks at or before the block's last query slot (causal blocks are skipped).
  The forward keeps only the output and the per-row log-sum-exp; the backward recomputes the
  probabilities block by block. Temporaries are ``O(B * H * block^2)`` plus ``O(B * H * T * Dh)``
  accumulators: linear in ``T`` instead of quadratic. ``T`` and ``S`` need not be multiples of
  the block (inputs are padded with invalid keys inside).
* ``splash``: the Pallas TPU kernel ``jax.experimental.pallas.ops.tpu.splash_attention``, its
  MQA variant (one KV head shared by ``r`` query heads) vmapped over batch rows and KV groups,
  with a causal mask and padding as segment ids (valid keys are segment 1, invalid keys
  segment 0, every query segment 1). Supported only for the cache-free forward (``q_offset``
  0, ``T == S``) with ``T`` a multiple of the block size, which must itself be a multiple of
  128 (see ``splash_unsupported_reason``); otherwise ``chunked`` runs instead. Under a mesh
  context the kernel runs in ``jax.shard_map`` with rows over ``("data", "fsdp")`` and KV
  heads over ``"tensor"`` (axes that do not divide the shapes stay unsplit).
* ``auto``: ``splash`` when the target platform is TPU and the shapes are supported, else
  ``chunked``; an explicit ``splash`` does the same but warns with the reason when it falls
  back. The target platform is the default device's (``jax.default_device``), else the
  default backend's. The model uses ``auto`` (or the configured choice) for the cache-free forward
  and ``plain`` for the cached decode step.
"""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp

from jaxgrpo.model.config import ATTENTION_IMPLS

SPLASH_LANES = 128  # splash block sizes must be multiples of this
_NEG = -1e30


def attention(q_BxTxHxDh: jax.Array, k_BxKxSxDh: jax.Array, v_BxKxSxDh: jax.Array,
              key_valid_BxS: jax.Array, *, q_offset=0, impl: str = "auto",
              block_size: int = 512) -> jax.Array:
    """Masked grouped-query attention (see the module docstring for the formula).

    Args:
        q_BxTxHxDh: queries ``[B, T, H, Dh]`` (after RoPE), compute dtype.
        k_BxKxSxDh: keys ``[B, Hkv, S, Dh]``.
        v_BxKxSxDh: values ``[B, Hkv, S, Dh]``.
        key_valid_BxS: bool ``[B, S]``, slots that hold real tokens.
        q_offset: int (or int32 scalar) slot of the first query; query ``t`` sits at slot
            ``q_offset + t``.
        impl: one of ``ATTENTION_IMPLS``.
        block_size: query/key block of ``chunked`` and ``splash``.

    Returns:
        ``[B, T, H, Dh]`` in ``q``'s dtype; exactly 0 on query rows with no allowed key.
    """
    _check(q_BxTxHxDh, k_BxKxSxDh, v_BxKxSxDh, key_valid_BxS, impl, block_size)
    if impl == "plain":
        return plain_attention(q_BxTxHxDh, k_BxKxSxDh, v_BxKxSxDh, key_valid_BxS,
                               q_offset=q_offset)
    if impl in ("auto", "splash"):
        reason = splash_unsupported_reason(q_BxTxHxDh.shape, k_BxKxSxDh.shape,
                                           q_offset=q_offset, block_size=block_size,
                                           platform=_target_platform())
        if reason is None:
            return splash_attention(q_BxTxHxDh, k_BxKxSxDh, v_BxKxSxDh, key_valid_BxS,
                                    block_size=block_size)
        if impl == "splash":
            warnings.warn(f"attention 'splash' falls back to 'chunked': {reason}", stacklevel=2)
    return chunked_attention(q_BxTxHxDh, k_BxKxSxDh, v_BxKxSxDh, key_valid_BxS,
                             q_offset=q_offset, block_size=block_size)


def _check(q, k, v, key_valid, impl, block_size):
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0:
        raise ValueError(f"attention block_size must be a positive int, got {block_size!r}")
    if q.ndim != 4 or k.ndim != 4 or tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"attention expects q [B, T, H, Dh] and k, v [B, Hkv, S, Dh]; got q "
                         f"{q.shape}, k {k.shape}, v {v.shape}")
    b, t, h, dh = q.shape
    if k.shape[0] != b or k.shape[3] != dh or h % k.shape[1]:
        raise ValueError(f"attention k/v {k.shape} do not fit q {q.shape} (same B and Dh, Hkv "
                         f"dividing H)")
    if tuple(key_valid.shape) != (b, k.shape[2]):
        raise ValueError(f"attention key_valid must be [B, S] = {(b, k.shape[2])}, got "
                         f"{key_valid.shape}")


def _allowed(key_valid_BxS, q_slot_T, k_slot_S):
    """bool ``[B, T, S]``: ``key_valid[b, s] and s <= q_slot[t]``."""
    return key_valid_BxS[:, None, :] & (k_slot_S[None, None, :] <= q_slot_T[None, :, None])


# ---- plain -------------------------------------------------------------------------------------


def plain_attention(q_BxTxHxDh, k_BxKxSxDh, v_BxKxSxDh, key_valid_BxS, *, q_offset=0):
    """Reference implementation: full float32 scores ``[B, Hkv, r, T, S]``."""
    b, t, h, dh = q_BxTxHxDh.shape
    kh, s = k_BxKxSxDh.shape[1], k_BxKxSxDh.shape[2]
    dt = q_BxTxHxDh.dtype
    allowed_BxTxS = _allowed(key_valid_BxS, q_offset + jnp.arange(t), jnp.arange(s))
    q5 = q_BxTxHxDh.reshape(b, t, kh, h // kh, dh)
    scores = jnp.einsum("btkrh,bksh->bkrts", q5, k_BxKxSxDh.astype(dt),
                        preferred_element_type=jnp.float32) * (dh ** -0.5)
    allowed = allowed_BxTxS[:, None, None]
    scores = jnp.where(allowed, scores, _NEG)
    # Zeroing the disallowed probabilities changes nothing on rows with an allowed key (there
    # they are exp(-1e30 - max) = 0 already) and makes rows without one exactly 0.
    probs = jnp.where(allowed, jax.nn.softmax(scores, axis=-1), 0.0).astype(dt)
    att = jnp.einsum("bkrts,bksh->btkrh", probs, v_BxKxSxDh.astype(dt))
    return att.reshape(b, t, h, dh)


# ---- chunked -----------------------------------------------------------------------------------


def chunked_attention(q_BxTxHxDh, k_BxKxSxDh, v_BxKxSxDh, key_valid_BxS, *, q_offset=0,
                      block_size: int = 512):
    """Memory-efficient attention: online softmax over key blocks, custom blockwise backward.

    Blocks are ``min(block_size, T)`` queries by ``min(block_size, S)`` keys; ``T`` and ``S``
    are padded up to multiples of them (padded keys are invalid, padded queries are dropped).
    """
    b, t, h, dh = q_BxTxHxDh.shape
    kh, s = k_BxKxSxDh.shape[1], k_BxKxSxDh.shape[2]
    dt = q_BxTxHxDh.dtype
    bq, bk = min(block_size, t), min(block_size, s)
    tp, sp = -(-t // bq) * bq, -(-s // bk) * bk
    # [B, Hkv, r, T, Dh]: (T, Dh) minor, so TPU tiles are not padded when r or Hkv is small.
    qg = jnp.transpose(q_BxTxHxDh.reshape(b, t, kh, h // kh, dh), (0, 2, 3, 1, 4))
    k = k_BxKxSxDh.astype(dt)
    v = v_BxKxSxDh.astype(dt)
    valid = key_valid_BxS.astype(bool)
    if tp != t:
        qg = jnp.pad(qg, ((0, 0), (0, 0), (0, 0), (0, tp - t), (0, 0)))
    if sp != s:
        pad = ((0, 0), (0, 0), (0, sp - s), (0, 0))
        k, v = jnp.pad(k, pad), jnp.pad(v, pad)
        valid = jnp.pad(valid, ((0, 0), (0, sp - s)))
    offset = jnp.asarray(q_offset, jnp.int32)
    out = _flash(qg, k, v, valid, offset, bq, bk)[:, :, :, :t]
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, h, dh)


def _to_blocks(x, axis, size):
    """Splits ``axis`` into ``[n, size]`` and moves ``n`` to the front."""
    shape = x.shape[:axis] + (x.shape[axis] // size, size) + x.shape[axis + 1:]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _from_blocks(x, axis):
    """Inverse of ``_to_blocks``."""
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2:])


def _block_scores(qi, kj, valid_j, q_start, k_start):
    """Masked float32 scores ``[B, Hkv, r, Bq, Bk]`` and the mask ``[B, 1, 1, Bq, Bk]``."""
    bq, bk, dh = qi.shape[3], kj.shape[2], qi.shape[-1]
    sc = jnp.einsum("bkrqh,bksh->bkrqs", qi, kj,
                    preferred_element_type=jnp.float32) * (dh ** -0.5)
    allowed = _allowed(valid_j, q_start + jnp.arange(bq), k_start + jnp.arange(bk))
    allowed = allowed[:, None, None]
    return jnp.where(allowed, sc, _NEG), allowed


def _num_key_blocks(q_offset, i, bq, bk, nk):
    """Key blocks ``0..n-1`` hold every slot a query of block ``i`` may attend."""
    last_q = q_offset + (i + 1) * bq - 1
    return jnp.clip(last_q // bk + 1, 0, nk)


def _flash_forward(qg, k, v, valid, q_offset, bq, bk):
    """Returns the output ``[B, Hkv, r, Tp, Dh]`` (compute dtype) and the log-sum-exp blocks
    ``[nq, B, Hkv, r, Bq]`` (float32)."""
    b, kh, r, tp, dh = qg.shape
    sp = k.shape[2]
    nq, nk = tp // bq, sp // bk
    dt = qg.dtype
    k_blocks = _to_blocks(k, 2, bk)  # [nk, B, Hkv, Bk, Dh]
    v_blocks = _to_blocks(v, 2, bk)
    valid_blocks = _to_blocks(valid, 1, bk)  # [nk, B, Bk]

    def one_query_block(args):
        i, qi = args  # qi [B, Hkv, r, Bq, Dh]
        q_start = q_offset + i * bq

        def body(j, carry):
            m, den, acc = carry
            sc, allowed = _block_scores(qi, k_blocks[j], valid_blocks[j], q_start, j * bk)
            m_new = jnp.maximum(m, jnp.max(sc, axis=-1))
            p = jnp.where(allowed, jnp.exp(sc - m_new[..., None]), 0.0)
            corr = jnp.exp(m - m_new)
            den = corr * den + jnp.sum(p, axis=-1)
            pv = jnp.einsum("bkrqs,bksh->bkrqh", p.astype(dt), v_blocks[j],
                            preferred_element_type=jnp.float32)
            return m_new, den, corr[..., None] * acc + pv

        init = (jnp.full((b, kh, r, bq), _NEG, jnp.float32),
                jnp.zeros((b, kh, r, bq), jnp.float32),
                jnp.zeros((b, kh, r, bq, dh), jnp.float32))
        m, den, acc = jax.lax.fori_loop(0, _num_key_blocks(q_offset, i, bq, bk, nk), body, init)
        l_safe = jnp.where(den > 0, den, 1.0)
        o = (acc / l_safe[..., None]).astype(dt)  # 0 where no key is allowed
        lse = m + jnp.log(l_safe)
        return o, lse  # [B, Hkv, r, Bq, Dh], [B, Hkv, r, Bq]

    o_blocks, lse_blocks = jax.lax.map(one_query_block,
                                       (jnp.arange(nq), _to_blocks(qg, 3, bq)))
    return _from_blocks(o_blocks, 3), lse_blocks


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _flash(qg, k, v, valid, q_offset, bq, bk):
    return _flash_forward(qg, k, v, valid, q_offset, bq, bk)[0]


def _flash_fwd(qg, k, v, valid, q_offset, bq, bk):
    o, lse = _flash_forward(qg, k, v, valid, q_offset, bq, bk)
    return o, (qg, k, v, valid, q_offset, o, lse)


def _flash_bwd(bq, bk, res, do):
    """Blockwise backward: ``p = exp(s - lse)``, ``dv = p^T do``, ``dp = do v^T``,
    ``ds = p (dp - rowsum(do * o))``, ``dq = ds k / sqrt(Dh)``, ``dk = ds^T q / sqrt(Dh)``."""
    qg, k, v, valid, q_offset, o, lse_blocks = res
    b, kh, r, tp, dh = qg.shape
    sp = k.shape[2]
    nq, nk = tp // bq, sp // bk
    dt = qg.dtype
    scale = dh ** -0.5
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)  # [B, Hkv, r, Tp]
    q_blocks = _to_blocks(qg, 3, bq)  # [nq, B, Hkv, r, Bq, Dh]
    do_blocks = _to_blocks(do.astype(dt), 3, bq)
    delta_blocks = _to_blocks(delta, 3, bq)  # [nq, B, Hkv, r, Bq]

    def one_key_block(dq_blocks, args):
        j, kj, vj, valid_j = args  # kj [B, Hkv, Bk, Dh]

        def body(i, carry):
            dk, dv, dq_blocks = carry
            qi, doi = q_blocks[i], do_blocks[i]
            sc, allowed = _block_scores(qi, kj, valid_j, q_offset + i * bq, j * bk)
            p = jnp.where(allowed, jnp.exp(sc - lse_blocks[i][..., None]), 0.0)
            dv = dv + jnp.einsum("bkrqs,bkrqh->bksh", p.astype(dt), doi,
                                 preferred_element_type=jnp.float32)
            dp = jnp.einsum("bkrqh,bksh->bkrqs", doi, vj, preferred_element_type=jnp.float32)
            ds = (p * (dp - delta_blocks[i][..., None])).astype(dt)
            dqi = jnp.einsum("bkrqs,bksh->bkrqh", ds, kj,
                             preferred_element_type=jnp.float32) * scale
            dk = dk + jnp.einsum("bkrqs,bkrqh->bksh", ds, qi,
                                 preferred_element_type=jnp.float32) * scale
            return dk, dv, dq_blocks.at[i].add(dqi)

        zero = jnp.zeros((b, kh, bk, dh), jnp.float32)
        first = jnp.clip(jnp.floor_divide(j * bk - q_offset, bq), 0, nq)
        dk, dv, dq_blocks = jax.lax.fori_loop(first, nq, body, (zero, zero, dq_blocks))
        return dq_blocks, (dk, dv)

    dq0 = jnp.zeros((nq, b, kh, r, bq, dh), jnp.float32)
    dq_blocks, (dk_blocks, dv_blocks) = jax.lax.scan(
        one_key_block, dq0,
        (jnp.arange(nk), _to_blocks(k, 2, bk), _to_blocks(v, 2, bk), _to_blocks(valid, 1, bk)))
    dq = _from_blocks(dq_blocks, 3).astype(qg.dtype)
    dk = _from_blocks(dk_blocks, 2).astype(k.dtype)
    dv = _from_blocks(dv_blocks, 2).astype(v.dtype)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---- splash (TPU) ------------------------------------------------------------------------------


def splash_unsupported_reason(q_shape, k_shape, *, q_offset=0, block_size: int = 512,
                              platform: str = "tpu"):
    """``None`` when ``splash`` supports these shapes, else the reason (a sentence).

    Constraints: a TPU target (``platform``), cache-free attention (``q_offset`` the Python int 0 and ``S == T``: the mask
    is the static causal one), a block size that is a multiple of 128 (the kernel's lane width)
    after clipping to ``T`` (``min(block_size, T)``), and ``T`` a multiple of that block.
    """
    t, s = q_shape[1], k_shape[2]
    if platform != "tpu":
        return f"splash is a TPU kernel and the target platform is {platform!r}"
    if not (isinstance(q_offset, int) and q_offset == 0) or s != t:
        return "splash runs only the cache-free forward (query slots 0..T-1 over T keys)"
    blk = min(block_size, t)
    if blk % SPLASH_LANES:
        return (f"splash needs a block size that is a multiple of {SPLASH_LANES}; "
                f"min(attention_block={block_size}, T={t}) = {blk}")
    if t % blk:
        return f"splash needs T={t} to be a multiple of the block size {blk}"
    return None


def _target_platform() -> str:
    """Platform the current trace targets: the default device's, else the backend's."""
    dev = jax.config.jax_default_device
    if dev is not None and not isinstance(dev, str):
        return dev.platform
    if isinstance(dev, str):
        return dev
    return jax.default_backend()


def _splash_kernel(r: int, t: int, block: int, interpret: bool):
    """The MQA kernel for ``r`` query heads per KV head (built per trace: its mask tables are
    arrays of that trace)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as sk,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as sm,
    )

    mask = sm.MultiHeadMask([sm.CausalMask((t, t)) for _ in range(r)])
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                          block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                          block_q_dq=block, block_kv_dq=block)
    return sk.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def splash_attention(q_BxTxHxDh, k_BxKxSxDh, v_BxKxSxDh, key_valid_BxS, *,
                     block_size: int = 512, interpret: bool = False):
    """The Pallas splash kernel (MQA per KV group, vmapped over rows and groups).

    Raises ValueError when ``splash_unsupported_reason`` is not None. ``interpret=True`` runs
    the kernel in the Pallas interpreter (any platform; slow, for tests). Queries are scaled by
    ``1/sqrt(Dh)`` before the kernel (which applies no scale). Rows without an allowed key are
    set to 0 after the kernel.
    """
    reason = splash_unsupported_reason(q_BxTxHxDh.shape, k_BxKxSxDh.shape, block_size=block_size)
    if reason is not None:
        raise ValueError(reason)
    b, t, h, dh = q_BxTxHxDh.shape
    kh = k_BxKxSxDh.shape[1]
    r = h // kh
    dt = q_BxTxHxDh.dtype
    kernel = _splash_kernel(r, t, min(block_size, t), bool(interpret))
    q_BxKxRxTxDh = jnp.transpose(
        (q_BxTxHxDh * jnp.asarray(dh ** -0.5, dt)).reshape(b, t, kh, r, dh), (0, 2, 3, 1, 4))
    k, v = k_BxKxSxDh.astype(dt), v_BxKxSxDh.astype(dt)
    valid = key_valid_BxS.astype(bool)

    def run(q, k, v, valid):
        from jax.experimental.pallas.ops.tpu.splash_attention import (
            splash_attention_kernel as sk,
        )

        seg = sk.SegmentIds(q=jnp.ones(valid.shape, jnp.int32), kv=valid.astype(jnp.int32))
        per_group = jax.vmap(kernel, in_axes=(0, 0, 0, None))  # over KV groups
        out = jax.vmap(per_group, in_axes=(0, 0, 0, 0))(q, k, v, seg)  # over rows
        # A query row with no valid key at or before it: 0, as in the other implementations.
        has_key = jnp.cumsum(valid.astype(jnp.int32), axis=1) > 0  # [B, T]
        return jnp.where(has_key[:, None, None, :, None], out, 0).astype(dt)

    out = _maybe_shard_map(run, b, kh)(q_BxKxRxTxDh, k, v, valid)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, h, dh)


def _maybe_shard_map(fn, rows: int, kv_heads: int):
    """Runs ``fn`` per shard under a mesh context (rows over the batch axes, KV heads over
    ``tensor``, each only where it divides); without a mesh context, ``fn`` itself."""
    from jax.sharding import PartitionSpec as P

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn
    batch = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
    if batch and rows % math.prod(mesh.shape[a] for a in batch):
        batch = ()
    heads = "tensor" if "tensor" in mesh.axis_names and not kv_heads % mesh.shape["tensor"] \
        else None
    row_spec = batch or None
    specs = (P(row_spec, heads), P(row_spec, heads), P(row_spec, heads), P(row_spec))
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P(row_spec, heads),
                         check_vma=False)
