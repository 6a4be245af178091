"""load_hf on a mesh uses the trainer's parameter -> sharding mapping (with its divisibility
fallback), for real model shapes that the tensor axis does not divide."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from jaxgrpo import sharding as shd
from jaxgrpo.model import load_hf
from tests.model.hf_helpers import build_tiny_hf

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.hf, pytest.mark.multidevice]


def _logits_on_mesh_match_one_device(directory, mesh, rules):
    model = load_hf(directory, mesh=mesh, rules=rules)
    want = shd.param_shardings(_params(model), mesh, rules)
    for got, sh in zip(jax.tree.leaves(_params(model)), jax.tree.leaves(
            want, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)), strict=True):
        assert got.sharding == sh
    plain = load_hf(directory)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 1000, (4, 8)), jnp.int32)
    with jax.set_mesh(mesh):
        got = np.asarray(jax.jit(lambda m, t: m(t))(model, tokens))
    np.testing.assert_allclose(got, np.asarray(plain(tokens)), atol=1e-4, rtol=0)
    return model


def _params(model):
    return nnx.state(model, nnx.Param)


@pytest.mark.parametrize("mesh_shape", [(1, 2, 4), (2, 1, 4)])
def test_qwen25_05b_shapes_load_on_tensor_4(tmp_path, mesh_shape):
    """Qwen2.5-0.5B's attention and MLP shapes (14 query heads, 2 KV heads, head_dim 64, width
    896, MLP 4864, q/k/v biases) at depth 2 and with a vocabulary of 1024 instead of 151936
    (the vocabulary does not change how heads are placed)."""
    build_tiny_hf(tmp_path, "qwen2", vocab_size=1024, hidden_size=896, intermediate_size=4864,
                  num_hidden_layers=2, num_attention_heads=14, num_key_value_heads=2,
                  head_dim=64, tie_word_embeddings=True)
    mesh = shd.make_mesh(mesh_shape)
    model = _logits_on_mesh_match_one_device(tmp_path, mesh, shd.TRAIN_RULES)
    layer = model.layers[0]
    # 14 heads and 2 KV heads on tensor=4: both replicated over tensor, the rest still split.
    assert layer.q_weight[...].sharding.spec == PartitionSpec("fsdp", None, None)
    assert layer.kv_weight[...].sharding.spec == PartitionSpec("fsdp", None, None, None)
    assert layer.gate_up_weight[...].sharding.spec == PartitionSpec("fsdp", None, "tensor")
    assert model.embedding[...].sharding.spec == PartitionSpec("tensor", "fsdp")


def test_gqa_two_kv_heads_on_tensor_4(tmp_path):
    build_tiny_hf(tmp_path, "llama", vocab_size=1024, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)
    mesh = shd.make_mesh((2, 1, 4))
    model = _logits_on_mesh_match_one_device(tmp_path, mesh, shd.ROLLOUT_RULES)
    layer = model.layers[1]
    assert layer.q_weight[...].sharding.spec == PartitionSpec(None, "tensor", None)
    assert layer.kv_weight[...].sharding.spec == PartitionSpec(None, None, None, None)
