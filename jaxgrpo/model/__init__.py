"""Policy model: Flax NNX decoder (Llama / Qwen2 / Qwen3), HF weights and tokenizers."""

from jaxgrpo.model.config import ModelConfig
from jaxgrpo.model.hf import load_hf, save_hf
from jaxgrpo.model.tokenizer import build_demo_tokenizer, load_tokenizer
from jaxgrpo.model.transformer import Transformer

__all__ = ["ModelConfig", "Transformer", "load_hf", "save_hf", "load_tokenizer",
           "build_demo_tokenizer"]
