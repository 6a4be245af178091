"""Masked grouped-query attention: plain, chunked and splash against a NumPy loop reference."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgrpo.model.attention import (
    attention,
    chunked_attention,
    plain_attention,
    splash_attention,
    splash_unsupported_reason,
)


def _np_attention(q, k, v, valid, q_offset=0):
    """Loop reference in float64: q [B, T, H, Dh], k/v [B, Hkv, S, Dh], valid [B, S]."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b_, t_, h_, dh = q.shape
    hkv, s_ = k.shape[1], k.shape[2]
    out = np.zeros((b_, t_, h_, dh))
    for b in range(b_):
        for t in range(t_):
            for h in range(h_):
                j = h // (h_ // hkv)
                keys = [s for s in range(s_) if valid[b, s] and s <= q_offset + t]
                if not keys:
                    continue  # no allowed key: 0
                sc = np.array([q[b, t, h] @ k[b, j, s] / np.sqrt(dh) for s in keys])
                w = np.exp(sc - sc.max())
                w /= w.sum()
                out[b, t, h] = sum(wi * v[b, j, s] for wi, s in zip(w, keys, strict=True))
    return out


def _inputs(b, t, s, h, hkv, dh, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, t, h, dh)).astype(np.float32)
    k = rng.normal(size=(b, hkv, s, dh)).astype(np.float32)
    v = rng.normal(size=(b, hkv, s, dh)).astype(np.float32)
    valid = np.ones((b, s), bool)
    valid[0, :3] = False  # left padding: the first query rows have no key at all
    if b > 2:
        valid[2, s - 2:] = False  # right padding
        valid[2, 1] = False  # a hole
    return q, k, v, valid


