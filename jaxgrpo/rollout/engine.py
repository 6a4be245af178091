"""Paged rollout engine: a paged KV cache, ragged attention and continuous batching.

The engine decodes ``N = P*G`` requests (prompt ``p``, sample ``g``; row ``n = p*G + g``) in a
fixed number of decode *slots* (``PagedOptions.max_slots``). Each device call (a *round*) runs
up to ``steps_per_sync`` decode steps of every live slot in a ``lax.while_loop``; between rounds
the host frees the slots and pages of finished requests and admits waiting requests into free
slots, so a short completion does not wait for the longest one and idle rows do not step.
A round runs only the live slots, gathered into the smallest *row bucket* (``size_buckets``:
8, 16, 32, ... up to ``max_slots`` rows) that holds them; once nothing waits, a round ends as
soon as the live slots fit the next smaller bucket, so the rows of finished requests stop
computing (the static sampler steps all ``P * G`` rows until the longest one ends).

KV cache: one page pool per layer, ``[num_pages, page_size, 2*Hkv, Dh]`` with the keys of KV
head ``j`` at index ``2j`` and its values at ``2j + 1`` (the layout of the TPU
``ragged_paged_attention`` kernel), and a page table ``[max_slots, pages_per_seq]`` per slot.
Page 0 is a scratch page that absorbs the writes of padded tokens and idle slots and is never
read unmasked. A prompt is prefilled once (its first ``Lp - 1`` tokens, into pages of its own);
the G samples share its full pages read-only, each gets a private copy of the last partial
prompt page (copy-on-write), and each decodes the prompt's last token itself as its first step.
Sample pages are allocated round by round as sequences grow and freed when they end; a prompt's
pages are freed when its last sample ends. The pool holds ``ceil(Tn / page_size) + 1`` pages
per slot plus the pages of ``min(max_slots, ceil(max_slots / G) + 2)`` live prompts, so the
memory follows the slot count, not ``P * G``.

Attention: ``decode_attention`` is one interface chosen by platform at trace time. Off TPU it is
``paged_decode_attention``, a pure-JAX loop over blocks of ``pages_per_block`` pages (default
one) with a dynamic trip count, the longest filled length among the live slots, so a step costs
what the filled pages need, not the budget. Traced for a TPU it is jax's Pallas
``ragged_paged_attention`` kernel (``kernel_decode_attention``: one query row per slot), which
reads only each sequence's filled pages; ``PagedOptions.attention`` forces either. Prompt prefill
uses the model's own cache-free attention.

Streaming: :class:`PagedSession` holds the pool and the slots between calls. ``submit`` queues
prompts under caller-chosen uids while decoding runs, ``run`` runs rounds until one finishes a
prompt (all its ``G`` samples) and returns the prompts finished in it (:class:`FinishedPrompt`),
and ``cancel`` drops everything waiting or in flight, returning its pages. ``generate_paged`` is
one session: every prompt submitted with its index as uid, run until empty.

Randomness: the token at completion position ``i`` of request ``(u, g)`` (prompt uid ``u``, the
prompt's index in ``generate_paged``) is drawn with the key
``fold_in(fold_in(fold_in(key, u), g), i)``, so the tokens do not depend on the slot count, the
order of submission or admission, or the other requests. (The static sampler in
``jaxgrpo.rollout.sampler`` draws one key per step for the whole batch, so sampled, non-greedy,
tokens differ between the two engines; greedy tokens and the meaning of the log-probs are the
same.)

Compilation: a round program per row bucket, a prefill program per prefill bucket and the pool
allocation, whose shapes depend on the slot count, the page size, the prompt bucket and the
budget only, never on the request mix; all of them are compiled when the first session of a
signature starts (a round with no live row runs no step), so a later session, submit or request
mix compiles nothing.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgrpo.model.transformer import rms_norm
from jaxgrpo.rollout.sampler import Rollout, _sample, bucket_length

_NEG = -1e30
ATTENTION_IMPLS = ("auto", "jax", "pallas")


@dataclasses.dataclass(frozen=True)
class PagedOptions:
    """Knobs of the paged engine.

    Attributes:
        max_slots: decode slots (sequences decoded at once).
        steps_per_sync: decode steps per device call (host round trip).
        page_size: tokens per KV page.
        pages_per_block: pages per attention block (the unit of the ragged loop). One page (16
            tokens) is the fastest on CPU: a larger block gathers a working set of ``max_slots x
            block`` keys and values that leaves the cache.
        prefill_batch: prompts per prefill call at most (0: ``min(16, ceil(max_slots / G))``).
        attention: decode attention, one of ``ATTENTION_IMPLS``: ``"auto"`` (the Pallas TPU
            kernel when tracing for a TPU, the pure-JAX ragged loop elsewhere), ``"jax"`` or
            ``"pallas"`` (forced; see :func:`decode_attention`).
    """

    max_slots: int = 64
    steps_per_sync: int = 32
    page_size: int = 16
    pages_per_block: int = 1
    prefill_batch: int = 0
    attention: str = "auto"

    def __post_init__(self):
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"PagedOptions.attention must be one of {ATTENTION_IMPLS}, got "
                             f"{self.attention!r}")
        for name in ("max_slots", "steps_per_sync", "page_size", "pages_per_block"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"PagedOptions.{name} must be a positive int, got {v!r}")
        if not isinstance(self.prefill_batch, int) or self.prefill_batch < 0:
            raise ValueError(f"PagedOptions.prefill_batch must be an int >= 0, got "
                             f"{self.prefill_batch!r}")


def _dtype(cfg):
    return jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32


# ---- ragged attention over pages ---------------------------------------------------------------


def paged_decode_attention(q_SxHxDh, kv_pool, page_table_SxM, lengths_S, *,
                           pages_per_block: int = 1):
    """One query per sequence against its paged keys and values.

    ``out[s, n] = sum_t softmax_t(<q[s, n], k[s, t]> / sqrt(Dh)) v[s, t]`` over the
    ``lengths[s]`` first tokens of sequence ``s``, where token ``t`` lives in page
    ``page_table[s, t // page_size]`` at offset ``t % page_size``; query head ``n`` reads KV
    head ``n // (H / Hkv)``. A sequence with length 0 gives exactly 0.

    The keys are visited in blocks of ``pages_per_block`` pages, online softmax in float32, for
    ``ceil(max(lengths) / block)`` blocks (a dynamic trip count): the cost follows the longest
    filled length, not the page-table width.

    Args:
        q_SxHxDh: queries ``[S, H, Dh]`` (after RoPE).
        kv_pool: ``[num_pages, page_size, 2*Hkv, Dh]``, keys at even, values at odd heads.
        page_table_SxM: int32 ``[S, M]`` page ids.
        lengths_S: int32 ``[S]`` filled tokens of each sequence (<= ``M * page_size``).
        pages_per_block: pages per block.

    Returns:
        ``[S, H, Dh]`` in ``q``'s dtype.
    """
    q_SxHxDh, kv_pool = jnp.asarray(q_SxHxDh), jnp.asarray(kv_pool)
    page_table_SxM, lengths_S = jnp.asarray(page_table_SxM), jnp.asarray(lengths_S)
    s, h, dh = q_SxHxDh.shape
    ps, kh2 = kv_pool.shape[1], kv_pool.shape[2]
    kh = kh2 // 2
    r = h // kh
    dt = q_SxHxDh.dtype
    m = page_table_SxM.shape[1]
    bp = min(pages_per_block, m)
    nb = -(-m // bp)
    if nb * bp != m:
        page_table_SxM = jnp.pad(page_table_SxM, ((0, 0), (0, nb * bp - m)))
    bt = bp * ps
    qg = q_SxHxDh.reshape(s, kh, r, dh)
    n_blocks = jnp.clip((jnp.max(lengths_S) + bt - 1) // bt, 0, nb)

    def body(j, carry):
        mx, den, acc = carry
        ids_SxBp = jax.lax.dynamic_slice_in_dim(page_table_SxM, j * bp, bp, axis=1)
        kv = kv_pool[ids_SxBp].reshape(s, bt, kh, 2, dh).astype(dt)
        sc = jnp.einsum("skrd,stkd->skrt", qg, kv[:, :, :, 0],
                        preferred_element_type=jnp.float32) * (dh ** -0.5)
        valid_SxT = (j * bt + jnp.arange(bt))[None, :] < lengths_S[:, None]
        allowed = valid_SxT[:, None, None, :]
        sc = jnp.where(allowed, sc, _NEG)
        m_new = jnp.maximum(mx, jnp.max(sc, axis=-1))
        p = jnp.where(allowed, jnp.exp(sc - m_new[..., None]), 0.0)
        corr = jnp.exp(mx - m_new)
        den = corr * den + jnp.sum(p, axis=-1)
        pv = jnp.einsum("skrt,stkd->skrd", p.astype(dt), kv[:, :, :, 1],
                        preferred_element_type=jnp.float32)
        return m_new, den, corr[..., None] * acc + pv

    init = (jnp.full((s, kh, r), _NEG, jnp.float32), jnp.zeros((s, kh, r), jnp.float32),
            jnp.zeros((s, kh, r, dh), jnp.float32))
    _, den, acc = jax.lax.fori_loop(0, n_blocks, body, init)
    out = acc / jnp.where(den > 0, den, 1.0)[..., None]
    return out.reshape(s, h, dh).astype(dt)


def trace_platform() -> str:
    """The platform a computation traced now is lowered for: the ``jax.default_device``
    in effect (a device or a platform name, as a deviceless TPU compile sets it), else the
    default backend."""
    dev = jax.config.jax_default_device
    if dev is None:
        return jax.default_backend()
    return dev if isinstance(dev, str) else dev.platform


def kernel_decode_args(page_table_SxM, lengths_S):
    """The ``ragged_paged_attention`` arguments for one query token per sequence.

    Returns ``(kv_lens [S], page_indices [S, M], cu_q_lens [S + 1], num_seqs [1])``, int32:
    sequence ``s`` owns query row ``s`` (``cu_q_lens = 0, 1, ..., S``) and all ``S`` sequences
    are live. The kernel needs ``kv_len >= q_len = 1``, so an empty sequence reads one token
    (of whatever page its table names; the engine's idle rows name the scratch page) and
    :func:`kernel_decode_attention` zeroes its output.
    """
    page_table_SxM = jnp.asarray(page_table_SxM, jnp.int32)
    lengths_S = jnp.asarray(lengths_S, jnp.int32)
    s = page_table_SxM.shape[0]
    return (jnp.maximum(lengths_S, 1), page_table_SxM, jnp.arange(s + 1, dtype=jnp.int32),
            jnp.full((1,), s, jnp.int32))


_KERNEL_KV_BUFFER_BYTES = 8 << 20


def kernel_supports(num_heads: int, num_kv_heads: int, head_dim: int, dtype) -> str | None:
    """Why ``ragged_paged_attention`` cannot take these shapes, or None when it can: the head
    width must be a multiple of the 128 TPU lanes and the ``2*Hkv`` combined heads must tile
    (1, 2, 4, 8 or a multiple of 8 rows of 32-bit words)."""
    if head_dim % 128:
        return f"head_dim {head_dim} is not a multiple of 128"
    if num_heads % num_kv_heads:
        return f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}"
    packing = 4 // jnp.dtype(dtype).itemsize
    rows, rem = divmod(2 * num_kv_heads, packing)
    if rem or not (rows in (1, 2, 4, 8) or rows % 8 == 0):
        return f"2 * num_kv_heads = {2 * num_kv_heads} does not tile for {jnp.dtype(dtype).name}"
    return None


def kernel_decode_attention(q_SxHxDh, kv_pool, page_table_SxM, lengths_S, *, kernel=None,
                            num_kv_pages_per_block: int | None = None,
                            num_queries_per_block: int | None = None):
    """:func:`paged_decode_attention` computed by ``ragged_paged_attention`` (jax's Pallas TPU
    kernel over the same ``[num_pages, page_size, 2*Hkv, Dh]`` pool), one query per sequence.

    The kernel visits, per sequence, only the pages its ``kv_len`` fills. It runs on TPU only;
    ``kernel`` swaps in a function of the same signature (jax's
    ``ref_ragged_paged_attention``, which runs anywhere but only outside ``jit``). Block sizes
    default to the kernel's own untuned defaults (128 pages, 32 queries, capped by the page-table
    width and ``S``), given explicitly because its tuned-table lookup asks the current device's
    kind, which a deviceless compile cannot answer; the page block is also capped so that the
    kernel's double-buffered key/value block stays within 8 MiB of the scoped VMEM (a
    ``[pages, 16, 16, 128]`` float32 pool with 128 pages per block runs out of it on v5p).

    Returns:
        ``[S, H, Dh]`` in ``q``'s dtype; exactly 0 for a sequence of length 0.
    """
    q_SxHxDh, kv_pool = jnp.asarray(q_SxHxDh), jnp.asarray(kv_pool)
    lengths_S = jnp.asarray(lengths_S, jnp.int32)
    s, _, dh = q_SxHxDh.shape
    m = page_table_SxM.shape[1]
    args = kernel_decode_args(page_table_SxM, lengths_S)
    scale = float(dh) ** -0.5
    if kernel is None:
        from jax.experimental.pallas.ops.tpu.ragged_paged_attention import (
            kernel as rpa,
        )

        if num_kv_pages_per_block is None:
            _, kv_heads_blk = rpa.get_min_heads_per_blk(q_SxHxDh.shape[1], kv_pool.shape[2],
                                                        q_SxHxDh.dtype, q_SxHxDh.dtype)
            page_bytes = kv_pool.shape[1] * kv_heads_blk * dh * q_SxHxDh.dtype.itemsize
            num_kv_pages_per_block = max(1, min(m, 128,
                                                _KERNEL_KV_BUFFER_BYTES // (2 * page_bytes)))
        out = rpa.ragged_paged_attention(
            q_SxHxDh, kv_pool.astype(q_SxHxDh.dtype), *args, sm_scale=scale,
            num_kv_pages_per_block=num_kv_pages_per_block,
            num_queries_per_block=num_queries_per_block or min(s, 32))
    else:
        out = kernel(q_SxHxDh, kv_pool.astype(q_SxHxDh.dtype), *args, sm_scale=scale)
    return jnp.where((lengths_S > 0)[:, None, None], out, jnp.zeros_like(out))


def decode_attention(q_SxHxDh, kv_pool, page_table_SxM, lengths_S, *, impl: str = "auto",
                     pages_per_block: int = 1):
    """Decode attention over paged keys and values, one interface on every platform.

    ``impl="auto"`` picks, at trace time (:func:`trace_platform`), the Pallas TPU kernel
    (:func:`kernel_decode_attention`) when tracing for a TPU and the kernel takes the shapes
    (:func:`kernel_supports`), else the pure-JAX ragged loop (:func:`paged_decode_attention`,
    ``pages_per_block`` pages per block); ``"jax"`` and ``"pallas"`` force one (``"pallas"``
    with shapes the kernel cannot take is a ``ValueError``). Both compute the same function
    (see :func:`paged_decode_attention`).
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"decode_attention: impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    h, dh = q_SxHxDh.shape[1:]
    why = kernel_supports(h, kv_pool.shape[2] // 2, dh, q_SxHxDh.dtype)
    if impl == "auto":
        impl = "pallas" if trace_platform() == "tpu" and why is None else "jax"
    if impl == "pallas":
        if why is not None:
            raise ValueError(f"decode_attention: the Pallas kernel cannot run here: {why} "
                             "(use impl='jax')")
        return kernel_decode_attention(q_SxHxDh, kv_pool, page_table_SxM, lengths_S)
    return paged_decode_attention(q_SxHxDh, kv_pool, page_table_SxM, lengths_S,
                                  pages_per_block=pages_per_block)


def _interleave_kv(k_BxKxTxDh, v_BxKxTxDh):
    """``[B, T, 2*Hkv, Dh]`` with keys of head j at 2j and values at 2j + 1."""
    b, kh, t, dh = k_BxKxTxDh.shape
    kv = jnp.stack([k_BxKxTxDh, v_BxKxTxDh], axis=2)  # [B, Hkv, 2, T, Dh]
    return jnp.transpose(kv, (0, 3, 1, 2, 4)).reshape(b, t, 2 * kh, dh)


# ---- device programs ---------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("num_layers", "shape", "dtype"))
def _init_pools(*, num_layers, shape, dtype):
    return [jnp.zeros(shape, dtype) for _ in range(num_layers)]


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("pools",))
def _prefill_jit(graphdef, state, pools, tokens_BxT, lens_B, pages_BxM):
    """Writes the keys and values of ``tokens[b, :lens[b]]`` (right-padded, positions 0..)
    into the pages ``pages[b]``; padded tokens go to the scratch page 0."""
    model = nnx.merge(graphdef, state)
    cfg = model.cfg
    b, t = tokens_BxT.shape
    ps = pools[0].shape[1]
    t_T = jnp.arange(t)
    positions_BxT = jnp.broadcast_to(t_T[None], (b, t))
    valid_BxT = t_T[None, :] < lens_B[:, None]
    page_BxT = jnp.where(valid_BxT, pages_BxM[:, t_T // ps], 0)
    off_BxT = jnp.broadcast_to(t_T % ps, (b, t))
    x = model.embedding[...][tokens_BxT].astype(_dtype(cfg))
    inv_freq = jnp.asarray(cfg.rope_inv_freq(), jnp.float32)
    new_pools = []
    for layer, pool in zip(model.layers, pools, strict=True):
        x, (k, v) = layer(x, positions_BxT, inv_freq, None, 0, valid_BxT)
        new_pools.append(pool.at[page_BxT, off_BxT].set(_interleave_kv(k, v).astype(pool.dtype)))
    return new_pools


_ROUND_STATIC = ("graphdef", "steps", "max_new_tokens", "top_k", "top_p", "greedy",
                 "pages_per_block", "attention")


@functools.partial(jax.jit, static_argnames=_ROUND_STATIC, donate_argnames=("pools",))
def _round_jit(graphdef, state, pools, page_table_SxM, pos_S, last_S, active_S, count_S, uid_S,
               gidx_S, copy_src_S, copy_dst_S, key, refill_at, shrink_at, temperature, eos_E,
               eos_bias, *, steps, max_new_tokens, top_k, top_p, greedy, pages_per_block,
               attention="auto"):
    """Up to ``steps`` decode steps of every active slot.

    Slot ``s`` holds ``pos[s]`` tokens in its pages and feeds ``last[s]`` at position ``pos[s]``;
    it has emitted ``count[s]`` completion tokens. First the pages ``copy_src`` are copied onto
    ``copy_dst`` (the copy-on-write of partial prompt pages; 0 -> 0 where none). The loop stops
    after ``steps`` steps, when no slot is active, once ``refill_at`` slots have finished, or
    once at most ``shrink_at`` slots are active (the host then moves them to fewer rows).

    Returns ``(pools, tokens [S, steps], logprobs [S, steps], count [S], active [S], steps run)``;
    slot ``s`` emitted its tokens at columns ``0..count_new - count_old - 1``.
    """
    model = nnx.merge(graphdef, state)
    cfg = model.cfg
    dt = _dtype(cfg)
    s = page_table_SxM.shape[0]
    ps = pools[0].shape[1]
    v = cfg.vocab_size
    pools = [pool.at[copy_dst_S].set(pool[copy_src_S]) for pool in pools]
    inv_freq = jnp.asarray(cfg.rope_inv_freq(), jnp.float32)
    is_eos_V = jnp.any(jnp.arange(v)[None, :] == eos_E[:, None], axis=0)
    base_keys = jax.vmap(lambda u, g: jax.random.fold_in(jax.random.fold_in(key, u), g))(
        uid_S, gidx_S)
    sample_one = functools.partial(_sample, greedy=greedy, temperature=temperature, top_k=top_k,
                                   top_p=top_p)
    n_active0 = jnp.sum(active_S.astype(jnp.int32))

    def decode(pools, tok_S, pos_S, active_S):
        page_S = jnp.take_along_axis(page_table_SxM, (pos_S // ps)[:, None], axis=1)[:, 0]
        page_S = jnp.where(active_S, page_S, 0)
        off_S = pos_S % ps
        lengths_S = jnp.where(active_S, pos_S + 1, 0)
        x = model.embedding[...][tok_S[:, None]].astype(dt)
        new_pools = []
        for layer, pool in zip(model.layers, pools, strict=True):
            q, k, vv = layer.qkv(x, pos_S[:, None], inv_freq)
            pool = pool.at[page_S, off_S].set(_interleave_kv(k, vv)[:, 0].astype(pool.dtype))
            att = decode_attention(q[:, 0], pool, page_table_SxM, lengths_S, impl=attention,
                                   pages_per_block=pages_per_block)
            x = layer.out(x, att[:, None])
            new_pools.append(pool)
        h = rms_norm(x[:, 0], model.final_norm[...], cfg.rms_norm_eps, dt)
        return model.logits(h), new_pools

    def cond(carry):
        i, _, _, _, active, _, _, _ = carry
        n_active = jnp.sum(active.astype(jnp.int32))
        return ((i < steps) & (n_active > 0) & (n_active0 - n_active < refill_at)
                & (n_active > shrink_at))

    def body(carry):
        i, pools, pos, last, active, count, tok_out, lp_out = carry
        logits_SxV, pools = decode(pools, last, pos, active)
        logits_SxV = logits_SxV + eos_bias * is_eos_V[None, :].astype(jnp.float32)
        keys = jax.vmap(jax.random.fold_in)(base_keys, count)
        tok, lp = jax.vmap(lambda lg, k: sample_one(lg[None], k))(logits_SxV, keys)
        tok, lp = tok[:, 0], lp[:, 0]
        tok_out = jax.lax.dynamic_update_slice_in_dim(tok_out, tok[:, None], i, axis=1)
        lp_out = jax.lax.dynamic_update_slice_in_dim(lp_out, lp[:, None], i, axis=1)
        step = active.astype(jnp.int32)
        count = count + step
        pos = pos + step
        last = jnp.where(active, tok, last)
        done = jnp.any(tok[:, None] == eos_E[None, :], axis=-1) | (count >= max_new_tokens)
        return i + 1, pools, pos, last, active & ~done, count, tok_out, lp_out

    init = (jnp.int32(0), pools, pos_S, last_S, active_S, count_S,
            jnp.zeros((s, steps), jnp.int32), jnp.zeros((s, steps), jnp.float32))
    i, pools, _, _, active, count, tok_out, lp_out = jax.lax.while_loop(cond, body, init)
    return pools, tok_out, lp_out, count, active, i


# ---- host scheduler ----------------------------------------------------------------------------


def _stop_at(completion, upto, stop_sequences):
    """The first index ``j < upto`` where a stop sequence ends in ``completion``, else None."""
    best = None
    for seq in stop_sequences:
        m = len(seq)
        for j in range(m - 1, upto):
            if tuple(completion[j - m + 1:j + 1]) == seq:
                best = j if best is None else min(best, j)
                break
    return best


def _take_rows(a, idx, b):
    """Rows ``idx`` of ``a`` then zero (inactive) rows, ``b`` in all."""
    out = np.zeros((b,) + a.shape[1:], a.dtype)
    out[:len(idx)] = a[idx]
    return out


_WARMED: set = set()  # signatures whose round and prefill programs are compiled


def size_buckets(n: int, smallest: int = 8) -> tuple[int, ...]:
    """Batch sizes the engine compiles for up to ``n`` rows: the powers of two from
    ``smallest`` below ``n``, then ``n``."""
    out, b = [], smallest
    while b < n:
        out.append(b)
        b *= 2
    return (*out, n)


def pool_pages(options: PagedOptions, *, num_samples: int, prompt_bucket: int,
               max_new_tokens: int) -> int:
    """Pages of each layer's pool (page 0, the scratch page, included)."""
    ps, sl = options.page_size, options.max_slots
    live_prompts = min(sl, -(-sl // num_samples) + 2)
    return 1 + sl * (-(-max_new_tokens // ps) + 1) + live_prompts * -(-prompt_bucket // ps)


@dataclasses.dataclass(frozen=True)
class FinishedPrompt:
    """The ``G`` completions of one prompt, as :meth:`PagedSession.run` returns them.

    Attributes:
        uid: the uid the prompt was submitted with.
        tokens: int32 ``[G, Tn]``, ``pad_id`` after each completion's end.
        logprobs: float32 ``[G, Tn]``, 0 after the end.
        mask: bool ``[G, Tn]``, True on the completion's tokens.
        lengths: int32 ``[G]`` completion lengths.
        truncated: bool ``[G]``: no EOS or stop sequence within the budget.
    """

    uid: int
    tokens: np.ndarray
    logprobs: np.ndarray
    mask: np.ndarray
    lengths: np.ndarray
    truncated: np.ndarray


_UID_LIMIT = 1 << 31  # uids are int32 on the device


class PagedSession:
    """The paged engine as a stream: prompts are submitted while decoding runs, and every
    prompt comes back as soon as its ``G`` samples have finished.

    One session owns one page pool and ``options.max_slots`` decode slots. :meth:`submit`
    queues prompts (host arrays ``[P, Tp]``, left-padded, ``Tp <=`` the session's prompt
    bucket) under caller-chosen uids; :meth:`run` runs rounds (admission into free slots as
    pages allow, prefill of newly admitted prompts, one ``_round_jit`` call) until a round
    finishes at least one prompt and returns the prompts finished in it, in finishing order.
    The samples of a prompt are drawn with the keys ``fold_in(fold_in(fold_in(key, uid), g),
    i)``, so they depend on ``(key, uid)`` only: not on the slot count, the submission order
    or the other prompts in flight. :meth:`cancel` drops everything waiting or in flight.

    All the session's programs (every row bucket's round, every prefill size) are compiled
    on construction, once per signature, so no later submit or session with the same shapes
    compiles anything.

    Args:
        graphdef, state: the model, from ``nnx.split``.
        key: the sampling key.
        num_samples: ``G``, completions per prompt.
        max_new_tokens: ``Tn``, the completion budget.
        temperature, top_k, top_p, greedy: sampling, as in ``generate``.
        eos_ids: tuple of EOS token ids; stop_sequences: tuple of token tuples.
        pad_id: the token after each completion's end.
        prompt_width: the widest prompt array to submit; the session holds prompts of
            ``bucket_length(prompt_width, buckets)`` tokens.
        buckets: prompt-length buckets (see ``bucket_length``).
        options: a :class:`PagedOptions`.
        eos_logit_bias: added to the EOS logits before sampling.
        time_prefill: wait for each prefill to finish so that ``prefill_seconds`` is its own
            time (a host sync per prefill; off, the prefill overlaps the host's page
            bookkeeping and its time is counted in ``round_seconds``).

    Attributes:
        stats: counters accumulated over the session: ``rounds``, ``decode_steps``,
            ``row_steps`` (rows computed x steps), ``useful_row_steps`` (tokens of the
            completions finished so far), ``prefill_calls``, ``prefilled_prompts``,
            ``cancelled_prompts``, ``pool_pages``, ``page_size``, ``max_slots``,
            ``pages_in_use_at_end`` (pages held now; 0 when idle), ``round_seconds`` and
            ``prefill_seconds``.
    """

    def __init__(self, graphdef, state, key, *, num_samples, max_new_tokens, temperature,
                 top_k, top_p, eos_ids, stop_sequences, greedy, pad_id, prompt_width, buckets,
                 options: PagedOptions, eos_logit_bias: float = 0.0,
                 time_prefill: bool = False):
        if not isinstance(options, PagedOptions):
            raise TypeError(f"options must be a PagedOptions, got {type(options).__name__}")
        for name, v in (("num_samples", num_samples), ("max_new_tokens", max_new_tokens),
                        ("prompt_width", prompt_width)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self._graphdef, self._state, self._key = graphdef, state, key
        model_cfg = nnx.merge(graphdef, state).cfg
        self._vocab = model_cfg.vocab_size
        self._g, self._tn = int(num_samples), int(max_new_tokens)
        self._pad = int(pad_id)
        self._stop_sequences = tuple(tuple(int(x) for x in s) for s in stop_sequences)
        self._eos_set = {int(e) for e in eos_ids}
        tb = bucket_length(int(prompt_width), buckets)
        self.prompt_bucket = tb
        sl, ps = options.max_slots, options.page_size
        self._sl, self._ps, self._steps = sl, ps, options.steps_per_sync
        self._mp = mp = -(-tb // ps)  # prompt pages per prompt (at most)
        width = -(-(tb + self._tn) // ps)  # page-table width
        live_prompts = min(sl, -(-sl // self._g) + 2)
        self._prompt_budget = live_prompts * mp
        self._num_pages = num_pages = pool_pages(options, num_samples=self._g, prompt_bucket=tb,
                                                 max_new_tokens=self._tn)
        self._pf = options.prefill_batch or min(16, -(-sl // self._g))
        self._row_buckets, self._pf_buckets = size_buckets(sl), size_buckets(self._pf)
        kh, dh = model_cfg.num_kv_heads, model_cfg.head_dim
        self._pools = _init_pools(num_layers=model_cfg.num_layers,
                                  shape=(num_pages, ps, 2 * kh, dh), dtype=_dtype(model_cfg))
        self._round_static = dict(steps=self._steps, max_new_tokens=self._tn, top_k=int(top_k),
                                  top_p=float(top_p), greedy=bool(greedy),
                                  pages_per_block=options.pages_per_block,
                                  attention=options.attention)
        eos_E = np.full(max(4, 1 << max(len(eos_ids) - 1, 0).bit_length()), -1, np.int32)
        eos_E[:len(eos_ids)] = eos_ids
        self._eos_E = eos_E
        self._temp = np.float32(1.0 if greedy else temperature)
        self._eos_bias = np.float32(eos_logit_bias)
        self._time_prefill = bool(time_prefill)

        # Compile every row bucket's round and every prefill size now (a round with no active
        # row runs no step, a prefill of empty prompts writes the scratch page only), so that
        # no later request mix compiles anything.
        sig = (graphdef, num_pages, ps, kh, dh, str(_dtype(model_cfg)), width, tb, mp,
               tuple(sorted(self._round_static.items())), len(eos_E))
        if sig not in _WARMED:
            for b in self._row_buckets:
                z = np.zeros(b, np.int32)
                self._run_round(np.zeros((b, width), np.int32), z, z, np.zeros(b, bool), z, z,
                                z, z, z, 1, 0)
            for b in self._pf_buckets:
                self._pools = _prefill_jit(graphdef, state, self._pools,
                                           np.full((b, tb), self._pad, np.int32),
                                           np.zeros(b, np.int32), np.zeros((b, mp), np.int32))
            _WARMED.add(sig)

        self._free_pages = list(range(num_pages - 1, 0, -1))
        # Per submitted, not yet returned prompt (insertion = submission order).
        self._prompts: dict[int, np.ndarray] = {}  # its tokens, without padding
        self._admitted: dict[int, int] = {}  # samples given a slot
        self._remaining: dict[int, int] = {}  # samples not finished
        self._out: dict[int, tuple] = {}  # (tokens, logprobs, lengths, ended), [G, ...]
        self._prompt_pages: dict[int, list[int]] = {}  # of the prompts with pages (admitted)
        self._partial_freed: set[int] = set()
        self._prompt_used = 0
        self._queue: collections.deque = collections.deque()  # (uid, g) waiting for a slot
        self._seen: set[int] = set()
        self._finished: list[FinishedPrompt] = []

        self._page_table = np.zeros((sl, width), np.int32)
        self._n_row_pages = np.zeros(sl, np.int64)
        self._own_pages: list[list[int]] = [[] for _ in range(sl)]
        self._pos = np.zeros(sl, np.int32)
        self._last = np.zeros(sl, np.int32)
        self._active = np.zeros(sl, bool)
        self._count = np.zeros(sl, np.int32)
        self._uid = np.zeros(sl, np.int32)
        self._gidx = np.zeros(sl, np.int32)
        self._busy = np.zeros(sl, bool)  # the slot holds a request
        self.stats = dict(rounds=0, decode_steps=0, row_steps=0, useful_row_steps=0,
                          prefill_calls=0, prefilled_prompts=0, cancelled_prompts=0,
                          pool_pages=num_pages, page_size=ps, max_slots=sl,
                          pages_in_use_at_end=0, round_seconds=0.0, prefill_seconds=0.0)

    # ---- public interface ----------------------------------------------------------------

    @property
    def outstanding(self) -> int:
        """Prompts submitted and not yet returned by :meth:`run` (nor cancelled)."""
        return len(self._remaining)

    def submit(self, prompt_tokens, prompt_mask, uids) -> None:
        """Queues prompts ``[P, Tp]`` (left-padded host arrays, ``Tp <= prompt_bucket``)
        under ``uids``: ``P`` distinct ints in ``[0, 2**31)`` never submitted to this session.
        Nothing is queued when any argument is refused."""
        tokens, mask = np.asarray(prompt_tokens), np.asarray(prompt_mask)
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"submit: prompt_tokens must be an int array [P, Tp], got "
                             f"{tokens.dtype}{tuple(tokens.shape)}")
        if mask.shape != tokens.shape or mask.dtype != np.bool_:
            raise ValueError(f"submit: prompt_mask must be a bool array of prompt_tokens' shape "
                             f"{tuple(tokens.shape)}, got {mask.dtype}{tuple(mask.shape)}")
        p_count, t = tokens.shape
        if t > self.prompt_bucket:
            raise ValueError(f"submit: prompts are {t} tokens wide, wider than this session's "
                             f"{self.prompt_bucket} (make a session with a larger prompt_width)")
        uid_list = list(uids)
        if len(uid_list) != p_count:
            raise ValueError(f"submit: got {len(uid_list)} uids for {p_count} prompts")
        for u in uid_list:
            if not isinstance(u, (int, np.integer)) or isinstance(u, bool) \
                    or not 0 <= u < _UID_LIMIT:
                raise ValueError(f"submit: uids must be ints in [0, 2**31), got {u!r}")
        uid_list = [int(u) for u in uid_list]
        if len(set(uid_list)) != p_count:
            raise ValueError("submit: uids must be distinct")
        reused = sorted(set(uid_list) & self._seen)
        if reused:
            raise ValueError(f"submit: uid {reused[0]} was already submitted to this session "
                             "(uids must be new)")
        if p_count and (t == 0 or not mask[:, -1].all()
                        or (np.diff(mask.astype(np.int8), axis=1) < 0).any()):
            raise ValueError("submit: prompt_mask must be left-padded and every prompt "
                             "non-empty (the last column True for every row)")
        if ((tokens < 0) | (tokens >= self._vocab))[mask].any():
            raise ValueError(f"submit: prompt tokens must be in [0, {self._vocab})")
        lens = mask.sum(axis=1)
        g, tn = self._g, self._tn
        for p, u in enumerate(uid_list):
            self._seen.add(u)
            self._prompts[u] = tokens[p, t - lens[p]:].astype(np.int32)
            self._admitted[u] = 0
            self._remaining[u] = g
            self._out[u] = (np.full((g, tn), self._pad, np.int32), np.zeros((g, tn), np.float32),
                            np.zeros(g, np.int32), np.zeros(g, bool))
            self._queue.extend((u, j) for j in range(g))

    def run(self) -> list[FinishedPrompt]:
        """Runs rounds until one finishes at least one prompt; returns the prompts finished so
        far and not yet returned, in finishing order, or ``[]`` when nothing is waiting or in
        flight."""
        try:
            while not self._finished:
                if not self._round():
                    break
            out, self._finished = self._finished, []
            return out
        finally:
            self._update_page_stats()

    def cancel(self) -> list[int]:
        """Drops every waiting and in-flight prompt, frees their slots and pages, and returns
        their uids (in submission order). The session stays usable."""
        for s in np.flatnonzero(self._busy):
            self._free_pages.extend(self._own_pages[s])
            self._own_pages[s] = []
        self._busy[:] = False
        self._active[:] = False
        for u in list(self._prompt_pages):
            self._release_prompt(u)
        self._queue.clear()
        dropped = list(self._remaining)
        for d in (self._prompts, self._admitted, self._remaining, self._out):
            d.clear()
        self.stats["cancelled_prompts"] += len(dropped)
        self._update_page_stats()
        return dropped

    # ---- internals -------------------------------------------------------------------------

    def _run_round(self, page_table_r, pos_r, last_r, active_r, count_r, uid_r, gidx_r, src_r,
                   dst_r, refill_at, shrink_at):
        self._pools, *out = _round_jit(
            self._graphdef, self._state, self._pools, page_table_r, pos_r, last_r, active_r,
            count_r, uid_r, gidx_r, src_r, dst_r, self._key, np.int32(refill_at),
            np.int32(shrink_at), self._temp, self._eos_E, self._eos_bias, **self._round_static)
        return out

    def _update_page_stats(self):
        self.stats["pages_in_use_at_end"] = self._num_pages - 1 - len(self._free_pages)

    def _release_prompt(self, u):
        pages = self._prompt_pages.pop(u)
        keep = pages if u not in self._partial_freed else pages[:-1]
        self._partial_freed.discard(u)
        self._free_pages.extend(keep)
        self._prompt_used -= len(pages)

    def _round(self) -> bool:
        """Admits waiting requests, prefills, runs one round and collects its tokens; False
        (and nothing run) when no slot is live."""
        sl, ps, steps, g_count, tn = self._sl, self._ps, self._steps, self._g, self._tn
        free_pages, page_table, own_pages = self._free_pages, self._page_table, self._own_pages
        pos, last, active, count = self._pos, self._last, self._active, self._count
        st = self.stats
        copy_src = np.zeros(sl, np.int32)
        copy_dst = np.zeros(sl, np.int32)
        to_prefill = []
        for s in np.flatnonzero(~self._busy):
            if not self._queue:
                break
            u, g = self._queue[0]
            lp = len(self._prompts[u]) - 1  # tokens prefilled; the last: the first step's input
            if u not in self._prompt_pages:
                need = -(-lp // ps)
                if self._prompt_used + need > self._prompt_budget:
                    break
                self._prompt_pages[u] = [free_pages.pop() for _ in range(need)]
                self._prompt_used += need
                if lp:
                    to_prefill.append(u)
            self._queue.popleft()
            pages = self._prompt_pages[u]
            full, rem = divmod(lp, ps)
            page_table[s] = 0
            page_table[s, :full] = pages[:full]
            own_pages[s] = []
            if rem:
                own = free_pages.pop()
                page_table[s, full] = own
                copy_src[s], copy_dst[s] = pages[full], own
                own_pages[s].append(own)
            self._n_row_pages[s] = full + (1 if rem else 0)
            pos[s], last[s], active[s], count[s] = lp, self._prompts[u][-1], True, 0
            self._uid[s], self._gidx[s], self._busy[s] = u, g, True
            self._admitted[u] += 1
        if not active.any():
            return False
        t0 = time.perf_counter()
        pf, tb, mp = self._pf, self.prompt_bucket, self._mp
        for c in range(0, len(to_prefill), pf):
            chunk = to_prefill[c:c + pf]
            b = next(x for x in self._pf_buckets if x >= len(chunk))
            ptok = np.full((b, tb), self._pad, np.int32)
            plen = np.zeros(b, np.int32)
            ppages = np.zeros((b, mp), np.int32)
            for i, u in enumerate(chunk):
                lp = len(self._prompts[u]) - 1
                ptok[i, :lp] = self._prompts[u][:lp]
                plen[i] = lp
                ppages[i, :len(self._prompt_pages[u])] = self._prompt_pages[u]
            self._pools = _prefill_jit(self._graphdef, self._state, self._pools, ptok, plen,
                                       ppages)
            st["prefill_calls"] += 1
            st["prefilled_prompts"] += len(chunk)
        if to_prefill and self._time_prefill:  # time the prefill apart from the round
            jax.block_until_ready(self._pools)
            st["prefill_seconds"] += time.perf_counter() - t0
        for s in np.flatnonzero(active):  # pages for this round's tokens
            last_pos = min(int(pos[s]) + steps - 1,
                           len(self._prompts[int(self._uid[s])]) - 1 + tn - 1)
            while self._n_row_pages[s] * ps <= last_pos:
                page = free_pages.pop()
                page_table[s, self._n_row_pages[s]] = page
                own_pages[s].append(page)
                self._n_row_pages[s] += 1
        t0 = time.perf_counter()
        waiting = len(self._queue)
        refill_at = (sl + 1) if not waiting else max(1, min(waiting, sl // 8))
        # The live slots run in the smallest row bucket that holds them: a round stops once
        # they fit the next smaller bucket (nothing waiting), so finished rows stop computing.
        rows_idx = np.flatnonzero(active)
        b = next(x for x in self._row_buckets if x >= len(rows_idx))
        smaller = [x for x in self._row_buckets if x < b]
        shrink_at = smaller[-1] if smaller and not waiting else 0
        tok_r, lp_r, count_r, active_r, i_r = self._run_round(
            *(_take_rows(a, rows_idx, b) for a in (page_table, pos, last, active, count,
                                                   self._uid, self._gidx, copy_src, copy_dst)),
            refill_at, shrink_at)
        tok_r, lp_r, count_r, active_r = (np.asarray(a) for a in (tok_r, lp_r, count_r,
                                                                   active_r))
        st["rounds"] += 1
        st["decode_steps"] += int(i_r)
        st["row_steps"] += b * int(i_r)
        st["round_seconds"] += time.perf_counter() - t0
        for u in self._prompt_pages:
            if self._admitted[u] == g_count and u not in self._partial_freed \
                    and (len(self._prompts[u]) - 1) % ps:
                # every sample holds its own copy of the partial page now
                free_pages.append(self._prompt_pages[u][-1])
                self._partial_freed.add(u)
        for j, s in enumerate(rows_idx):
            u, g = int(self._uid[s]), int(self._gidx[s])
            o_tok, o_lp, o_len, o_ended = self._out[u]
            c0, c1 = int(count[s]), int(count_r[j])
            o_tok[g, c0:c1] = tok_r[j, :c1 - c0]
            o_lp[g, c0:c1] = lp_r[j, :c1 - c0]
            stop = (_stop_at(o_tok[g], c1, self._stop_sequences) if self._stop_sequences
                    else None)
            if stop is not None and stop < c1:
                o_tok[g, stop + 1:] = self._pad
                o_lp[g, stop + 1:] = 0.0
                o_len[g], o_ended[g], done = stop + 1, True, True
            else:
                eos = c1 > c0 and int(tok_r[j, c1 - c0 - 1]) in self._eos_set
                done = (not active_r[j]) or c1 >= tn
                o_len[g], o_ended[g] = c1, eos
            if done:
                free_pages.extend(own_pages[s])
                own_pages[s] = []
                self._busy[s] = False
                active[s] = False
                st["useful_row_steps"] += int(o_len[g])
                self._remaining[u] -= 1
                if self._remaining[u] == 0:
                    self._release_prompt(u)
                    self._finish(u)
            else:
                pos[s] += c1 - c0
                last[s] = tok_r[j, c1 - c0 - 1] if c1 > c0 else last[s]
                count[s] = c1
        return True

    def _finish(self, u):
        o_tok, o_lp, o_len, o_ended = self._out.pop(u)
        del self._prompts[u], self._admitted[u], self._remaining[u]
        mask = np.arange(self._tn)[None, :] < o_len[:, None]
        self._finished.append(FinishedPrompt(
            uid=u, tokens=o_tok, logprobs=np.where(mask, o_lp, 0.0).astype(np.float32),
            mask=mask, lengths=o_len, truncated=~o_ended))


def generate_paged(graphdef, state, prompt_tokens, prompt_mask, key, *, num_samples,
                   max_new_tokens, temperature, top_k, top_p, eos_ids, stop_sequences, greedy,
                   pad_id, buckets, options: PagedOptions, eos_logit_bias: float = 0.0,
                   stats: dict | None = None) -> Rollout:
    """The paged engine behind ``generate_functional(..., engine="paged")``: one
    :class:`PagedSession`, every prompt submitted with its index as uid, run until empty.

    The arguments are already validated there; ``prompt_tokens`` / ``prompt_mask`` are host
    arrays ``[P, Tp]`` (left-padded). ``stats``, when given, receives the session's counters
    (rounds, decode steps, prefill calls, pool pages).
    """
    tokens = np.asarray(prompt_tokens, np.int32)
    mask = np.asarray(prompt_mask, bool)
    p_count, t = tokens.shape
    session = PagedSession(
        graphdef, state, key, num_samples=num_samples, max_new_tokens=max_new_tokens,
        temperature=temperature, top_k=top_k, top_p=top_p, eos_ids=eos_ids,
        stop_sequences=stop_sequences, greedy=greedy, pad_id=pad_id, prompt_width=t,
        buckets=buckets, options=options, eos_logit_bias=eos_logit_bias,
        time_prefill=stats is not None)
    session.submit(tokens, mask, range(p_count))
    done: dict[int, FinishedPrompt] = {}
    while session.outstanding:
        finished = session.run()
        assert finished, "the paged session stalled with prompts outstanding"
        done.update((f.uid, f) for f in finished)
    if stats is not None:
        stats.update({k: v for k, v in session.stats.items() if k != "cancelled_prompts"})
    rows = [done[p] for p in range(p_count)]
    g_count, tn = num_samples, max_new_tokens

    def stack(name, shape, dtype):
        if not rows:
            return np.zeros(shape, dtype)
        return np.stack([getattr(f, name) for f in rows]).astype(dtype)

    # device_put, not jnp.asarray: the latter compiles a staging program per new shape.
    return jax.device_put(Rollout(
        tokens=stack("tokens", (0, g_count, tn), np.int32),
        logprobs=stack("logprobs", (0, g_count, tn), np.float32),
        mask=stack("mask", (0, g_count, tn), bool),
        lengths=stack("lengths", (0, g_count), np.int32),
        truncated=stack("truncated", (0, g_count), bool),
    ))


def kv_bytes(options: PagedOptions, model_cfg, *, num_samples, prompt_bucket,
             max_new_tokens) -> int:
    """Bytes of every layer's page pool (the engine's whole KV cache)."""
    pages = pool_pages(options, num_samples=num_samples, prompt_bucket=prompt_bucket,
                       max_new_tokens=max_new_tokens)
    itemsize = 2 if model_cfg.dtype == "bfloat16" else 4
    return (model_cfg.num_layers * pages * options.page_size * 2 * model_cfg.num_kv_heads
            * model_cfg.head_dim * itemsize)


__all__ = ["ATTENTION_IMPLS", "FinishedPrompt", "PagedOptions", "PagedSession",
           "decode_attention", "generate_paged", "kernel_decode_args", "kernel_decode_attention",
           "kernel_supports", "kv_bytes", "paged_decode_attention", "pool_pages", "size_buckets",
           "trace_platform"]
