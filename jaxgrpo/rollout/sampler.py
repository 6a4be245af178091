"""Jitted KV-cache sampler: prefill once per prompt, then a ``lax.while_loop`` decode for G samples.

Layout: prompts ``[P, Tp]`` are left-padded (``prompt_mask`` marks real tokens), then padded on
the left up to the next length bucket so that calls with similar prompt lengths share one
compiled program. The prompt is prefilled once per prompt ``[P]``; its KV cache is repeated to
``N = P*G`` rows (row ``n = p*G + g``) and the decode loop writes one token per step into slot
``Tp + i`` with ``dynamic_update_slice``. The loop exits early once every row is done.

Log-probs: ``logprobs[p, g, i]`` is the log-probability of the sampled token under the
distribution it was actually drawn from, i.e. ``log_softmax(logits / temperature)`` after the
top-k and top-p filters (temperature *included*). With ``temperature=1``, ``top_k=0``,
``top_p=1`` it equals the teacher-forced ``log_softmax(model(seq))`` of the token. In greedy mode
the temperature and filters are ignored and the log-prob is that of the argmax token under
``log_softmax(logits)``.

Sharding: under a mesh context (``jax.set_mesh``) the KV cache of every layer is pinned to
``jaxgrpo.sharding.kv_cache_spec`` (rows over ``("data", "fsdp")``, KV heads or else cache slots
over ``tensor``) at prefill and at every decode step.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgrpo.sharding import constrain_kv_cache

DEFAULT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
ENGINES = ("static", "paged")  # the static batch below; the paged engine (rollout.engine)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Rollout:
    """Sampled completions, laid out ``[P, G, Tn]`` (Tn = max_new_tokens)."""

    tokens: jax.Array  # int32 [P, G, Tn], pad_id after the end
    logprobs: jax.Array  # float32 [P, G, Tn], sampler log-prob of each token, 0 after the end
    mask: jax.Array  # bool [P, G, Tn], completion tokens up to and including EOS / stop sequence
    lengths: jax.Array  # int32 [P, G], number of completion tokens (mask.sum(-1))
    truncated: jax.Array  # bool [P, G], no EOS or stop sequence within max_new_tokens


def bucket_length(length: int, buckets=DEFAULT_BUCKETS) -> int:
    """The smallest bucket >= ``length`` (or ``length`` rounded up to a multiple of the largest)."""
    for b in sorted(buckets):
        if length <= b:
            return b
    top = max(buckets)
    return -(-length // top) * top


def _sample(logits_NxV, key, *, greedy, temperature, top_k, top_p):
    """Sample one token per row; return ``(token [N], logprob [N])`` (see module docstring)."""
    logits_NxV = logits_NxV.astype(jnp.float32)
    if greedy:
        tok_N = jnp.argmax(logits_NxV, axis=-1).astype(jnp.int32)
        logp_NxV = jax.nn.log_softmax(logits_NxV, axis=-1)
        return tok_N, jnp.take_along_axis(logp_NxV, tok_N[:, None], axis=-1)[:, 0]
    logp_NxV = _filtered_logprobs(logits_NxV, temperature=temperature, top_k=top_k, top_p=top_p)
    tok_N = _inverse_cdf(jnp.exp(logp_NxV), key)
    return tok_N, jnp.take_along_axis(logp_NxV, tok_N[:, None], axis=-1)[:, 0]


def _filtered_logprobs(logits_NxV, *, temperature, top_k, top_p):
    """``log_softmax`` of ``logits / temperature`` after the top-k, then the top-p filter: the
    distribution ``_sample`` draws from (``-inf`` on the removed tokens)."""
    scaled = logits_NxV.astype(jnp.float32) / temperature
    if top_k:
        kth_Nx1 = jax.lax.top_k(scaled, top_k)[0][:, -1:]
        scaled = jnp.where(scaled < kth_Nx1, -jnp.inf, scaled)
    if top_p < 1.0:
        sorted_NxV = jnp.sort(scaled, axis=-1)[:, ::-1]
        probs_sorted = jax.nn.softmax(sorted_NxV, axis=-1)
        before_NxV = jnp.cumsum(probs_sorted, axis=-1) - probs_sorted  # mass strictly above
        keep_NxV = before_NxV < top_p
        thresh_Nx1 = jnp.min(jnp.where(keep_NxV, sorted_NxV, jnp.inf), axis=-1, keepdims=True)
        scaled = jnp.where(scaled < thresh_Nx1, -jnp.inf, scaled)
    return jax.nn.log_softmax(scaled, axis=-1)


def _inverse_cdf(probs_NxV, key, block: int = 128):
    """One draw per row from unnormalised ``probs`` with one uniform per row (see below)."""
    return _inverse_cdf_at(probs_NxV, jax.random.uniform(key, (probs_NxV.shape[0],), jnp.float32),
                           block)


def _first_above(cdf_NxK, mass_NxK, x_N):
    """Index of the first entry with positive mass whose cumulative mass exceeds ``x``; the last
    entry with positive mass when none does (float rounding near the total)."""
    pos_NxK = mass_NxK > 0
    hit_NxK = (cdf_NxK > x_N[:, None]) & pos_NxK
    last_N = mass_NxK.shape[-1] - 1 - jnp.argmax(pos_NxK[:, ::-1], axis=-1)
    return jnp.where(jnp.any(hit_NxK, axis=-1), jnp.argmax(hit_NxK, axis=-1), last_N)


def _inverse_cdf_at(probs_NxV, u_N, block: int = 128):
    """The inverse-CDF draw of ``_inverse_cdf`` for given uniforms ``u`` in ``[0, 1)``.

    Two-level inverse CDF: find the block of ``block`` tokens, then the token inside it. This
    avoids a cumulative sum over the whole vocabulary (slow on CPU) and Gumbel noise over ``V``
    (``jax.random.categorical`` is 30-50x slower on CPU at 16-256 rows x 8,192 tokens:
    ``benchmarks/sampler_draw.py``, ``benchmarks/results/sampler/draw_cpu.json``). Both levels
    only ever select an entry of positive mass, so a token of probability 0 (one removed by
    top-k or top-p) is never returned, whatever the rounding of the two cumulative sums: a
    uniform that rounding places past the block's or the row's last positive entry takes that
    entry instead. The draw's distribution is the normalised ``probs`` up to float32 rounding of
    the cumulative sums.
    """
    n, v = probs_NxV.shape
    nb = -(-v // block)
    if nb * block != v:
        probs_NxV = jnp.pad(probs_NxV, ((0, 0), (0, nb * block - v)))
    blocks_NxBxK = probs_NxV.reshape(n, nb, block)
    bsum_NxB = jnp.sum(blocks_NxBxK, axis=-1)
    bcdf_NxB = jnp.cumsum(bsum_NxB, axis=-1)
    x_N = u_N.astype(jnp.float32) * bcdf_NxB[:, -1]
    bi_N = _first_above(bcdf_NxB, bsum_NxB, x_N)
    within_NxK = jnp.take_along_axis(blocks_NxBxK, bi_N[:, None, None], axis=1)[:, 0]
    before_N = jnp.take_along_axis(bcdf_NxB - bsum_NxB, bi_N[:, None], axis=1)[:, 0]
    wi_N = _first_above(jnp.cumsum(within_NxK, axis=-1), within_NxK, x_N - before_N)
    return (bi_N * block + wi_N).astype(jnp.int32)


# Static knobs select the program; temperature and the EOS ids are traced values, so changing
# them does not recompile (the EOS list is padded with -1 to a power-of-two length >= 4).
_STATIC = ("graphdef", "num_samples", "max_new_tokens", "top_k", "top_p", "stop_sequences",
           "greedy", "pad_id")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _generate_jit(graphdef, state, tokens_PxT, mask_PxT, key, temperature, eos_E, *,
                  num_samples, max_new_tokens, top_k, top_p, stop_sequences, greedy, pad_id,
                  eos_bias=0.0):
    model = nnx.merge(graphdef, state)
    p, tp = tokens_PxT.shape
    g, tn = num_samples, max_new_tokens
    n, s = p * g, tp + max_new_tokens
    is_eos_1xV = jnp.any(jnp.arange(model.cfg.vocab_size)[None, :] == eos_E[:, None], axis=0,
                         keepdims=True)

    def sample(logits_NxV, key):
        logits_NxV = logits_NxV + eos_bias * is_eos_1xV.astype(jnp.float32)
        return _sample(logits_NxV, key, greedy=greedy, temperature=temperature, top_k=top_k,
                       top_p=top_p)

    positions_PxT = jnp.maximum(jnp.cumsum(mask_PxT.astype(jnp.int32), axis=1) - 1, 0)
    key_valid_PxS = jnp.concatenate([mask_PxT, jnp.zeros((p, tn), bool)], axis=1)
    hidden, cache = model.forward_cached(tokens_PxT, positions_PxT,
                                         constrain_kv_cache(model.init_cache(p, s)),
                                         jnp.int32(0), key_valid_PxS)
    cache = constrain_kv_cache(cache)
    logits_PxV = model.logits(hidden[:, -1])

    def rep(x):
        return jnp.repeat(x, g, axis=0)

    cache = constrain_kv_cache(jax.tree.map(rep, cache))
    key_valid_NxS = rep(key_valid_PxS)
    prompt_len_N = rep(jnp.sum(mask_PxT.astype(jnp.int32), axis=1))

    def finished(tokens_NxTn, tok_N, i):
        done_N = jnp.any(tok_N[:, None] == eos_E[None, :], axis=-1)
        for seq in stop_sequences:
            m = len(seq)
            start = jnp.maximum(i - m + 1, 0)
            window = jax.lax.dynamic_slice_in_dim(tokens_NxTn, start, m, axis=1)
            hit = jnp.all(window == jnp.asarray(seq, jnp.int32)[None, :], axis=-1)
            done_N = done_N | (hit & (i >= m - 1))
        return done_N

    def emit(carry, tok_N, lp_N, i):
        tokens_NxTn, logp_NxTn, mask_NxTn, done_N = carry
        alive_N = ~done_N
        tok_N = jnp.where(alive_N, tok_N, pad_id)
        tokens_NxTn = jax.lax.dynamic_update_slice_in_dim(tokens_NxTn, tok_N[:, None], i, axis=1)
        logp_NxTn = jax.lax.dynamic_update_slice_in_dim(
            logp_NxTn, jnp.where(alive_N, lp_N, 0.0)[:, None], i, axis=1)
        mask_NxTn = jax.lax.dynamic_update_slice_in_dim(mask_NxTn, alive_N[:, None], i, axis=1)
        done_N = done_N | finished(tokens_NxTn, tok_N, i)
        return tokens_NxTn, logp_NxTn, mask_NxTn, done_N

    out0 = (jnp.full((n, tn), pad_id, jnp.int32), jnp.zeros((n, tn), jnp.float32),
            jnp.zeros((n, tn), bool), jnp.zeros((n,), bool))
    tok_N, lp_N = sample(rep(logits_PxV), jax.random.fold_in(key, 0))
    out0 = emit(out0, tok_N, lp_N, 0)

    def cond(carry):
        i, _, _, out = carry
        return (i < tn) & ~jnp.all(out[3])

    def body(carry):
        i, cache, key_valid_NxS, out = carry
        slot = tp + i - 1
        prev_N = jax.lax.dynamic_index_in_dim(out[0], i - 1, axis=1, keepdims=False)
        key_valid_NxS = jax.lax.dynamic_update_slice_in_dim(
            key_valid_NxS, jnp.ones((n, 1), bool), slot, axis=1)
        hidden, cache = model.forward_cached(prev_N[:, None], (prompt_len_N + i - 1)[:, None],
                                             cache, slot, key_valid_NxS)
        cache = constrain_kv_cache(cache)
        tok_N, lp_N = sample(model.logits(hidden[:, 0]), jax.random.fold_in(key, i))
        return i + 1, cache, key_valid_NxS, emit(out, tok_N, lp_N, i)

    _, _, _, (tokens, logp, mask, done) = jax.lax.while_loop(
        cond, body, (jnp.int32(1), cache, key_valid_NxS, out0))
    return Rollout(
        tokens=tokens.reshape(p, g, tn),
        logprobs=logp.reshape(p, g, tn),
        mask=mask.reshape(p, g, tn),
        lengths=jnp.sum(mask.astype(jnp.int32), axis=-1).reshape(p, g),
        truncated=(~done).reshape(p, g),
    )


def _check_int_tuple(name, value, vocab_size):
    out = tuple(int(v) for v in value)
    if any(v < 0 or v >= vocab_size for v in out):
        raise ValueError(f"{name} must hold token ids in [0, {vocab_size}), got {value!r}")
    return out


def generate_functional(graphdef, state, prompt_tokens, prompt_mask, key, *, num_samples: int = 1,
                        max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                        top_p: float = 1.0, eos_ids=(), stop_sequences=(), greedy: bool = False,
                        pad_id: int = 0, buckets=DEFAULT_BUCKETS,
                        row_sharding: jax.sharding.NamedSharding | None = None,
                        engine: str = "static", paged=None,
                        eos_logit_bias: float = 0.0) -> Rollout:
    """``generate`` for a model held as ``(graphdef, state)`` from ``nnx.split`` (the trainer's
    form). Arguments as in ``generate``, plus:

    Args:
        row_sharding: a ``NamedSharding`` of the ``[P, Tp]`` prompts over a mesh (rows split,
            e.g. ``jaxgrpo.sharding.batch_sharding(mesh, 2)``). The prompts are then *this
            process's* rows (host arrays, the same ``Tp`` on every process); the global batch
            is assembled with ``jax.make_array_from_process_local_data`` and every array of the
            returned ``Rollout`` is a global array with its rows split the same way.
            The static engine only.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if not isinstance(eos_logit_bias, (int, float)) or not np.isfinite(eos_logit_bias):
        raise ValueError(f"eos_logit_bias must be a finite number, got {eos_logit_bias!r}")
    if engine == "paged":
        from jaxgrpo.rollout.engine import PagedOptions

        if paged is None:
            paged = PagedOptions()
        elif not isinstance(paged, PagedOptions):
            raise TypeError(f"paged must be a PagedOptions, got {type(paged).__name__}")
        if row_sharding is not None or (isinstance(prompt_tokens, jax.Array) and isinstance(
                getattr(prompt_tokens, "sharding", None), jax.sharding.NamedSharding)):
            raise ValueError("engine 'paged' runs on one device: pass host prompts and no "
                             "row_sharding (use engine 'static' on a mesh)")
        if isinstance(prompt_tokens, jax.core.Tracer) or isinstance(prompt_mask, jax.core.Tracer):
            raise ValueError("engine 'paged' schedules on the host: prompts must be concrete "
                             "arrays, not traced values")
    vocab_size = int(jax.tree.leaves(state["embedding"])[0].shape[0])
    process_local = row_sharding is not None
    if process_local:
        if not isinstance(row_sharding, jax.sharding.NamedSharding):
            raise TypeError(f"row_sharding must be a NamedSharding, got "
                            f"{type(row_sharding).__name__}")
        if isinstance(prompt_tokens, jax.core.Tracer) or isinstance(prompt_mask, jax.core.Tracer):
            raise ValueError("row_sharding needs host (NumPy) prompts, not traced values")
    elif (isinstance(prompt_tokens, jax.Array) and not isinstance(prompt_tokens, jax.core.Tracer)
          and isinstance(prompt_tokens.sharding, jax.sharding.NamedSharding)):
        # Prompts given as a sharded global array keep that (row) sharding through the padding.
        row_sharding = prompt_tokens.sharding
    if not isinstance(prompt_tokens, jax.core.Tracer):
        prompt_tokens = np.asarray(prompt_tokens)
    if not isinstance(prompt_mask, jax.core.Tracer):
        prompt_mask = np.asarray(prompt_mask)
    if prompt_tokens.ndim != 2 or not jnp.issubdtype(prompt_tokens.dtype, jnp.integer):
        raise ValueError(f"prompt_tokens must be an int32 array [P, Tp], got "
                         f"{prompt_tokens.dtype}{tuple(prompt_tokens.shape)}")
    if prompt_mask.shape != prompt_tokens.shape:
        raise ValueError(f"prompt_mask must have the shape of prompt_tokens "
                         f"{tuple(prompt_tokens.shape)}, got {tuple(prompt_mask.shape)}")
    if prompt_mask.dtype != jnp.bool_:
        raise TypeError(f"prompt_mask must be bool, got {prompt_mask.dtype}")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature must be > 0 (use greedy=True for argmax), got {temperature}")
    if not isinstance(top_k, int) or top_k < 0 or top_k > vocab_size:
        raise ValueError(f"top_k must be an int in [0, {vocab_size}] (0 = off), got {top_k!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p}")
    eos_ids = _check_int_tuple("eos_ids", eos_ids, vocab_size)
    stop_sequences = tuple(_check_int_tuple("stop_sequences", s, vocab_size)
                           for s in stop_sequences)
    if any(len(s) == 0 for s in stop_sequences):
        raise ValueError("stop_sequences must not contain an empty sequence")
    if not isinstance(prompt_mask, jax.core.Tracer):
        m = np.asarray(prompt_mask)
        if not m[:, -1].all():
            raise ValueError("prompt_mask: every prompt must be left-padded and non-empty "
                             "(the last column must be True for every row)")
        if (np.diff(m.astype(np.int8), axis=1) < 0).any():
            raise ValueError("prompt_mask: prompts must be left-padded (padding only on the left)")
    if engine == "paged":
        from jaxgrpo.rollout.engine import generate_paged

        return generate_paged(
            graphdef, state, prompt_tokens, prompt_mask, key, num_samples=num_samples,
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=int(top_k),
            top_p=float(top_p), eos_ids=eos_ids, stop_sequences=stop_sequences,
            greedy=bool(greedy), pad_id=int(pad_id), buckets=buckets, options=paged,
            eos_logit_bias=float(eos_logit_bias))
    p, t = prompt_tokens.shape
    tb = bucket_length(t, buckets)
    # Pad on the host when the prompts are concrete: eager jnp ops would compile per shape.
    xp = jnp if isinstance(prompt_tokens, jax.core.Tracer) else np
    if tb > t:
        prompt_tokens = xp.concatenate(
            [xp.full((p, tb - t), pad_id, prompt_tokens.dtype), prompt_tokens], axis=1)
        prompt_mask = xp.concatenate([xp.zeros((p, tb - t), bool), prompt_mask], axis=1)
    if process_local:
        shape = (p * jax.process_count(), tb)
        prompt_tokens, prompt_mask = (
            jax.make_array_from_process_local_data(row_sharding, np.asarray(a), shape)
            for a in (prompt_tokens.astype(np.int32), prompt_mask))
    elif row_sharding is not None:
        prompt_tokens, prompt_mask = jax.device_put((prompt_tokens.astype(np.int32), prompt_mask),
                                                    row_sharding)
    eos_E = np.full(max(4, 1 << max(len(eos_ids) - 1, 0).bit_length()), -1, np.int32)
    eos_E[:len(eos_ids)] = eos_ids
    out = _generate_jit(
        graphdef, state, prompt_tokens.astype(xp.int32), prompt_mask, key,
        np.float32(1.0 if greedy else temperature), eos_E,
        num_samples=num_samples, max_new_tokens=max_new_tokens, top_k=int(top_k),
        top_p=float(top_p), stop_sequences=stop_sequences, greedy=bool(greedy),
        pad_id=int(pad_id), eos_bias=np.float32(eos_logit_bias))
    if process_local:
        rows = row_sharding.spec[0] if len(row_sharding.spec) else None
        out = jax.tree.map(lambda a: jax.device_put(a, jax.sharding.NamedSharding(
            row_sharding.mesh, jax.sharding.PartitionSpec(rows, *([None] * (a.ndim - 1))))), out)
    return out