# (B, T, S, H, Hkv, Dh, block, q_offset)
SHAPES = [
    (3, 13, 13, 4, 4, 8, 4, 0),  # GQA ratio 1, T not a multiple of the block
    (2, 16, 16, 8, 2, 8, 8, 0),  # ratio 4, T a multiple of the block
    (3, 7, 7, 4, 1, 4, 16, 0),  # MQA, block larger than T
    (2, 5, 11, 8, 2, 8, 4, 6),  # queries at slots 6..10 against 11 cached keys
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_plain_and_chunked_match_numpy_loop_reference(shape):
    b, t, s, h, hkv, dh, block, off = shape
    q, k, v, valid = _inputs(b, t, s, h, hkv, dh)
    want = _np_attention(q, k, v, valid, off)
    plain = jax.jit(lambda *a: plain_attention(*a, q_offset=off))(q, k, v, valid)
    chunked = jax.jit(lambda *a: chunked_attention(*a, q_offset=off, block_size=block))(
        q, k, v, valid)
    np.testing.assert_allclose(np.asarray(plain), want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(chunked), want, atol=1e-5, rtol=1e-5)
    if off == 0:  # the first rows of sequence 0 see no key: exactly 0
        assert not np.asarray(chunked)[0, :3].any() and not np.asarray(plain)[0, :3].any()


def _grads(fn, q, k, v, valid, w):
    loss = lambda q, k, v: jnp.sum(fn(q, k, v, valid) * w)  # noqa: E731
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_chunked_gradients_equal_plain(shape):
    b, t, s, h, hkv, dh, block, off = shape
    q, k, v, valid = _inputs(b, t, s, h, hkv, dh, seed=1)
    w = np.random.default_rng(2).normal(size=(b, t, h, dh)).astype(np.float32)
    gp = _grads(lambda *a: plain_attention(*a, q_offset=off), q, k, v, valid, w)
    gc = _grads(lambda *a: chunked_attention(*a, q_offset=off, block_size=block), q, k, v,
                valid, w)
    for name, a, c in zip("qkv", gp, gc, strict=True):
        assert np.isfinite(np.asarray(c)).all(), name
        np.testing.assert_allclose(np.asarray(c), np.asarray(a), atol=1e-5, rtol=1e-5,
                                   err_msg=f"d{name}")
    if off == 0:  # rows without a key: zero gradient w.r.t. their queries
        assert not np.asarray(gc[0])[0, :3].any()


def test_chunked_gradients_equal_finite_differences_of_the_reference():
    """One direction of the gradient against the float64 loop reference (central differences)."""
    q, k, v, valid = _inputs(3, 6, 6, 4, 2, 4, seed=3)
    rng = np.random.default_rng(4)
    w = rng.normal(size=q.shape)
    dirs = [rng.normal(size=x.shape) for x in (q, k, v)]
    g = _grads(lambda *a: chunked_attention(*a, block_size=4), q, k, v, valid,
               w.astype(np.float32))
    ref = lambda *x: float(np.sum(_np_attention(*x, valid) * w))  # noqa: E731
    eps = 1e-4
    for i in range(3):
        plus = [np.asarray(x, np.float64) for x in (q, k, v)]
        minus = [x.copy() for x in plus]
        plus[i] = plus[i] + eps * dirs[i]
        minus[i] = minus[i] - eps * dirs[i]
        fd = (ref(*plus) - ref(*minus)) / (2 * eps)
        np.testing.assert_allclose(float(np.sum(np.asarray(g[i]) * dirs[i])), fd, rtol=1e-4,
                                   atol=1e-4)


def test_chunked_under_vmap_and_traced_offset():
    b, t, s, h, hkv, dh = 2, 5, 9, 4, 2, 8
    q, k, v, valid = _inputs(b, t, s, h, hkv, dh, seed=5)
    stack = lambda x: np.stack([x, x[::-1]])  # noqa: E731
    qs, ks, vs, ms = map(stack, (q, k, v, valid))
    offs = jnp.array([4, 2], jnp.int32)
    f = jax.jit(jax.vmap(lambda q, k, v, m, o: chunked_attention(q, k, v, m, q_offset=o,
                                                                 block_size=4)))
    got = np.asarray(f(qs, ks, vs, ms, offs))
    for i in range(2):
        want = _np_attention(qs[i], ks[i], vs[i], ms[i], int(offs[i]))
        np.testing.assert_allclose(got[i], want, atol=1e-5, rtol=1e-5)


def test_auto_on_cpu_is_chunked_and_bfloat16_keeps_the_dtype():
    q, k, v, valid = _inputs(2, 12, 12, 4, 2, 8)
    a = jax.jit(lambda *x: attention(*x, impl="auto", block_size=4))(q, k, v, valid)
    c = jax.jit(lambda *x: chunked_attention(*x, block_size=4))(q, k, v, valid)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
    qb = jnp.asarray(q, jnp.bfloat16)
    out = attention(qb, k, v, valid, impl="chunked", block_size=4)
    assert out.dtype == jnp.bfloat16 and out.shape == q.shape


def test_splash_falls_back_with_the_reason():
    q, k, v, valid = _inputs(2, 12, 12, 4, 2, 8)
    with pytest.warns(UserWarning, match="falls back to 'chunked'.*TPU kernel"):
        out = attention(q, k, v, valid, impl="splash", block_size=4)
    np.testing.assert_allclose(np.asarray(out), _np_attention(q, k, v, valid), atol=1e-5)
    r = splash_unsupported_reason((2, 384, 4, 128), (2, 2, 384, 128), block_size=256)
    assert "multiple of the block size 256" in r
    assert "multiple of 128" in splash_unsupported_reason((2, 96, 4, 128), (2, 2, 96, 128))
    assert "cache-free" in splash_unsupported_reason((2, 4, 4, 128), (2, 2, 512, 128))
    assert splash_unsupported_reason((2, 1024, 4, 128), (2, 2, 1024, 128)) is None
    assert splash_unsupported_reason((2, 256, 4, 128), (2, 2, 256, 128)) is None  # block = T


@pytest.mark.parametrize("kwargs, match", [
    (dict(impl="flash"), "impl must be one of"),
    (dict(block_size=0), "block_size must be a positive int"),
])
def test_bad_arguments_raise_one_line_errors(kwargs, match):
    q, k, v, valid = _inputs(2, 4, 4, 4, 2, 8)
    with pytest.raises(ValueError, match=match):
        attention(q, k, v, valid, **kwargs)
    with pytest.raises(ValueError, match="key_valid must be"):
        attention(q, k, v, valid[:, :3])
    with pytest.raises(ValueError, match="do not fit q"):
        attention(q, k[:, :, :, :4], v[:, :, :, :4], valid)


def test_splash_interpret_mode_matches_plain():
    """The Pallas kernel in interpret mode (runs on CPU): outputs and gradients."""
    b, t, h, hkv, dh = 2, 256, 4, 2, 32
    q, k, v, valid = _inputs(b, t, t, h, hkv, dh, seed=6)
    w = np.random.default_rng(7).normal(size=q.shape).astype(np.float32)
    splash = lambda *a: splash_attention(*a, block_size=128, interpret=True)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = jax.jit(splash)(q, k, v, valid)
        gs = _grads(splash, q, k, v, valid, w)
    want = plain_attention(q, k, v, valid)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    assert not np.asarray(got)[0, :3].any()
    gp = _grads(plain_attention, q, k, v, valid, w)
    for name, a, c in zip("qkv", gp, gs, strict=True):
        np.testing.assert_allclose(np.asarray(c), np.asarray(a), atol=1e-5, rtol=1e-5,
                                   err_msg=f"d{name}")


def _attn_grad_temp_bytes(impl, t, *, b=2, h=8, hkv=2, dh=32, block=128):
    args = (jax.ShapeDtypeStruct((b, t, h, dh), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, t, dh), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, t, dh), jnp.float32),
            jax.ShapeDtypeStruct((b, t), jnp.bool_))
    loss = lambda q, k, v, m: jnp.sum(jnp.square(  # noqa: E731
        attention(q, k, v, m, impl=impl, block_size=block)))
    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    return f.lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_chunked_memory_is_linear_in_t_and_plain_quadratic():
    plain = {t: _attn_grad_temp_bytes("plain", t) for t in (1024, 2048)}
    chunked = {t: _attn_grad_temp_bytes("chunked", t) for t in (1024, 2048)}
    scores = 2 * 8 * 2048 * 2048 * 4  # one float32 [B, H, T, T] at T = 2048
    assert plain[2048] > scores  # plain holds at least the scores
    assert plain[2048] / plain[1024] > 3.5
    assert chunked[2048] / chunked[1024] < 2.1
    assert chunked[2048] < scores / 8
    assert plain[2048] > 20 * chunked[2048]


