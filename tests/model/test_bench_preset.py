"""The benchmark preset is the Qwen2 shape the peer benchmarks use, parameter for parameter."""

import jax
import pytest
from flax import nnx

from jaxgrpo.model import ModelConfig, Transformer
from jaxgrpo.model.hf import config_from_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.hf


def _qwen2_config():
    """The peers' model, written out as a Qwen2 config (Qwen2's small models tie embeddings)."""
    return transformers.Qwen2Config(
        vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=4, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=True, max_position_embeddings=4096,
    )


def test_bench29m_has_the_parameters_of_qwen2_for_causal_lm():
    hf = _qwen2_config()
    model = transformers.Qwen2ForCausalLM(hf)
    hf_count = sum(p.numel() for p in model.parameters())  # a tied weight is one parameter
    ours = ModelConfig.bench29m()
    assert hf_count == ours.num_params == 29_377_024
    abstract = nnx.eval_shape(lambda: Transformer(ours, rngs=nnx.Rngs(0)))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))) == hf_count
    # Every shape and numerics field as the HF loader reads them from that config.
    assert config_from_hf(hf) == ours
