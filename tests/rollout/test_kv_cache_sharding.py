"""The KV cache on a mesh: ``kv_cache_spec`` and what the sampler compiles to.

A model with 2 KV heads on ``tensor=4`` cannot split the KV-head axis, so the cache's slot axis
is split over ``tensor`` instead; with rows split over ``fsdp=2`` every device then holds 1/8 of
the cache that the decode loop carries.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxgrpo import sharding as shd
from jaxgrpo.model import ModelConfig, Transformer
from jaxgrpo.rollout import generate, generate_functional
from jaxgrpo.rollout import sampler as sampler_mod

pytestmark = pytest.mark.multidevice

CFG = ModelConfig(vocab_size=61, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=8, num_kv_heads=2, head_dim=16, qkv_bias=True)


def test_kv_cache_spec_rules():
    rows = ("data", "fsdp")
    mesh = shd.make_mesh((1, 2, 4))
    assert shd.kv_cache_spec(8, 4, 64, mesh) == P(rows, "tensor", None, None)
    assert shd.kv_cache_spec(8, 2, 64, mesh) == P(rows, None, "tensor", None)
    assert shd.kv_cache_spec(8, 2, 63, mesh) == P(rows, None, None, None)
    assert shd.kv_cache_spec(3, 8, 64, mesh) == P("data", "tensor", None, None)  # fsdp dropped
    mesh = shd.make_mesh((2, 2, 2))
    assert shd.kv_cache_spec(8, 1, 64, mesh) == P(rows, None, "tensor", None)
    assert shd.kv_cache_spec(2, 2, 64, mesh) == P("data", "tensor", None, None)
    assert shd.kv_cache_spec(2, 2, 64, shd.make_mesh((8, 1, 1))) == P(None, None, None, None)
    with pytest.raises(ValueError, match="num_kv_heads"):
        shd.kv_cache_spec(8, 0, 64, mesh)


def _carried_cache_shapes(hlo: str, cfg: ModelConfig) -> list[tuple[int, ...]]:
    """Per-device shapes of the ``[B, Hkv, S, Dh]`` arrays the decode while-loop carries (the
    loop also carries the ``[D, 2, Hkv, Dh]`` k/v weights, told apart by their leading ``D``)."""
    line = next(ln for ln in hlo.splitlines() if " while(" in ln)
    carry = line.split(" while(")[0]
    shapes = [tuple(int(d) for d in m.split(",")) for m in
              re.findall(rf"(?:f32|bf16)\[(\d+,\d+,\d+,{cfg.head_dim})\]", carry)]
    return [x for x in shapes if x[0] != cfg.hidden_size]


def _sharded_inputs(model, mesh, prompts, mask):
    graphdef, state = nnx.split(model)
    state = shd.reshard(state, shd.param_shardings(state, mesh, shd.ROLLOUT_RULES))
    rows = shd.batch_sharding(mesh, 2)
    return graphdef, state, jax.device_put(prompts, rows), jax.device_put(mask, rows)


def test_greedy_rollout_on_mesh_equals_one_device_and_splits_the_cache_8_ways():
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    model.embedding.set_value(model.embedding.get_value() * 3.0)
    rng = np.random.default_rng(0)
    prompts = rng.integers(1, 61, (4, 16)).astype(np.int32)
    mask = np.ones((4, 16), bool)
    mask[1, :5] = False
    kw = dict(num_samples=2, max_new_tokens=16, greedy=True, buckets=(16,))
    want = generate(model, prompts, mask, jax.random.key(0), **kw)

    mesh = shd.make_mesh((1, 2, 4))
    graphdef, state, tok, msk = _sharded_inputs(model, mesh, prompts, mask)
    with jax.set_mesh(mesh):
        got = generate_functional(graphdef, state, tok, msk, jax.random.key(0), **kw)
        hlo = sampler_mod._generate_jit.lower(
            graphdef, state, tok, msk, jax.random.key(0), np.float32(1.0),
            np.full((4,), -1, np.int32), num_samples=2, max_new_tokens=16, top_k=0, top_p=1.0,
            stop_sequences=(), greedy=True, pad_id=0).compile().as_text()
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_array_equal(np.asarray(got.mask), np.asarray(want.mask))
    np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs), atol=1e-5,
                               rtol=0)
    # N = 8 rows over fsdp=2, S = 32 slots over tensor=4: [4, 2, 8, 16] per device, k and v for
    # each of the 2 layers.
    shapes = _carried_cache_shapes(hlo, CFG)
    assert shapes == [(4, 2, 8, 16)] * 4, shapes


def test_tpu_compiled_cache_is_one_eighth_per_device():
    """Deviceless compile for a v5p 2x2x2 slice (8 chips), mesh (1, 2, 4), 2 KV heads."""
    pytest.importorskip("libtpu", reason="needs libtpu for a deviceless TPU compile")
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x2")
    except Exception as e:  # noqa: BLE001 - libtpu present but unusable here
        pytest.skip(f"no deviceless TPU topology: {type(e).__name__}: {str(e)[:120]}")
    mesh = jax.sharding.Mesh(np.array(topo.devices).reshape(1, 2, 4), shd.MESH_AXES)
    cfg = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2,
                      num_heads=8, num_kv_heads=2, head_dim=64, dtype="bfloat16")
    with jax.set_mesh(None):
        graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    sh = shd.param_shardings(state, mesh, shd.ROLLOUT_RULES)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         state, sh)
    p, tp, g, tn = 2, 16, 4, 2032
    rows, rep = NamedSharding(mesh, P(shd.BATCH_AXES, None)), NamedSharding(mesh, P())
    key = jax.eval_shape(lambda: jax.random.key(0))
    args = (jax.ShapeDtypeStruct((p, tp), jnp.int32, sharding=rows),
            jax.ShapeDtypeStruct((p, tp), jnp.bool_, sharding=rows),
            jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep),
            jax.ShapeDtypeStruct((), jnp.float32, sharding=rep),
            jax.ShapeDtypeStruct((4,), jnp.int32, sharding=rep))
    with jax.set_mesh(mesh):
        compiled = sampler_mod._generate_jit.lower(
            graphdef, state, *args, num_samples=g, max_new_tokens=tn, top_k=0, top_p=1.0,
            stop_sequences=(), greedy=True, pad_id=0).compile()
    n, s = p * g, tp + tn
    global_cache = 2 * cfg.num_layers * n * cfg.num_kv_heads * s * cfg.head_dim * 2  # bf16
    shapes = _carried_cache_shapes(compiled.as_text(), cfg)
    assert len(shapes) == 2 * cfg.num_layers
    per_device = sum(int(np.prod(x)) for x in shapes) * 2
    assert per_device * 8 == global_cache, (shapes, per_device, global_cache)
    # Decoding all-gathers no cache: the query heads are gathered instead (kv_cache_spec puts
    # the slots on tensor, constrain_cached_query replicates q over tensor to match).
    hlo = compiled.as_text()
    gathered = [int(np.prod([int(d) for d in m.split(",")])) for m in
                re.findall(r"= (?:bf16|f32)\[([\d,]+)\]\S* all-gather(?:-start)?\(", hlo)]
    per_layer_shard = n * cfg.num_kv_heads * s * cfg.head_dim // 8
    assert gathered and max(gathered) < per_layer_shard, (gathered, per_layer_shard)
