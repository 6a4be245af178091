"""Tests for jaxgrpo.core.logprobs: full and chunked log-probs, entropy, gradients, benchmark."""

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgrpo.core.logprobs import chunked_token_logprobs, token_logprobs

ROOT = pathlib.Path(__file__).resolve().parents[2]


def ref_logprobs_entropy(logits, targets):
    """Loop reference in float64 with the max subtracted."""
    logits = np.asarray(logits, np.float64)
    n, t, v = logits.shape
    logp = np.zeros((n, t))
    ent = np.zeros((n, t))
    for i in range(n):
        for j in range(t):
            row = logits[i, j]
            mx = max(row)
            lse = mx + math.log(sum(math.exp(x - mx) for x in row))
            logp[i, j] = row[targets[i, j]] - lse
            ent[i, j] = -sum(math.exp(x - lse) * (x - lse) for x in row)
    return logp, ent


def make(seed=0, n=3, t=7, d=8, v=19, scale=2.0):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(n, t, d)).astype(np.float32)
    w = (scale * rng.normal(size=(d, v)) / np.sqrt(d)).astype(np.float32)
    b = rng.normal(size=(v,)).astype(np.float32)
    tg = rng.integers(0, v, size=(n, t)).astype(np.int32)
    return h, w, b, tg


def test_token_logprobs_matches_reference():
    h, w, b, tg = make(seed=1)
    logits = np.einsum("ntd,dv->ntv", h, w) + b
    logp, ent = jax.jit(lambda x, y: token_logprobs(x, y, return_entropy=True))(logits, tg)
    want_lp, want_ent = ref_logprobs_entropy(logits, tg)
    np.testing.assert_allclose(np.asarray(logp), want_lp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent), want_ent, rtol=1e-5, atol=1e-5)
    only = token_logprobs(logits, tg)
    np.testing.assert_array_equal(np.asarray(only), np.asarray(logp))


def test_token_logprobs_stable_for_large_and_bf16_logits():
    rng = np.random.default_rng(2)
    # exp(200) overflows float32: a naive softmax gives inf/NaN. Inputs are exact multiples of
    # 1/8; float32 resolution at 200 is ulp = 2**-16, so allow a few ulp of absolute error.
    logits = (rng.integers(-80, 80, size=(2, 5, 11)) / 8 + 200.0).astype(np.float32)
    tg = rng.integers(0, 11, size=(2, 5)).astype(np.int32)
    logp, ent = token_logprobs(logits, tg, return_entropy=True)
    want_lp, want_ent = ref_logprobs_entropy(logits, tg)
    assert np.all(np.isfinite(np.asarray(logp))) and np.all(np.asarray(logp) <= 0)
    ulp = 2.0**-16
    np.testing.assert_allclose(np.asarray(logp), want_lp, rtol=1e-5, atol=4 * ulp)
    np.testing.assert_allclose(np.asarray(ent), want_ent, rtol=1e-5, atol=4 * ulp)

    bf = jnp.asarray(rng.normal(size=(2, 5, 11)) * 8, jnp.bfloat16)
    lp_bf, ent_bf = token_logprobs(bf, tg, return_entropy=True)
    assert lp_bf.dtype == jnp.float32 and ent_bf.dtype == jnp.float32
    want_lp, want_ent = ref_logprobs_entropy(np.asarray(bf, np.float32), tg)
    np.testing.assert_allclose(np.asarray(lp_bf), want_lp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent_bf), want_ent, rtol=1e-5, atol=1e-5)


def test_entropy_bounds():
    rng = np.random.default_rng(3)
    v = 13
    logits = rng.normal(size=(2, 4, v)).astype(np.float32)
    logits[0, 0] = 0.0  # uniform: entropy = log V
    logits[0, 1] = -1e9
    logits[0, 1, 3] = 0.0  # one-hot: entropy = 0
    tg = np.full((2, 4), 3, np.int32)
    lp, ent = token_logprobs(logits, tg, return_entropy=True)
    ent = np.asarray(ent)
    np.testing.assert_allclose(ent[0, 0], math.log(v), rtol=1e-6)
    assert abs(ent[0, 1]) < 1e-6 and abs(float(lp[0, 1])) < 1e-6
    assert np.all(ent >= -1e-6) and np.all(ent <= math.log(v) + 1e-5)


