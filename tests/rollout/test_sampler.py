"""The jitted KV-cache sampler: log-probs, EOS/stop handling, determinism, no recompilation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgrpo.model import ModelConfig, Transformer
from jaxgrpo.rollout import bucket_length, generate, generate_functional
from jaxgrpo.rollout import sampler as sampler_mod

V = 61
# One program shape shared by most tests (compiles are the slow part on CPU).
BASE = dict(num_samples=4, max_new_tokens=12)


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True)
    m = Transformer(cfg, rngs=nnx.Rngs(0))
    # Larger logits than the 0.02 init so that sampling is far from uniform.
    m.embedding.set_value(m.embedding.get_value() * 3.0)
    return m


def _prompts():
    tokens = np.array([[0, 0, 0, 11, 12, 13, 14], [3, 9, 27, 50, 20, 1, 2]], np.int32)
    mask = np.array([[0, 0, 0, 1, 1, 1, 1], [1] * 7], bool)
    return jnp.asarray(tokens), jnp.asarray(mask)


def _teacher_forced_logp(model, prompt, pmask, comp, *, temperature=1.0):
    """log softmax(logits / T) of each completion token, from one full forward pass."""
    p, g, tn = comp.shape
    seq = np.concatenate([np.repeat(np.asarray(prompt), g, 0), comp.reshape(p * g, tn)], 1)
    mask = np.concatenate([np.repeat(np.asarray(pmask), g, 0), np.ones((p * g, tn), bool)], 1)
    logits = np.asarray(model(jnp.asarray(seq), mask=jnp.asarray(mask)), np.float64)
    tp = prompt.shape[1]
    logits = logits[:, tp - 1:-1] / temperature
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    out = np.zeros((p * g, tn))
    for n in range(p * g):
        for i in range(tn):
            out[n, i] = logits[n, i, seq[n, tp + i]] - logz[n, i]
    return out.reshape(p, g, tn)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_teacher_forced_forward(model, temperature):
    prompt, pmask = _prompts()
    r = generate(model, prompt, pmask, jax.random.key(0), temperature=temperature, **BASE)
    assert r.tokens.shape == r.logprobs.shape == r.mask.shape == (2, 4, 12)
    assert bool(r.mask.all())  # no EOS: every token is a completion token
    ref = _teacher_forced_logp(model, prompt, pmask, np.asarray(r.tokens),
                               temperature=temperature)
    np.testing.assert_allclose(np.asarray(r.logprobs), ref, atol=1e-4, rtol=0)
    assert len(np.unique(np.asarray(r.tokens).reshape(8, 12), axis=0)) > 1  # samples differ


def test_deterministic_for_a_key(model):
    prompt, pmask = _prompts()
    kw = BASE
    a = generate(model, prompt, pmask, jax.random.key(5), **kw)
    b = generate(model, prompt, pmask, jax.random.key(5), **kw)
    c = generate(model, prompt, pmask, jax.random.key(6), **kw)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_array_equal(np.asarray(a.logprobs), np.asarray(b.logprobs))
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))


def test_eos_mask_lengths_truncated_invariants(model):
    prompt, pmask = _prompts()
    eos = (5, 17, 33, 40)
    r = generate(model, prompt, pmask, jax.random.key(1), eos_ids=eos, temperature=1.5, **BASE)
    tokens, mask, logp = (np.asarray(x) for x in (r.tokens, r.mask, r.logprobs))
    lengths, trunc = np.asarray(r.lengths), np.asarray(r.truncated)
    assert trunc.any() and (~trunc).any(), "the test needs both outcomes; change the seed"
    for p in range(2):
        for g in range(4):
            seq = tokens[p, g]
            hits = [i for i in range(12) if seq[i] in eos]
            expected_len = hits[0] + 1 if hits else 12
            assert lengths[p, g] == expected_len
            assert trunc[p, g] == (not hits)
            np.testing.assert_array_equal(mask[p, g], np.arange(12) < expected_len)
            assert (seq[expected_len:] == 0).all()
            assert (logp[p, g, expected_len:] == 0).all()
            assert (logp[p, g, :expected_len] < 0).all()


def test_stop_sequence_ends_completion(model):
    prompt, pmask = _prompts()
    free = generate(model, prompt, pmask, jax.random.key(2), temperature=1.5, **BASE)
    seq = tuple(int(x) for x in np.asarray(free.tokens)[1, 0, 4:6])
    stopped = generate(model, prompt, pmask, jax.random.key(2), temperature=1.5,
                       stop_sequences=(seq, (60, 60, 60)), **BASE)
    full = np.asarray(free.tokens)
    for p in range(2):
        for g in range(4):
            s = full[p, g]
            ends = [i for i in range(1, 12) if tuple(s[i - 1:i + 1]) == seq]
            ends += [i for i in range(2, 12) if tuple(s[i - 2:i + 1]) == (60, 60, 60)]
            want = min(ends) + 1 if ends else 12
            assert int(stopped.lengths[p, g]) == want
            assert bool(stopped.truncated[p, g]) == (not ends)
            np.testing.assert_array_equal(np.asarray(stopped.tokens)[p, g, :want], s[:want])
    assert int(stopped.lengths[1, 0]) <= 6


def test_early_exit_when_everything_ends_at_once(model):
    prompt, pmask = _prompts()
    # A near-zero temperature is greedy: ending on each prompt's first greedy token ends all rows.
    cold = generate(model, prompt, pmask, jax.random.key(0), temperature=1e-4, **BASE)
    first = tuple(sorted({int(t) for t in np.asarray(cold.tokens)[:, :, 0].ravel()}))
    assert len(first) <= 2
    r = generate(model, prompt, pmask, jax.random.key(0), temperature=1e-4, eos_ids=first,
                 **BASE)
    np.testing.assert_array_equal(np.asarray(r.lengths), np.ones((2, 4)))
    assert not bool(r.truncated.any())
    assert (np.asarray(r.tokens)[..., 1:] == 0).all()


def test_greedy_equals_top_k_1(model):
    prompt, pmask = _prompts()
    greedy = generate(model, prompt, pmask, jax.random.key(0), greedy=True, **BASE)
    k1 = generate(model, prompt, pmask, jax.random.key(3), top_k=1, **BASE)
    g = np.asarray(greedy.tokens)
    assert (g == g[:, :1]).all()
    np.testing.assert_array_equal(np.asarray(k1.tokens), g)
    np.testing.assert_allclose(np.asarray(k1.logprobs), 0.0, atol=1e-6)
    ref = _teacher_forced_logp(model, prompt, pmask, g)
    np.testing.assert_allclose(np.asarray(greedy.logprobs), ref, atol=1e-4, rtol=0)
    # Greedy tokens are the argmax of the teacher-forced logits.
    tp = prompt.shape[1]
    seq = np.concatenate([np.asarray(prompt), g[:, 0]], 1)
    mask = np.concatenate([np.asarray(pmask), np.ones((2, 12), bool)], 1)
    logits = np.asarray(model(jnp.asarray(seq), mask=jnp.asarray(mask)))
    np.testing.assert_array_equal(logits[:, tp - 1:-1].argmax(-1), g[:, 0])


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (3, 1.0), (0, 0.8), (4, 0.9)])
def test_sampling_frequencies_match_the_filtered_distribution(top_k, top_p):
    logits = np.array([2.0, 1.5, 1.0, 0.2, -0.5, 0.0, -3.0, 1.2], np.float32)
    temperature = 0.8
    z = logits / temperature
    order = np.argsort(-z)
    keep = np.zeros(8, bool)
    mass = 0.0
    probs = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    for rank, j in enumerate(order):
        if top_k and rank >= top_k:
            break
        keep[j] = True
    if top_p < 1:
        pk = np.where(keep, probs, 0) / np.where(keep, probs, 0).sum()
        keep2 = np.zeros(8, bool)
        for j in order:
            if not keep[j]:
                continue
            if mass < top_p:
                keep2[j] = True
            mass += pk[j]
        keep = keep2
    target = np.where(keep, probs, 0)
    target /= target.sum()
    n = 40000
    tok, lp = jax.jit(lambda lg, k: sampler_mod._sample(
        lg, k, greedy=False, temperature=temperature, top_k=top_k, top_p=top_p))(
        jnp.broadcast_to(jnp.asarray(logits), (n, 8)), jax.random.key(0))
    freq = np.bincount(np.asarray(tok), minlength=8) / n
    np.testing.assert_allclose(freq, target, atol=0.012)
    assert (freq[~keep] == 0).all()
    np.testing.assert_allclose(np.asarray(lp), np.log(target[np.asarray(tok)]), atol=1e-5)


def test_second_call_in_same_bucket_does_not_recompile(model):
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    keys = [jax.random.key(i) for i in range(4)]

    def call(tp, seed, **kw):
        tokens = rng.integers(1, V, (2, tp)).astype(np.int32)
        return generate_functional(graphdef, state, tokens, np.ones((2, tp), bool), keys[seed],
                                   **BASE, **kw)

    assert bucket_length(5) == bucket_length(9) == 16 and bucket_length(17) == 32
    call(5, 0)
    before = sampler_mod._generate_jit._cache_size()
    compiles = []

    def listener(name, *args, **kwargs):
        if name == "/jax/core/compile/backend_compile_duration":
            compiles.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        call(9, 1)  # same bucket, new key and tokens
        call(5, 2, temperature=0.5, eos_ids=(3, 4))  # traced knobs: no recompile either
        assert sampler_mod._generate_jit._cache_size() == before
        assert compiles == []
        call(17, 3)  # the next bucket compiles once: the counter can fail
        assert sampler_mod._generate_jit._cache_size() == before + 1
        assert len(compiles) >= 1
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_left_padding_to_a_bucket_does_not_change_samples(model):
    prompt, pmask = _prompts()
    a = generate(model, prompt, pmask, jax.random.key(9), **BASE)
    b = generate(model, prompt, pmask, jax.random.key(9), buckets=(64,), **BASE)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_allclose(np.asarray(a.logprobs), np.asarray(b.logprobs), atol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_samples=0), "num_samples"),
    (dict(temperature=0.0), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(eos_ids=(V,)), "eos_ids"),
    (dict(stop_sequences=((),)), "stop_sequences"),
    (dict(max_new_tokens=0), "max_new_tokens"),
])
def test_bad_arguments_are_named(model, kwargs, match):
    prompt, pmask = _prompts()
    kw = dict(max_new_tokens=4)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate(model, prompt, pmask, jax.random.key(0), **kw)


def test_bad_prompt_arrays_are_named(model):
    prompt, pmask = _prompts()
    with pytest.raises(ValueError, match="prompt_mask"):
        generate(model, prompt, pmask[:, ::-1], jax.random.key(0), max_new_tokens=2)
    with pytest.raises(TypeError, match="prompt_mask"):
        generate(model, prompt, pmask.astype(jnp.int32), jax.random.key(0), max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt_tokens"):
        generate(model, prompt[0], pmask[0], jax.random.key(0), max_new_tokens=2)


def test_inverse_cdf_never_returns_zero_probability_tokens():
    # V = 300 is not a multiple of the block; most tokens have probability exactly 0.
    probs = np.zeros((4096, 300), np.float32)
    probs[:, [0, 129, 255, 299]] = [0.1, 0.2, 0.3, 0.4]
    probs[::2, 0] = 0.0  # some rows: the first block has no mass at all
    tok = np.asarray(sampler_mod._inverse_cdf(jnp.asarray(probs), jax.random.key(0)))
    assert (probs[np.arange(4096), tok] > 0).all()
    odd = np.bincount(tok[1::2], minlength=300)[[0, 129, 255, 299]] / 2048
    np.testing.assert_allclose(odd, [0.1, 0.2, 0.3, 0.4], atol=0.03)


def test_functional_entry_works_inside_an_outer_jit(model):
    prompt, pmask = _prompts()
    graphdef, state = nnx.split(model)
    eager = generate_functional(graphdef, state, prompt, pmask, jax.random.key(7), **BASE)
    inner = jax.jit(lambda st, t, m, k: generate_functional(graphdef, st, t, m, k, **BASE))
    traced = inner(state, prompt, pmask, jax.random.key(7))
    np.testing.assert_array_equal(np.asarray(traced.tokens), np.asarray(eager.tokens))
    np.testing.assert_allclose(np.asarray(traced.logprobs), np.asarray(eager.logprobs),
                               atol=1e-5, rtol=0)


def _filtered_softmax(logits_V, temperature, top_k, top_p):
    """NumPy loops: the distribution the sampler must draw from after top-k then top-p."""
    z = np.asarray(logits_V, np.float64) / temperature
    order = sorted(range(len(z)), key=lambda j: -z[j])
    keep = np.zeros(len(z), bool)
    for rank, j in enumerate(order):
        if not top_k or rank < top_k:
            keep[j] = True
    probs = np.where(keep, np.exp(z - z.max()), 0.0)
    probs /= probs.sum()
    if top_p < 1:
        mass, keep2 = 0.0, np.zeros(len(z), bool)
        for j in order:
            if keep[j] and mass < top_p:
                keep2[j] = True
            mass += probs[j] if keep[j] else 0.0
        probs = np.where(keep2, probs, 0.0)
        probs /= probs.sum()
    return probs


def test_inverse_cdf_at_every_block_boundary_never_returns_a_filtered_token():
    # Top-k filtered rows over V = 1000 (not a multiple of the block of 128); every uniform is
    # placed on, one ulp below and one ulp above each block boundary of the cumulative mass.
    rng = np.random.default_rng(0)
    n, v, k, block = 64, 1000, 40, 128
    scaled = jnp.asarray(rng.normal(size=(n, v)).astype(np.float32) * 3)
    kth = jax.lax.top_k(scaled, k)[0][:, -1:]
    probs = jnp.exp(jax.nn.log_softmax(jnp.where(scaled < kth, -jnp.inf, scaled), axis=-1))
    nb = -(-v // block)
    padded = jnp.pad(probs, ((0, 0), (0, nb * block - v)))
    bcdf = np.asarray(jnp.cumsum(padded.reshape(n, nb, block).sum(-1), -1))
    u = bcdf / bcdf[:, -1:]  # [n, nb]: the boundary after each block, as a uniform
    u = np.concatenate([np.nextafter(u, -np.inf), u, np.nextafter(u, np.inf)], axis=1)
    u = np.clip(u, 0, np.nextafter(np.float32(1), np.float32(0)))  # uniforms lie in [0, 1)
    m = u.shape[1]
    rows = np.repeat(probs, m, axis=0)
    tok = np.asarray(jax.jit(sampler_mod._inverse_cdf_at)(rows, jnp.asarray(u.reshape(-1))))
    assert (tok >= 0).all() and (tok < v).all()
    picked = np.asarray(rows)[np.arange(n * m), tok]
    assert (picked > 0).all(), f"{int((picked == 0).sum())} of {n * m} draws were filtered tokens"


@pytest.mark.parametrize("top_k,top_p", [(37, 1.0), (0, 0.7), (50, 0.8)])
def test_empirical_distribution_matches_the_filtered_softmax_chi_square(top_k, top_p):
    # One row of V = 300 (three blocks of 128, the last partial), logits spread so that kept
    # tokens fall in every block. The filter runs on a few rows (it is the same for every row;
    # sorting 1e5 rows is slow on CPU), then 1e5 draws take _sample's own draw path.
    rng = np.random.default_rng(1)
    v, n, temperature = 300, 100_000, 0.9
    logits = (rng.normal(size=v) * 1.5).astype(np.float32)
    target = _filtered_softmax(logits, temperature, top_k, top_p)
    keep = target > 0
    assert len({j // 128 for j in np.flatnonzero(keep)}) == 3
    filt = functools.partial(sampler_mod._filtered_logprobs, temperature=temperature,
                             top_k=top_k, top_p=top_p)
    logp = np.asarray(jax.jit(filt)(jnp.broadcast_to(jnp.asarray(logits), (4, v))))
    np.testing.assert_array_equal(np.isfinite(logp), np.broadcast_to(keep, (4, v)))
    want = np.broadcast_to(np.log(target[keep]), (4, keep.sum()))
    np.testing.assert_allclose(logp[:, keep], want, atol=1e-5)
    draw = jax.jit(lambda lp, key: sampler_mod._inverse_cdf(jnp.exp(lp), key))
    tok = np.asarray(draw(jnp.broadcast_to(jnp.asarray(logp[0]), (n, v)), jax.random.key(0)))
    counts = np.bincount(tok, minlength=v)
    assert counts[~keep].sum() == 0, "a filtered token was drawn"
    expected = target[keep] * n
    assert expected.min() >= 5  # the chi-square approximation holds
    chi2 = float(np.sum((counts[keep] - expected) ** 2 / expected))
    p_value = float(jax.scipy.stats.chi2.sf(chi2, int(keep.sum()) - 1))
    assert p_value > 0.01, (chi2, p_value)
