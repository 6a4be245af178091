"""load_hf places each parameter in its target sharding on a mesh (8 simulated CPU devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, PartitionSpec

from jaxgrpo.model import load_hf
from tests.model.hf_helpers import build_tiny_hf

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.hf, pytest.mark.multidevice]


RULES = {"embed": "fsdp", "vocab": None, "heads": "tensor", "mlp": "tensor"}


def _mesh_and_checkpoint(tmp_path):
    if len(jax.devices()) < 8:
        pytest.skip("needs the 8 simulated CPU devices of tests/conftest.py")
    build_tiny_hf(tmp_path, "qwen2", tie_word_embeddings=False)
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("fsdp", "tensor"),
                axis_types=(AxisType.Auto, AxisType.Auto))


def test_load_into_mesh_shardings(tmp_path):
    mesh, rules = _mesh_and_checkpoint(tmp_path), RULES
    model = load_hf(tmp_path, mesh=mesh, rules=rules)
    q = model.layers[0].q_weight[...]
    assert q.sharding.spec == PartitionSpec("fsdp", "tensor", None)
    assert len(q.addressable_shards) == 8
    assert q.addressable_shards[0].data.shape == (64 // 2, 4 // 4, 16)
    # 2 KV heads on tensor=4: k/v fall back to replicated over tensor (RULES has no kv_heads).
    assert model.layers[0].kv_weight[...].sharding.spec == PartitionSpec("fsdp", None, None, None)
    assert model.layers[1].down_weight[...].sharding.spec == PartitionSpec("tensor", "fsdp")
    assert model.embedding[...].sharding.spec == PartitionSpec(None, "fsdp")
    plain = load_hf(tmp_path)
    np.testing.assert_array_equal(np.asarray(q), np.asarray(plain.layers[0].q_weight[...]))
    tokens = jnp.arange(8, dtype=jnp.int32).reshape(1, 8)
    got = np.asarray(jax.jit(lambda m, t: m(t))(model, tokens))  # runs on the sharded params
    np.testing.assert_allclose(got, np.asarray(plain(tokens)), atol=1e-5, rtol=0)


def test_load_inside_a_mesh_context(tmp_path):
    """`jaxgrpo train` loads HF weights with its mesh set: the logical names must not be read as
    mesh axes while the model is traced abstractly."""
    mesh = _mesh_and_checkpoint(tmp_path)
    with jax.set_mesh(mesh):
        model = load_hf(tmp_path, mesh=mesh, rules=RULES)
    assert model.embedding[...].sharding.spec == PartitionSpec(None, "fsdp")
