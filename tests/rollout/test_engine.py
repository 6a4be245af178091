"""The paged rollout engine: ragged paged attention, equality with the static sampler,
reproducibility across slot counts, page accounting and no recompilation."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgrpo.model import ModelConfig, Transformer
from jaxgrpo.model.attention import plain_attention
from jaxgrpo.rollout import engine as engine_mod
from jaxgrpo.rollout import generate
from jaxgrpo.rollout.engine import PagedOptions, paged_decode_attention

V = 61
# Small pages and few slots, so every test crosses pages, attention blocks, rounds and refills.
SMALL = PagedOptions(max_slots=3, steps_per_sync=5, page_size=4, pages_per_block=2)
# One budget and one prompt bucket everywhere: the tests share compiled programs.
TN = 12
BUCKETS = (16,)


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True)
    m = Transformer(cfg, rngs=nnx.Rngs(0))
    m.embedding.set_value(m.embedding.get_value() * 3.0)  # far from uniform sampling
    return m


@pytest.fixture(scope="module")
def greedy_model():
    """Untied, larger weights: the greedy stream is not one repeated token."""
    cfg = ModelConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=False,
                      initializer_range=0.2)
    return Transformer(cfg, rngs=nnx.Rngs(1))


def _prompts(lengths, width=None, seed=0):
    """Left-padded prompts of the given lengths."""
    rng = np.random.default_rng(seed)
    width = width or max(lengths)
    tokens = np.zeros((len(lengths), width), np.int32)
    mask = np.zeros((len(lengths), width), bool)
    for i, n in enumerate(lengths):
        tokens[i, width - n:] = rng.integers(1, V, n)
        mask[i, width - n:] = True
    return tokens, mask


def _teacher_forced_logp(model, tokens, mask, comp, *, temperature=1.0):
    """log softmax(logits / T) of each completion token from one full forward (NumPy loops)."""
    p, g, tn = comp.shape
    seq = np.concatenate([np.repeat(tokens, g, 0), comp.reshape(p * g, tn)], 1)
    m = np.concatenate([np.repeat(mask, g, 0), np.ones((p * g, tn), bool)], 1)
    logits = np.asarray(model(jnp.asarray(seq), mask=jnp.asarray(m)), np.float64)
    tp = tokens.shape[1]
    logits = logits[:, tp - 1:-1] / temperature
    out = np.zeros((p * g, tn))
    for n in range(p * g):
        for i in range(tn):
            row = logits[n, i]
            out[n, i] = row[seq[n, tp + i]] - (np.log(np.exp(row - row.max()).sum()) + row.max())
    return out.reshape(p, g, tn)


# ---- attention ---------------------------------------------------------------------------------


def _paged_case(seed=0, s=5, h=4, kh=2, dh=8, ps=4, m=6, num_pages=40):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((s, h, dh)).astype(np.float32)
    pool = rng.standard_normal((num_pages, ps, 2 * kh, dh)).astype(np.float32)
    # Distinct pages per row in a scrambled order, and lengths 0, partial, full.
    table = rng.permutation(np.arange(1, num_pages))[:s * m].reshape(s, m).astype(np.int32)
    lengths = np.array([0, 1, 7, ps * m, 13][:s], np.int32)
    return q, pool, table, lengths


def _numpy_paged_reference(q, pool, table, lengths):
    s, h, dh = q.shape
    ps, kh = pool.shape[1], pool.shape[2] // 2
    out = np.zeros_like(q, dtype=np.float64)
    for i in range(s):
        for n in range(h):
            j = n // (h // kh)
            keys = [pool[table[i, t // ps], t % ps, 2 * j] for t in range(lengths[i])]
            vals = [pool[table[i, t // ps], t % ps, 2 * j + 1] for t in range(lengths[i])]
            if not keys:
                continue
            sc = np.array([np.dot(q[i, n], k) for k in keys], np.float64) / np.sqrt(dh)
            w = np.exp(sc - sc.max())
            out[i, n] = (w[:, None] * np.array(vals)).sum(0) / w.sum()
    return out


@pytest.mark.parametrize("pages_per_block", [1, 4, 6])
def test_paged_attention_equals_numpy_reference(pages_per_block):
    q, pool, table, lengths = _paged_case()
    ref = _numpy_paged_reference(q, pool, table, lengths)
    fn = jax.jit(lambda *a: paged_decode_attention(*a, pages_per_block=pages_per_block))
    out = np.asarray(fn(q, pool, table, lengths))
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
    assert (out[0] == 0).all()  # length 0: exactly 0


def test_paged_attention_equals_plain_attention_on_the_gathered_cache():
    q, pool, table, lengths = _paged_case(seed=1)
    s, kh = q.shape[0], pool.shape[2] // 2
    dense = pool[table].reshape(s, -1, kh, 2, pool.shape[-1])  # [S, M*ps, Hkv, 2, Dh]
    k = np.transpose(dense[:, :, :, 0], (0, 2, 1, 3))
    v = np.transpose(dense[:, :, :, 1], (0, 2, 1, 3))
    valid = np.arange(k.shape[2])[None, :] < lengths[:, None]
    # One query per row at the slot after its last key: causal plain attention over the slots.
    ref = jax.vmap(lambda qi, ki, vi, vali, li: plain_attention(
        qi[None, None], ki[None], vi[None], vali[None], q_offset=li)[0, 0])(
        q, k, v, valid, jnp.maximum(lengths - 1, 0))
    out = paged_decode_attention(q, pool, table, lengths, pages_per_block=4)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)


def test_paged_attention_under_vmap():
    q, pool, table, lengths = _paged_case(seed=2)
    qs = np.stack([q, 2 * q])
    out = jax.vmap(lambda qq: paged_decode_attention(qq, pool, table, lengths,
                                                     pages_per_block=2))(qs)
    for i in range(2):
        np.testing.assert_allclose(np.asarray(out[i]),
                                   _numpy_paged_reference(qs[i], pool, table, lengths),
                                   atol=1e-5, rtol=0)


# ---- the engine --------------------------------------------------------------------------------


def test_greedy_tokens_and_logprobs_equal_the_static_sampler(greedy_model):
    # Prompt lengths 1 (nothing to prefill), page multiples +- 1, and a page multiple.
    tokens, mask = _prompts([1, 4, 5, 9, 3, 8])
    kw = dict(num_samples=2, max_new_tokens=TN, greedy=True, buckets=BUCKETS)
    static = generate(greedy_model, tokens, mask, jax.random.key(0), **kw)
    paged = generate(greedy_model, tokens, mask, jax.random.key(0), engine="paged", paged=SMALL,
                     **kw)
    t = np.asarray(static.tokens)
    assert len(np.unique(t[:, 0], axis=0)) > 2 and len(set(t[2, 0].tolist())) > 2
    np.testing.assert_array_equal(np.asarray(paged.tokens), t)
    np.testing.assert_allclose(np.asarray(paged.logprobs), np.asarray(static.logprobs),
                               atol=1e-5, rtol=0)
    ref = _teacher_forced_logp(greedy_model, tokens, mask, t)
    np.testing.assert_allclose(np.asarray(paged.logprobs), ref, atol=1e-4, rtol=0)
    assert bool(paged.mask.all()) and bool(paged.truncated.all())


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.7, 0), (1.0, 7)])
def test_sampled_logprobs_equal_teacher_forced_forward(model, temperature, top_k):
    tokens, mask = _prompts([7, 2, 5])
    r = generate(model, tokens, mask, jax.random.key(0), num_samples=4, max_new_tokens=TN,
                 temperature=temperature, top_k=top_k, engine="paged", paged=SMALL,
                 buckets=BUCKETS)
    comp = np.asarray(r.tokens)
    assert bool(r.mask.all())
    assert len(np.unique(comp.reshape(12, 12), axis=0)) > 1  # samples differ
    ref = _teacher_forced_logp(model, tokens, mask, comp, temperature=temperature)
    if top_k:  # the filtered distribution: renormalised over the top-k logits of each step
        assert (np.asarray(r.logprobs) >= ref - 1e-6).all()
        assert (np.asarray(r.logprobs) > ref + 1e-3).any()
    else:
        np.testing.assert_allclose(np.asarray(r.logprobs), ref, atol=1e-4, rtol=0)


def test_same_keys_same_tokens_with_8_and_64_slots(model):
    tokens, mask = _prompts([3, 9, 14, 1, 6], seed=3)
    kw = dict(num_samples=6, max_new_tokens=TN, temperature=1.2, eos_ids=(5, 17),
              buckets=BUCKETS)
    opts = [PagedOptions(max_slots=8, page_size=4), PagedOptions(max_slots=64, page_size=4),
            SMALL]
    outs = [generate(model, tokens, mask, jax.random.key(7), engine="paged", paged=o, **kw)
            for o in opts]
    lengths = np.asarray(outs[0].lengths)
    assert (~np.asarray(outs[0].truncated)).any() and len(np.unique(lengths)) > 3
    for o in outs[1:]:
        for name in ("tokens", "mask", "lengths", "truncated"):
            np.testing.assert_array_equal(np.asarray(getattr(o, name)),
                                          np.asarray(getattr(outs[0], name)), err_msg=name)
        # Another batch shape changes the matmuls' summation order, not the sampled tokens.
        np.testing.assert_allclose(np.asarray(o.logprobs), np.asarray(outs[0].logprobs),
                                   atol=1e-5, rtol=0)
    other = generate(model, tokens, mask, jax.random.key(8), engine="paged", paged=opts[0],
                     **kw)
    assert not np.array_equal(np.asarray(other.tokens), np.asarray(outs[0].tokens))


def test_eos_and_stop_sequences_as_in_the_static_sampler(greedy_model):
    tokens, mask = _prompts([4, 6, 2], seed=4)
    kw = dict(num_samples=2, max_new_tokens=TN, greedy=True, buckets=BUCKETS)
    free = np.asarray(generate(greedy_model, tokens, mask, jax.random.key(0), **kw).tokens)
    eos = (int(free[0, 0, 5]),)
    stop = (tuple(int(x) for x in free[1, 0, 3:5]), (60, 60, 60))
    for extra in (dict(eos_ids=eos), dict(stop_sequences=stop),
                  dict(eos_ids=eos, stop_sequences=stop)):
        a = generate(greedy_model, tokens, mask, jax.random.key(0), **kw, **extra)
        b = generate(greedy_model, tokens, mask, jax.random.key(0), engine="paged",
                     paged=SMALL, **kw, **extra)
        assert (np.asarray(a.lengths) < TN).any(), extra
        for name in ("tokens", "mask", "lengths", "truncated"):
            np.testing.assert_array_equal(np.asarray(getattr(b, name)),
                                          np.asarray(getattr(a, name)), err_msg=f"{name} {extra}")
        np.testing.assert_allclose(np.asarray(b.logprobs), np.asarray(a.logprobs), atol=1e-5)


def test_eos_logit_bias_shortens_completions_in_both_engines(model):
    tokens, mask = _prompts([5, 5])
    kw = dict(num_samples=4, max_new_tokens=TN, eos_ids=(5,), buckets=BUCKETS)
    for engine in ("static", "paged"):
        base = generate(model, tokens, mask, jax.random.key(0), engine=engine, paged=SMALL, **kw)
        biased = generate(model, tokens, mask, jax.random.key(0), engine=engine, paged=SMALL,
                          eos_logit_bias=6.0, **kw)
        assert float(np.mean(biased.lengths)) < 0.5 * float(np.mean(base.lengths)), engine


def test_prompts_prefilled_once_and_every_page_freed(model):
    tokens, mask = _prompts([13, 9, 4])
    stats = {}
    opts = PagedOptions(max_slots=8, page_size=4)
    graphdef, state = nnx.split(model)
    r = engine_mod.generate_paged(
        graphdef, state, tokens, mask, jax.random.key(0), num_samples=8, max_new_tokens=TN,
        temperature=1.0, top_k=0, top_p=1.0, eos_ids=(5,), stop_sequences=(), greedy=False,
        pad_id=0, buckets=BUCKETS, options=opts, stats=stats)
    assert stats["prefilled_prompts"] == 3  # once per prompt, not once per sample
    assert stats["pages_in_use_at_end"] == 0
    assert (np.asarray(r.lengths) < TN).any()
    # 8 slots x (ceil(12/4) + 1) sample pages + (ceil(8/8) + 2) live prompts x 4 pages + 1,
    # against 24 rows x ceil((16 + 12) / 4) = 168 pages for every row's own cache.
    assert stats["pool_pages"] == 1 + 8 * 4 + 3 * 4


@pytest.mark.parametrize("opts", [SMALL, PagedOptions(max_slots=16, page_size=4)],
                         ids=["one_row_bucket", "row_buckets_8_16"])
def test_second_call_with_another_prompt_mix_compiles_nothing(model, opts):
    # With 16 slots the first call's 3 requests fit the 8-row bucket, the second call's 15
    # need the 16-row one: every bucket is compiled on the first call whatever its mix.
    kw = dict(num_samples=3, max_new_tokens=TN, eos_ids=(5,), engine="paged", paged=opts,
              buckets=BUCKETS)
    generate(model, *_prompts([3]), jax.random.key(0), **kw)
    with compiles_nothing():
        r = generate(model, *_prompts([16, 1, 5, 9, 2], seed=1), jax.random.key(1), **kw)
        jax.block_until_ready(r.tokens)


@contextlib.contextmanager
def compiles_nothing():
    """Fails unless the block compiles nothing: no backend compile event and no new entry in
    the engine's round or prefill caches."""
    compiles = []

    def listener(event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    sizes = lambda: (engine_mod._round_jit._cache_size(), engine_mod._prefill_jit._cache_size())
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        before = sizes()
        yield
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert sizes() == before
    assert compiles == []


def test_size_buckets():
    assert engine_mod.size_buckets(3) == (3,)
    assert engine_mod.size_buckets(8) == (8,)
    assert engine_mod.size_buckets(64) == (8, 16, 32, 64)
    assert engine_mod.size_buckets(100) == (8, 16, 32, 64, 100)


def test_finished_rows_leave_the_batch(model):
    """Once nothing waits, the live slots run in the smallest row bucket that holds them: the
    rows computed stay within 2x the useful ones (plus the 8-row floor), far below
    ``max_slots`` x steps, and the tokens are those of a run with 3 slots."""
    tokens, mask = _prompts([3, 9, 14, 1, 6, 11, 2, 8], seed=5)
    graphdef, state = nnx.split(model)
    kw = dict(num_samples=8, max_new_tokens=TN, temperature=1.0, top_k=0, top_p=1.0,
              eos_ids=(5, 17), stop_sequences=(), greedy=False, pad_id=0, buckets=BUCKETS,
              eos_logit_bias=2.5)
    stats = {}
    r = engine_mod.generate_paged(graphdef, state, tokens, mask, jax.random.key(3),
                                  options=PagedOptions(max_slots=64, page_size=4), stats=stats,
                                  **kw)
    lengths = np.asarray(r.lengths)
    assert lengths.min() < 4 and lengths.max() == TN  # a spread of lengths
    assert stats["useful_row_steps"] == lengths.sum()
    assert stats["row_steps"] < 0.6 * 64 * stats["decode_steps"]
    assert stats["row_steps"] <= 2 * stats["useful_row_steps"] + 8 * stats["decode_steps"]
    ref = engine_mod.generate_paged(graphdef, state, tokens, mask, jax.random.key(3),
                                    options=SMALL, **kw)
    np.testing.assert_array_equal(np.asarray(r.tokens), np.asarray(ref.tokens))
    np.testing.assert_allclose(np.asarray(r.logprobs), np.asarray(ref.logprobs), atol=1e-5,
                               rtol=0)


@pytest.mark.parametrize("bad,match", [
    (dict(engine="vllm"), "engine must be one of"),
    (dict(engine="paged", paged=dict(max_slots=4)), "paged must be a PagedOptions"),
    (dict(eos_logit_bias=float("inf")), "eos_logit_bias must be a finite number"),
])
def test_bad_engine_arguments(model, bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        generate(model, *_prompts([3]), jax.random.key(0), max_new_tokens=4, **bad)


def test_bad_paged_options():
    with pytest.raises(ValueError, match="PagedOptions.max_slots must be a positive int"):
        PagedOptions(max_slots=0)


@pytest.mark.parametrize("override,match", [
    ({"engine": "vllm"}, "'rollout.engine' must be one of 'static', 'paged', got 'vllm'"),
    ({"max_slots": 0}, "'rollout.max_slots' must be a positive int, got 0"),
    ({"steps_per_sync": 1.5}, "'rollout.steps_per_sync' must be an int, got 1.5"),
    ({"page_size": -4}, "'rollout.page_size' must be a positive int"),
])
def test_rollout_engine_config_errors_are_one_line(override, match):
    from jaxgrpo.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match=match) as info:
        config_from_dict({"rollout": override})
    assert "\n" not in str(info.value)


def test_paged_engine_config_builds_the_options_and_refuses_a_mesh():
    from jaxgrpo.config import config_from_dict
    from jaxgrpo.train.loop import paged_options

    rc = config_from_dict({"rollout": {"engine": "paged", "max_slots": 12,
                                       "steps_per_sync": 8, "page_size": 32}}).rollout
    assert paged_options(rc, None) == PagedOptions(max_slots=12, steps_per_sync=8, page_size=32)
    assert paged_options(config_from_dict({}).rollout, None) is None
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:2])
    with pytest.raises(ValueError, match="rollout.engine 'paged' runs on one device"):
        paged_options(rc, mesh)
