"""Matmul FLOP counters over loops: the jaxpr (global) and the compiled HLO (per device)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgrpo.train.flops import hlo_matmul_flops, jaxpr_matmul_flops

L, B, D = 6, 16, 32


def _scanned(w, x, *, remat=False):
    def body(h, wl):
        return jnp.tanh(h @ wl), None

    body = jax.checkpoint(body) if remat else body
    return jnp.sum(jax.lax.scan(body, x, w)[0])


def _args(sharding=None):
    return (jax.ShapeDtypeStruct((L, D, D), jnp.float32),
            jax.ShapeDtypeStruct((B, D), jnp.float32, sharding=sharding))


@pytest.mark.parametrize("remat", [False, True])
def test_jaxpr_counts_every_scan_iteration_and_the_recompute(remat):
    fwd = 2.0 * L * B * D * D
    traced = jax.jit(jax.grad(lambda w, x: _scanned(w, x, remat=remat))).trace(*_args())
    # forward, then two matmuls per layer in the backward; remat recomputes the forward once
    assert jaxpr_matmul_flops(traced.jaxpr) == (4 if remat else 3) * fwd
    assert jaxpr_matmul_flops(jax.jit(_scanned).trace(*_args()).jaxpr) == fwd


def test_hlo_counts_loops_by_trip_count_where_xla_counts_one_body():
    fwd = 2.0 * L * B * D * D
    compiled = jax.jit(jax.grad(_scanned)).lower(*_args()).compile()
    flops, unknown = hlo_matmul_flops(compiled.as_text())
    assert unknown == 0
    assert flops == 3 * fwd
    xla = compiled.cost_analysis()
    xla = xla[0] if isinstance(xla, list) else xla
    assert xla["flops"] < 0.5 * flops  # XLA: one body per loop


@pytest.mark.multidevice
def test_partitioned_program_is_one_share_per_device():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("d",))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d", None))
    f = jax.jit(jax.grad(_scanned))
    glob = jaxpr_matmul_flops(f.trace(*_args(rows)).jaxpr)
    per, _ = hlo_matmul_flops(f.lower(*_args(rows)).compile().as_text())
    assert per == pytest.approx(glob / 8)
    # The same rows replicated on every device: each one does the whole work.
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    per_rep, _ = hlo_matmul_flops(jax.jit(jax.grad(_scanned)).lower(*_args(rep)).compile()
                                  .as_text())
    assert per_rep == pytest.approx(glob)


def test_hlo_without_entry_is_refused():
    with pytest.raises(ValueError, match="ENTRY"):
        hlo_matmul_flops("HloModule m\n")


def test_tpu_convolutions_count_as_their_matmuls():
    """The TPU compiler writes (batched) matmuls as convolutions whose windows, padding and
    dilations stand for batch dimensions: each counts exactly its matmul's FLOPs."""
    try:
        from jax.experimental import topologies

        topo = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x2")
    except Exception as e:  # noqa: BLE001 - libtpu missing or unusable here
        pytest.skip(f"no deviceless TPU topology: {type(e).__name__}: {e}")
    mesh = jax.sharding.Mesh(np.array(topo.devices).reshape(8), ("d",))
    spec = lambda *s: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*s))  # noqa: E731
    b, t, k, r, h, s = 16, 1, 2, 4, 128, 640
    q = jax.ShapeDtypeStruct((b, t, k, r, h), jnp.bfloat16, sharding=spec("d"))
    kc = jax.ShapeDtypeStruct((b, k, s, h), jnp.bfloat16, sharding=spec("d"))
    w = jax.ShapeDtypeStruct((k, r, h, 256), jnp.bfloat16, sharding=spec())

    def f(q, kc, w):  # decode-style attention scores, values and an output projection
        sc = jnp.einsum("btkrh,bksh->bkrts", q, kc)
        att = jnp.einsum("bkrts,bksh->btkrh", sc, kc)
        return jnp.einsum("btkrh,krhd->btd", att, w)

    want = 2.0 * (b * k * r * t * s * h * 2 + b * t * k * r * h * 256) / 8
    with jax.default_device(topo.devices[0]):
        compiled = jax.jit(f).lower(q, kc, w).compile()
    assert hlo_matmul_flops(compiled.as_text())[0] == pytest.approx(want)


