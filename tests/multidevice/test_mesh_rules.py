"""make_mesh validation, the rule tables, divisibility fallback and batch placement."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec

from jaxgrpo import sharding as shd
from jaxgrpo.config import MeshConfig
from jaxgrpo.model.config import ModelConfig
from jaxgrpo.model.transformer import Transformer
from jaxgrpo.train.state import split_model

pytestmark = pytest.mark.multidevice


@pytest.mark.parametrize("spec, shape", [
    (MeshConfig(), (8, 1, 1)),
    (MeshConfig(data=2, fsdp=-1), (2, 4, 1)),
    ({"fsdp": 2, "tensor": 2, "data": -1}, (2, 2, 2)),
    ((1, -1, 2), (1, 4, 2)),
])
def test_make_mesh_resolves_sizes(spec, shape):
    mesh = shd.make_mesh(spec)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert tuple(mesh.shape[a] for a in mesh.axis_names) == shape
    assert mesh.axis_types == (AxisType.Auto,) * 3  # MeshConfig's default, stated explicitly
    # Row-major device order: the tensor axis is the fastest-varying.
    assert list(mesh.devices.reshape(-1)) == jax.devices()


def test_make_mesh_axis_types_and_subset_of_devices():
    mesh = shd.make_mesh((2, 2, 1), jax.devices()[:4], axis_types="explicit")
    assert mesh.axis_types == (AxisType.Explicit,) * 3
    assert mesh.devices.size == 4
    # MeshConfig.devices takes the first n devices.
    mesh = shd.make_mesh(MeshConfig(devices=2))
    assert mesh.shape == {"data": 2, "fsdp": 1, "tensor": 1}
    assert list(mesh.devices.reshape(-1)) == jax.devices()[:2]
    with pytest.raises(ValueError, match="mesh.devices"):
        shd.make_mesh(MeshConfig(devices=9))


@pytest.mark.parametrize("spec, exc, words", [
    ((3, 1, 1), ValueError, "needs 3 devices"),
    ((3, -1, 1), ValueError, "must divide"),
    ((-1, -1, 1), ValueError, "at most one"),
    ((0, 1, 8), ValueError, "mesh.data"),
    ((8, 1), ValueError, "3 entries"),
    ({"model": 8}, ValueError, "unknown mesh axes"),
    ((8.0, 1, 1), TypeError, "must be an int"),
    ("8,1,1", TypeError, "config must be"),
])
def test_make_mesh_rejects_bad_sizes(spec, exc, words):
    with pytest.raises(exc, match=words):
        shd.make_mesh(spec)


def test_make_mesh_rejects_bad_axis_type():
    with pytest.raises(ValueError, match="axis_types"):
        shd.make_mesh((8, 1, 1), axis_types="manual")


def test_logical_to_spec():
    rules = {"embed": "fsdp", "heads": "tensor", "both": ("data", "fsdp")}
    assert shd.logical_to_spec(("embed", "heads", None), rules) == PartitionSpec("fsdp", "tensor",
                                                                                 None)
    assert shd.logical_to_spec(("unknown",), rules) == PartitionSpec(None)
    # A mesh axis splits at most one dimension: the later use is dropped.
    assert shd.logical_to_spec(("both", "embed"), rules) == PartitionSpec(("data", "fsdp"), None)


def test_rules_with_unknown_mesh_axis_rejected():
    _, params = split_model(nnx.eval_shape(lambda: Transformer(ModelConfig.tiny(64),
                                                               rngs=nnx.Rngs(0))))
    with pytest.raises(ValueError, match="unknown mesh axes"):
        shd.param_partition_specs(params, {"embed": "model"})
    with pytest.raises(TypeError, match="rules must be a mapping"):
        shd.param_partition_specs(params, [("embed", "fsdp")])


def test_param_shardings_replicate_dimensions_the_mesh_does_not_divide():
    # 3 query heads and 1 kv head: a tensor axis of 2 splits neither.
    cfg = ModelConfig.tiny(64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=3,
                           num_kv_heads=1, head_dim=16)
    _, params = split_model(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    mesh = shd.make_mesh((2, 2, 2))
    sh = shd.param_shardings(params, mesh, shd.TRAIN_RULES)
    assert sh["layers"][0]["q_weight"].get_value().spec == PartitionSpec("fsdp", None, None)
    assert sh["layers"][0]["kv_weight"].get_value().spec == PartitionSpec("fsdp", None, None, None)
    assert sh["layers"][0]["down_weight"].get_value().spec == PartitionSpec("tensor", "fsdp")


def test_shard_batch_keeps_groups_whole():
    mesh = shd.make_mesh((2, 2, 2))
    g = 3
    rows = np.arange(8 * g * 5).reshape(8 * g, 5)
    out = shd.shard_batch({"x": rows}, mesh, group_size=g)
    assert out["x"].sharding.spec == PartitionSpec(("data", "fsdp"), None)
    for shard in out["x"].addressable_shards:
        start = shard.index[0].start
        assert start % g == 0 and shard.data.shape[0] % g == 0  # whole groups on every device
        np.testing.assert_array_equal(np.asarray(shard.data), rows[shard.index])
    with pytest.raises(ValueError, match="divisible by data\\*fsdp=4"):
        shd.shard_batch({"x": rows[: 6 * g]}, mesh, group_size=g)
    with pytest.raises(ValueError, match="every leaf"):
        shd.shard_batch({"x": rows, "y": rows[:3]}, mesh, group_size=g)


def test_init_sharded_materialises_params_in_their_layout():
    cfg = ModelConfig.tiny(64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                           num_kv_heads=1, head_dim=16)
    mesh = shd.make_mesh((2, 2, 2), axis_types="auto")
    graphdef, params, rest = shd.init_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(5)), mesh,
                                              shd.TRAIN_RULES)
    _, ref = split_model(Transformer(cfg, rngs=nnx.Rngs(5)))
    want = shd.param_shardings(ref, mesh, shd.TRAIN_RULES)
    for leaf, sh, r in zip(jax.tree.leaves(params), jax.tree.leaves(
            want, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)),
            jax.tree.leaves(ref), strict=True):
        assert leaf.sharding == sh
        np.testing.assert_allclose(np.asarray(leaf), np.asarray(r), rtol=1e-6, atol=0)
    model = nnx.merge(graphdef, params, rest)
    assert model.layers[0].q_weight.get_value().sharding.spec == PartitionSpec("fsdp", "tensor",
                                                                               None)
    # One KV head: a tensor axis of 2 cannot split it, so k/v are replicated over tensor.
    assert model.layers[0].kv_weight.get_value().sharding.spec == PartitionSpec("fsdp", None,
                                                                                None, None)


def test_reshard_train_layout_to_rollout_layout_and_back():
    cfg = ModelConfig.tiny(64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                           num_kv_heads=1, head_dim=16)
    mesh = shd.make_mesh((2, 2, 2), axis_types="auto")
    _, params, _ = shd.init_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), mesh,
                                    shd.TRAIN_RULES)
    host = jax.tree.map(np.asarray, params)
    roll = shd.reshard(params, shd.param_shardings(params, mesh, shd.ROLLOUT_RULES))
    emb = roll["embedding"].get_value()
    assert emb.sharding.spec == PartitionSpec("tensor", None)  # gathered over fsdp
    assert emb.addressable_shards[0].data.shape == (32, 32)
    back = shd.reshard(roll, shd.param_shardings(params, mesh, shd.TRAIN_RULES))
    assert back["embedding"].get_value().sharding.spec == PartitionSpec("tensor", "fsdp")
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(host), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_sharded_step_refuses_explicit_mesh_axes():
    import optax

    from jaxgrpo.train.state import init_train_state
    from jaxgrpo.train.step import StepConfig, make_train_step

    cfg = ModelConfig.tiny(64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                           num_kv_heads=1, head_dim=16)
    parts, params = split_model(Transformer(cfg, rngs=nnx.Rngs(0)))
    tx = optax.sgd(0.1)
    state = init_train_state(params, tx, 0, with_ref=False)
    mesh = shd.make_mesh((2, 2, 2), axis_types="explicit")
    st_sh = shd.state_shardings(state, mesh, shd.TRAIN_RULES, tx)
    with pytest.raises(ValueError, match="Auto axes"):
        make_train_step(parts, tx, StepConfig(), state_sharding=st_sh,
                        batch_sharding=shd.batch_sharding(mesh, 2))
    with pytest.raises(ValueError, match="together"):
        make_train_step(parts, tx, StepConfig(), state_sharding=st_sh)
