"""Logits parity with transformers (PyTorch) for tiny random Llama / Qwen2 / Qwen3, and export."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgrpo.model import ModelConfig, Transformer, load_hf, save_hf
from tests.model.hf_helpers import FAMILIES, build_tiny_hf

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.hf


def _torch_logits(model, tokens, mask=None):
    with torch.no_grad():
        t = torch.tensor(np.asarray(tokens), dtype=torch.long)
        kw = {}
        if mask is not None:
            m = torch.tensor(np.asarray(mask), dtype=torch.long)
            kw = dict(attention_mask=m, position_ids=torch.clamp(m.cumsum(-1) - 1, min=0))
        return model(t, **kw).logits.float().numpy()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers(tmp_path, family):
    model_type, extra = FAMILIES[family]
    hf_model = build_tiny_hf(tmp_path, model_type, **extra)
    model = load_hf(tmp_path)
    assert model.cfg.tie_word_embeddings == extra["tie_word_embeddings"]
    assert model.cfg.num_kv_heads < model.cfg.num_heads  # GQA exercised
    tokens = jax.random.randint(jax.random.key(1), (2, 11), 0, model.cfg.vocab_size, jnp.int32)
    ours = np.asarray(jax.jit(lambda m, t: m(t))(model, tokens))
    ref = _torch_logits(hf_model, tokens)
    assert ours.shape == ref.shape == (2, 11, model.cfg.vocab_size)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_left_padded_logits_match_transformers(tmp_path):
    hf_model = build_tiny_hf(tmp_path, "qwen2", tie_word_embeddings=True)
    model = load_hf(tmp_path)
    tokens = np.array([[0, 0, 0, 5, 9, 13, 2], [4, 8, 15, 16, 23, 42, 7]], np.int32)
    mask = tokens != 0
    mask[1] = True
    ours = np.asarray(model(jnp.asarray(tokens), mask=jnp.asarray(mask)))
    ref = _torch_logits(hf_model, tokens, mask)
    np.testing.assert_allclose(ours[mask], ref[mask], atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama_untied", "qwen2_tied", "qwen3_untied"])
def test_export_reloads_in_transformers_with_same_logits(tmp_path, family):
    import transformers

    model_type, extra = FAMILIES[family]
    cfg = ModelConfig(vocab_size=89, hidden_size=64, intermediate_size=96, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16,
                      tie_word_embeddings=extra["tie_word_embeddings"],
                      qkv_bias=model_type == "qwen2", qk_norm=model_type == "qwen3")
    model = Transformer(cfg, rngs=nnx.Rngs(3))
    # Random norms/biases so the export of every tensor is checked.
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if "norm" in str(path[-1]) or "bias" in str(path[-1]):
            k = jax.random.key(hash(path) % 2**31)
            var.set_value(var.get_value() + 0.1 * jax.random.normal(k, var.shape))
    save_hf(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == model_type
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    tokens = jax.random.randint(jax.random.key(2), (2, 9), 0, cfg.vocab_size, jnp.int32)
    np.testing.assert_allclose(np.asarray(model(tokens)), _torch_logits(hf_model, tokens),
                               atol=1e-4, rtol=0)
    # And our own loader round-trips the export exactly.
    again = load_hf(tmp_path)
    np.testing.assert_array_equal(np.asarray(again(tokens)), np.asarray(model(tokens)))


def test_hidden_times_unembedding_is_logits(tmp_path):
    build_tiny_hf(tmp_path, "llama", tie_word_embeddings=False)
    model = load_hf(tmp_path)
    tokens = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
    hidden = model(tokens, return_hidden=True)
    assert hidden.shape == (2, 6, model.cfg.hidden_size)
    np.testing.assert_allclose(np.asarray(hidden @ model.unembedding()),
                               np.asarray(model(tokens)), atol=1e-5, rtol=0)


def test_bfloat16_checkpoint_loads(tmp_path):
    hf_model = build_tiny_hf(tmp_path, "qwen3", torch_dtype=torch.bfloat16,
                             tie_word_embeddings=True)
    header_len = int.from_bytes((tmp_path / "model.safetensors").read_bytes()[:8], "little")
    header = json.loads((tmp_path / "model.safetensors").read_bytes()[8:8 + header_len])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    model32 = load_hf(tmp_path)  # bf16 weights upcast exactly to float32
    tokens = jnp.arange(10, dtype=jnp.int32).reshape(1, 10)
    ref = _torch_logits(hf_model.float(), tokens)
    np.testing.assert_allclose(np.asarray(model32(tokens)), ref, atol=1e-4, rtol=0)
    model16 = load_hf(tmp_path, dtype=jnp.bfloat16)
    assert model16.layers[0].q_weight[...].dtype == jnp.bfloat16
    assert model16.layers[0].kv_weight[...].dtype == jnp.bfloat16
    logits16 = np.asarray(model16(tokens))
    assert logits16.dtype == np.float32
    # bf16 compute: agree with the float32 logits to bf16 precision.
    np.testing.assert_allclose(logits16, ref, atol=0.1, rtol=0)