def test_window_counting_against_a_loop():
    from jaxgrpo.train.flops import _count_congruent, _window_pairs

    rng = np.random.default_rng(0)
    for _ in range(2000):
        first, last = int(rng.integers(0, 30)), int(rng.integers(-1, 60))
        a, b, m = int(rng.integers(1, 20)), int(rng.integers(-40, 40)), int(rng.integers(1, 12))
        want = sum(1 for q in range(first, last + 1) if (a * q - b) % m == 0)
        assert _count_congruent(first, last, a, b, m) == want
    for size, window, stride, lo, ld, rd, out in [(1, 2, 1, 1, 1, 1, 2), (5, 5, 4, 0, 5, 1, 5),
                                                  (7, 3, 2, 2, 2, 1, 8), (4, 4, 1, 3, 1, 1, 4)]:
        length = (size - 1) * ld + 1
        want = sum(1 for p in range(out) for k in range(window)
                   if 0 <= p * stride + k * rd - lo < length
                   and (p * stride + k * rd - lo) % ld == 0)
        assert _window_pairs(size, window, stride, lo, ld, rd, out) == want


def test_loop_trip_count_follows_the_counters_start_and_step():
    """A ``counter < N`` loop whose counter starts at 1 and steps by 2 (the form of the TPU
    compiler's bidirectional windowed matmuls) runs ceil((9 - 1) / 2) = 4 bodies."""
    w = jax.ShapeDtypeStruct((D, D), jnp.float32)
    x = jax.ShapeDtypeStruct((B, D), jnp.float32)

    def f(w, x):
        return jax.lax.while_loop(lambda c: c[0] < 9, lambda c: (c[0] + 2, jnp.tanh(c[1] @ w)),
                                  (jnp.int32(1), x))[1]

    text = jax.jit(f).lower(w, x).compile().as_text()
    # Without XLA's own trip-count annotation the counter alone must give it.
    text = re.sub(r'"known_trip_count":\{"n":"\d+"\},?', "", text)
    assert hlo_matmul_flops(text) == (4 * 2.0 * B * D * D, 0)


_SPARSECORE_HLO = """HloModule m

%sc_fusion (p0: f32[3]) -> f32[3] {
  ROOT %p0 = f32[3]{0} parameter(0)
}, execution_thread="sparsecore"

%after_sc (a: f32[8,16], b: f32[16,16]) -> f32[8,16] {
  %a = f32[8,16]{1,0} parameter(0)
  %b = f32[16,16]{1,0} parameter(1)
  ROOT %d = f32[8,16]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%kernel_caller (p1: f32[8,16]) -> f32[8,16] {
  %p1 = f32[8,16]{1,0} parameter(0)
  ROOT %cc = f32[8,16]{1,0} custom-call(%p1), custom_call_target="tpu_custom_call", backend_config={"custom_call_config": {"body": "x", "cost": {
}}, metadata={op_name="kernel"}
}

%after (a: f32[8,16], b: f32[16,32]) -> f32[8,32] {
  %a = f32[8,16]{1,0} parameter(0)
  %b = f32[16,32]{1,0} parameter(1)
  ROOT %d = f32[8,32]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (x: f32[8,16], y: f32[16,32]) -> f32[8,32] {
  %x = f32[8,16]{1,0} parameter(0)
  %y = f32[16,32]{1,0} parameter(1)
  %s = f32[16,16]{1,0} constant({...})
  %k0 = f32[8,16]{1,0} call(%x, %s), to_apply=%after_sc
  %k = f32[8,16]{1,0} call(%k0), to_apply=%kernel_caller
  ROOT %c = f32[8,32]{1,0} call(%k, %y), to_apply=%after
}
"""


def test_computations_after_sparsecore_ones_and_multiline_custom_calls_are_read():
    """A computation may close with ``}, execution_thread=...`` and a custom call's backend
    config may span lines starting with ``}}``: neither hides the computations after them."""
    assert hlo_matmul_flops(_SPARSECORE_HLO) == (2.0 * 8 * 16 * 16 + 2.0 * 8 * 16 * 32, 0)