def _tpu_topology():
    try:
        from jax.experimental import topologies

        return topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x2")
    except Exception as exc:  # libtpu missing or unusable
        pytest.skip(f"TPU compilation unavailable (libtpu not importable or unusable): {exc}")


def test_splash_compiles_for_v5p_with_heads_over_tensor():
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    topo = _tpu_topology()
    mesh = jax.sharding.Mesh(np.array(topo.devices).reshape(1, 2, 4), ("data", "fsdp", "tensor"))
    b, t, h, hkv, dh = 4, 512, 8, 4, 128
    rows = ("data", "fsdp")

    def sds(shape, spec, dt=jnp.bfloat16):
        return jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, spec))

    args = (sds((b, t, h, dh), P(rows, None, "tensor")), sds((b, hkv, t, dh), P(rows, "tensor")),
            sds((b, hkv, t, dh), P(rows, "tensor")), sds((b, t), P(rows), jnp.bool_))
    loss = lambda q, k, v, m: jnp.sum(jnp.square(  # noqa: E731
        attention(q, k, v, m, impl="auto", block_size=256).astype(jnp.float32)))
    with jax.set_mesh(mesh), jax.default_device(topo.devices[0]):
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
    hlo = compiled.as_text()
    assert "tpu_custom_call" in hlo  # the Pallas kernel, not the chunked fallback
    # Each chip runs its rows and KV heads: no gathering of q, k or v.
    assert "all-gather" not in hlo and "all-to-all" not in hlo