def generate(model, prompt_tokens, prompt_mask, key, *, num_samples: int = 1,
             max_new_tokens: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_ids=(), stop_sequences=(), greedy: bool = False, pad_id: int = 0,
             buckets=DEFAULT_BUCKETS, engine: str = "static", paged=None,
             eos_logit_bias: float = 0.0) -> Rollout:
    """Sample ``num_samples`` completions per prompt with a jitted KV-cache decode loop.

    Args:
        model: a ``jaxgrpo.model.Transformer``.
        prompt_tokens: int32 ``[P, Tp]``, left-padded.
        prompt_mask: bool ``[P, Tp]``, True on real prompt tokens (each row non-empty).
        key: PRNG key; the result is a deterministic function of it.
        num_samples: G completions per prompt.
        max_new_tokens: Tn, the completion budget.
        temperature: softmax temperature (> 0), included in the returned log-probs.
        top_k: keep the k largest logits (0 = off; ties at the k-th value are kept).
        top_p: nucleus sampling mass (1 = off).
        eos_ids: token ids that end a completion (the EOS token is part of it).
        stop_sequences: tuples of token ids that end a completion when generated (kept in it).
        greedy: argmax decoding; temperature, top-k and top-p are ignored.
        pad_id: token written after a completion ends, and used to pad the prompt bucket.
        buckets: prompt lengths are left-padded up to the next bucket.
        engine: "static" (this module: one batch of ``P*G`` rows over a preallocated cache) or
            "paged" (``jaxgrpo.rollout.engine``: paged KV cache, continuous batching).
        paged: a ``jaxgrpo.rollout.engine.PagedOptions`` (slots, steps per sync, page size)
            for the paged engine; None: the defaults.
        eos_logit_bias: added to the logits of every ``eos_ids`` token before sampling (and
            part of the returned log-probs); 0 = off. Benchmarks use it to set completion
            lengths.

    Returns:
        A ``Rollout`` with ``[P, G, Tn]`` tokens, log-probs and mask, ``[P, G]`` lengths and
        truncated flags.
    """
    graphdef, state = nnx.split(model)
    return generate_functional(
        graphdef, state, prompt_tokens, prompt_mask, key, num_samples=num_samples,
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        eos_ids=eos_ids, stop_sequences=stop_sequences, greedy=greedy, pad_id=pad_id,
        buckets=buckets, engine=engine, paged=paged, eos_logit_bias=eos_logit_bias)
