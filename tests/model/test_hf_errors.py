"""Bad HF directories give one clear sentence naming the file or key; the big-vocab bf16 load."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgrpo.model import load_hf
from jaxgrpo.model.hf import _read_header, write_safetensors
from tests.model.hf_helpers import build_tiny_hf

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.hf


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    build_tiny_hf(d, "llama", tie_word_embeddings=False)
    return d


def _copy(src, dst):
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _rewrite(directory, edit):
    """Apply ``edit(dict of arrays)`` to model.safetensors."""
    file = directory / "model.safetensors"
    refs = _read_header(file)
    from jaxgrpo.model.hf import _load_tensor

    tensors = {k: np.array(_load_tensor(r)) for k, r in refs.items()}
    edit(tensors)
    write_safetensors(file, tensors)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model directory .*nope does not exist"):
        load_hf(tmp_path / "nope")


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config.json is missing"):
        load_hf(tmp_path)


def test_missing_weight_names_the_key(saved, tmp_path):
    d = _copy(saved, tmp_path)
    _rewrite(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"weight 'model.layers.1.mlp.up_proj.weight' is missing"):
        load_hf(d)


def test_no_weight_files(saved, tmp_path):
    d = _copy(saved, tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no \*.safetensors weights found"):
        load_hf(d)


def test_unsupported_model_type(saved, tmp_path):
    d = _copy(saved, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config.json: model_type 'gpt2' is not supported"):
        load_hf(d)


def test_shape_mismatch_names_key_and_file(saved, tmp_path):
    d = _copy(saved, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"weight 'model.layers.0.mlp.gate_proj.weight' in "
                                         r"model.safetensors has shape \(96, 64\) but config.json "
                                         r"implies \(128, 64\)"):
        load_hf(d)


def test_sharded_checkpoint_with_index(saved, tmp_path):
    """Split the weights over two files plus an index; the loader reads both."""
    refs = _read_header(saved / "model.safetensors")
    from jaxgrpo.model.hf import _load_tensor

    keys = sorted(refs)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    d = tmp_path / "sharded"
    d.mkdir()
    (d / "config.json").write_text((saved / "config.json").read_text())
    weight_map = {}
    for name, ks in halves.items():
        write_safetensors(d / name, {k: np.array(_load_tensor(refs[k])) for k in ks})
        weight_map.update({k: name for k in ks})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    tokens = jnp.arange(8, dtype=jnp.int32).reshape(1, 8)
    np.testing.assert_array_equal(np.asarray(load_hf(d)(tokens)),
                                  np.asarray(load_hf(saved)(tokens)))
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"lists shard 'model-00002-of-00002"):
        load_hf(d)


def test_qwen2_bf16_checkpoint_with_vocab_151936(tmp_path):
    """A Qwen2-shaped, 4-layer bfloat16 checkpoint with the real Qwen vocab loads and runs."""
    hf = build_tiny_hf(tmp_path, "qwen2", torch_dtype=torch.bfloat16, vocab_size=151936,
                       hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                       tie_word_embeddings=True)
    tokens = np.array([[151935, 0, 1000, 151643, 77]], np.int32)
    with torch.no_grad():
        ref = hf.float()(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    del hf
    model = load_hf(tmp_path, dtype=jnp.bfloat16)
    assert model.cfg.vocab_size == 151936 and model.cfg.num_layers == 4
    assert model.embedding[...].dtype == jnp.bfloat16
    logits = np.asarray(model(jnp.asarray(tokens)))
    assert logits.shape == (1, 5, 151936)
    np.testing.assert_allclose(logits, ref, atol=0.05, rtol=0)
    del model, logits
    model32 = load_hf(tmp_path)  # the bf16 weights upcast exactly
    np.testing.assert_allclose(np.asarray(model32(jnp.asarray(tokens))), ref, atol=1e-4, rtol=0)


def test_param_dtype_and_config_overrides(saved):
    model = load_hf(saved, dtype=jnp.bfloat16, param_dtype=jnp.float32, initializer_range=0.5)
    assert (model.cfg.dtype, model.cfg.param_dtype) == ("bfloat16", "float32")
    assert model.cfg.initializer_range == 0.5
    assert {str(v.get_value().dtype) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
            } == {"float32"}
    assert load_hf(saved, dtype=jnp.bfloat16).layers[0].q_weight[...].dtype == jnp.bfloat16
    with pytest.raises(TypeError, match="'num_experts'.*not ModelConfig fields"):
        load_hf(saved, num_experts=4)