@pytest.mark.parametrize(
    "t,chunk,with_bias", [(8, 4, False), (7, 4, True), (7, 64, True), (5, 1, False)]
)
def test_chunked_equals_full_values_and_grads(t, chunk, with_bias):
    h, w, b, tg = make(seed=4, t=t)
    bias = b if with_bias else None
    rng = np.random.default_rng(5)
    c1 = rng.normal(size=tg.shape).astype(np.float32)
    c2 = rng.normal(size=tg.shape).astype(np.float32)

    def full(h, w, b):
        z = jnp.einsum("ntd,dv->ntv", h, w)
        if with_bias:
            z = z + b[None, None, :]
        lp, ent = token_logprobs(z, tg, return_entropy=True)
        return jnp.sum(c1 * lp + c2 * ent), (lp, ent)

    def chunked(h, w, b):
        lp, ent = chunked_token_logprobs(
            h, w, tg, chunk_size=chunk, return_entropy=True, bias=b if with_bias else None
        )
        return jnp.sum(c1 * lp + c2 * ent), (lp, ent)

    grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))
    (vf, (lpf, entf)), gf = grad(full)(h, w, b)
    (vc, (lpc, entc)), gc = grad(chunked)(h, w, b)
    np.testing.assert_allclose(np.asarray(lpc), np.asarray(lpf), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(entc), np.asarray(entf), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(vc), float(vf), rtol=1e-5, atol=1e-5)
    for a, bb in zip(gc, gf, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(bb), rtol=1e-5, atol=1e-5)
    want_lp, want_ent = ref_logprobs_entropy(np.einsum("ntd,dv->ntv", h, w) + (b if with_bias else 0), tg)
    np.testing.assert_allclose(np.asarray(lpc), want_lp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(entc), want_ent, rtol=1e-5, atol=1e-5)
    lp_only = chunked_token_logprobs(h, w, tg, chunk_size=chunk, bias=bias)
    np.testing.assert_allclose(np.asarray(lp_only), np.asarray(lpc), rtol=1e-6, atol=1e-6)


def test_chunked_grad_matches_finite_difference_direction():
    """An independent gradient check (not via the full path): central differences."""
    h, w, _, tg = make(seed=6, n=2, t=3, d=4, v=7)
    f = lambda h, w: jnp.sum(chunked_token_logprobs(h, w, tg, chunk_size=4))
    gh, gw = jax.grad(f, argnums=(0, 1))(h, w)
    rng = np.random.default_rng(7)
    dh = rng.normal(size=h.shape)
    dw = rng.normal(size=w.shape)
    eps = 1e-3
    h64, w64 = h.astype(np.float64), w.astype(np.float64)

    def f64(hh, ww):
        lp, _ = ref_logprobs_entropy(np.einsum("ntd,dv->ntv", hh, ww), tg)
        return lp.sum()

    fd = (f64(h64 + eps * dh, w64 + eps * dw) - f64(h64 - eps * dh, w64 - eps * dw)) / (2 * eps)
    an = float(np.sum(np.asarray(gh, np.float64) * dh) + np.sum(np.asarray(gw, np.float64) * dw))
    np.testing.assert_allclose(an, fd, rtol=1e-4)


def test_chunked_vmap_and_bf16():
    h, w, b, tg = make(seed=8)
    hs = np.stack([h, h * 0.5])
    tgs = np.stack([tg, tg[::-1]])
    out = jax.jit(jax.vmap(lambda x, y: chunked_token_logprobs(x, w, y, chunk_size=5)))(hs, tgs)
    for k in range(2):
        want = token_logprobs(np.einsum("ntd,dv->ntv", hs[k], w), tgs[k])
        np.testing.assert_allclose(np.asarray(out[k]), np.asarray(want), rtol=1e-5, atol=1e-5)
    hb, wb = jnp.asarray(h, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    lp = chunked_token_logprobs(hb, wb, tg, chunk_size=4)
    assert lp.dtype == jnp.float32
    z = np.einsum("ntd,dv->ntv", np.asarray(hb, np.float32), np.asarray(wb, np.float32))
    np.testing.assert_allclose(np.asarray(lp), ref_logprobs_entropy(z, tg)[0], rtol=1e-4, atol=1e-4)


def test_token_logprobs_vmap():
    rng = np.random.default_rng(9)
    logits = rng.normal(size=(3, 2, 4, 6)).astype(np.float32)
    tg = rng.integers(0, 6, size=(3, 2, 4)).astype(np.int32)
    out = jax.jit(jax.vmap(token_logprobs))(logits, tg)
    for k in range(3):
        np.testing.assert_allclose(
            np.asarray(out[k]), ref_logprobs_entropy(logits[k], tg[k])[0], rtol=1e-5, atol=1e-6
        )


def test_chunked_never_materialises_full_logits():
    """Compiled temp memory of the chunked value_and_grad stays far below one [N*T, V] buffer."""
    n, t, d, v, chunk = 4, 256, 16, 8192, 64
    args = (
        jax.ShapeDtypeStruct((n, t, d), jnp.float32),
        jax.ShapeDtypeStruct((d, v), jnp.float32),
        jax.ShapeDtypeStruct((n, t), jnp.int32),
    )
    f = lambda h, w, tg: jnp.sum(chunked_token_logprobs(h, w, tg, chunk_size=chunk))
    temp = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(*args).compile()
    temp = temp.memory_analysis().temp_size_in_bytes
    logits_bytes = n * t * v * 4
    assert temp < logits_bytes / 4, (temp, logits_bytes)


def test_validation():
    h, w, b, tg = make(seed=10)
    logits = np.einsum("ntd,dv->ntv", h, w)
    with pytest.raises(ValueError, match="logits"):
        token_logprobs(logits[0], tg)
    with pytest.raises(TypeError, match="logits"):
        token_logprobs(logits.astype(np.int32), tg)
    with pytest.raises(TypeError, match="targets"):
        token_logprobs(logits, tg.astype(np.float32))
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(logits, tg[:, :-1])
    with pytest.raises(ValueError, match="hidden"):
        chunked_token_logprobs(h[0], w, tg, chunk_size=4)
    with pytest.raises(ValueError, match="unembedding"):
        chunked_token_logprobs(h, w[:-1], tg, chunk_size=4)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_token_logprobs(h, w, tg, chunk_size=0)
    with pytest.raises(ValueError, match="bias"):
        chunked_token_logprobs(h, w, tg, chunk_size=4, bias=b[:-1])
    with pytest.raises(TypeError, match="unembedding"):
        chunked_token_logprobs(h, w.astype(np.int32), tg, chunk_size=4)


def test_benchmark_quick_smoke():
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "logprobs_memory.py"), "--quick"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300, check=True,
    )
    out = json.loads(proc.stdout)
    mem, tim = out["memory"], out["time"]
    assert out["quick"] is True
    assert mem["temp_bytes_chunked"] > 0 and mem["temp_bytes_full"] > 0
    assert mem["full_over_chunked"] == pytest.approx(mem["temp_bytes_full"] / mem["temp_bytes_chunked"])
    assert mem["full_over_chunked"] > 1.0
    assert tim["median_s_full"] > 0 and tim["median_s_chunked"] > 0
    assert tim["chunked_over_full"] == pytest.approx(tim["median_s_chunked"] / tim["median_s_full"])


def test_minus_inf_logits_give_finite_values_and_gradients():
    """Banned vocabulary entries (logit -inf) have probability 0 and never make a NaN."""
    rng = np.random.default_rng(11)
    logits = rng.normal(size=(2, 3, 6)).astype(np.float32)
    logits[..., 4:] = -np.inf
    tg = rng.integers(0, 4, size=(2, 3)).astype(np.int32)
    f = lambda z: token_logprobs(z, tg, return_entropy=True)
    lp, ent = f(logits)
    want_lp, want_ent = ref_logprobs_entropy(logits[..., :4], tg)
    np.testing.assert_allclose(np.asarray(lp), want_lp, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ent), want_ent, rtol=1e-5, atol=1e-6)
    g = jax.grad(lambda z: jnp.sum(f(z)[0]) + jnp.sum(f(z)[1]))(logits)
    g = np.asarray(g)
    assert np.all(np.isfinite(g)) and np.all(g[..., 4:] == 0.0)


@pytest.mark.parametrize("bad", [-1, 19, 1000])
def test_out_of_range_targets_raise_when_concrete_and_give_nan_when_traced(bad):
    h, w, b, tg = make(seed=11)
    logits = np.einsum("ntd,dv->ntv", h, w) + b
    tg = tg.copy()
    tg[1, 3] = bad  # V = 19
    with pytest.raises(ValueError, match=r"targets must be token ids in \[0, V=19\)"):
        token_logprobs(logits, tg)
    with pytest.raises(ValueError, match=r"targets must be token ids in \[0, V=19\)"):
        chunked_token_logprobs(h, w, tg, chunk_size=4, bias=b)
    good = np.where(tg == bad, 0, tg)
    want, want_ent = ref_logprobs_entropy(logits, good)
    full, ent = jax.jit(lambda x, t: token_logprobs(x, t, return_entropy=True))(logits, tg)
    chunked = jax.jit(lambda t: chunked_token_logprobs(h, w, t, chunk_size=4, bias=b))(tg)
    for got in (np.asarray(full), np.asarray(chunked)):
        assert np.isnan(got[1, 3])
        keep = tg != bad
        np.testing.assert_allclose(got[keep], want[keep], atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent), want_ent, atol=1e-5)  # no target in the entropy
