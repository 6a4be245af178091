"""Model configuration: one frozen dataclass for the Llama / Qwen2 / Qwen3 decoder family."""

from __future__ import annotations

import dataclasses
import math

from jaxgrpo.config import Attention, Remat

DTYPES = ("float32", "bfloat16")
ROPE_TYPES = ("default", "linear", "llama3")
# Attention implementations of the cache-free forward (jaxgrpo.model.attention) and the
# rematerialisation modes of the decoder blocks; the choices are defined in jaxgrpo.config.
ATTENTION_IMPLS = tuple(a.value for a in Attention)
REMAT_MODES = tuple(m.value for m in Remat)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only transformer.

    The three supported HF families differ only in two flags: Qwen2 has biases on the q/k/v
    projections (``qkv_bias``), Qwen3 RMS-normalises q and k per head before RoPE (``qk_norm``).

    Attributes:
        vocab_size: V.
        hidden_size: model width D.
        intermediate_size: SwiGLU width F.
        num_layers: L.
        num_heads: query heads H.
        num_kv_heads: key/value heads (grouped-query attention); divides ``num_heads``.
        head_dim: Dh (need not equal D / H, as in Qwen3).
        rope_theta: RoPE base.
        rms_norm_eps: epsilon inside every RMSNorm.
        tie_word_embeddings: the unembedding is the transposed embedding.
        qkv_bias: q/k/v projections carry a bias (Qwen2).
        qk_norm: per-head RMSNorm on q and k before RoPE (Qwen3).
        dtype: compute dtype, "float32" or "bfloat16" (softmax, norms and logits stay float32).
        param_dtype: storage dtype of the parameters, "float32" or "bfloat16".
        rope_type: "default", "linear" (positions divided by ``rope_factor``) or "llama3".
        rope_factor, rope_low_freq_factor, rope_high_freq_factor, rope_original_max_position:
            the RoPE scaling parameters HF configs carry for "linear" and "llama3".
        max_position_embeddings: recorded for export; not a hard limit here.
        initializer_range: standard deviation of the random normal init.
        attention: attention of the cache-free forward (training, log-probs): "auto" (splash
            on TPU where the shapes allow it, else chunked), "plain" (full float32 scores
            ``[B, H, T, T]``), "chunked" (flash-style, memory linear in T) or "splash" (the
            Pallas TPU kernel; unsupported shapes fall back to chunked). The cached decode step
            always uses "plain". See ``jaxgrpo.model.attention``.
        attention_block: query/key block size of "chunked" and "splash".
        scan_layers: run the cache-free forward's blocks as one ``lax.scan`` over their stacked
            parameters (compile time independent of depth; the same numbers).
        remat: rematerialisation of the decoder blocks in the backward pass: "none" (keep all
            activations), "block" (keep each block's input only, recompute the block) or "dots"
            (keep the outputs of the weight matmuls,
            ``jax.checkpoint_policies.dots_with_no_batch_dims_saveable``, recompute the rest).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    qkv_bias: bool = False
    qk_norm: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    attention: str = "auto"
    attention_block: int = 512
    remat: str = "none"
    scan_layers: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}) for grouped-query attention"
            )
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(
                    f"ModelConfig.{name} must be one of {DTYPES}, got {getattr(self, name)!r}"
                )
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"ModelConfig.rope_type must be one of {ROPE_TYPES}, got {self.rope_type!r}"
            )
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(
                f"ModelConfig.attention must be one of {ATTENTION_IMPLS}, got {self.attention!r}"
            )
        b = self.attention_block
        if not isinstance(b, int) or isinstance(b, bool) or b <= 0:
            raise ValueError(f"ModelConfig.attention_block must be a positive int, got {b!r}")
        if not isinstance(self.scan_layers, bool):
            raise ValueError(f"ModelConfig.scan_layers must be a bool, got {self.scan_layers!r}")
        if self.remat not in REMAT_MODES:
            raise ValueError(
                f"ModelConfig.remat must be one of {REMAT_MODES}, got {self.remat!r}"
            )
        if not (self.rope_theta > 0 and self.rms_norm_eps > 0 and self.rope_factor > 0):
            raise ValueError("ModelConfig.rope_theta, rms_norm_eps and rope_factor must be > 0")

    @property
    def num_params(self) -> int:
        """Total parameter count (embedding counted once when tied)."""
        d, f, h, k, dh = (self.hidden_size, self.intermediate_size, self.num_heads,
                          self.num_kv_heads, self.head_dim)
        attn = d * (h + 2 * k) * dh + h * dh * d + (self.qkv_bias and (h + 2 * k) * dh)
        attn += 2 * dh if self.qk_norm else 0
        layer = attn + 3 * d * f + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return emb + self.num_layers * layer + d

    @property
    def matmul_params(self) -> int:
        """Parameters that take part in a matmul per token (layers plus the unembedding)."""
        d, f, h, k, dh = (self.hidden_size, self.intermediate_size, self.num_heads,
                          self.num_kv_heads, self.head_dim)
        layer = d * (h + 2 * k) * dh + h * dh * d + 3 * d * f
        return self.num_layers * layer + self.vocab_size * d

    @property
    def hf_model_type(self) -> str:
        """The HF ``model_type`` this config exports to."""
        if self.qk_norm and self.qkv_bias:
            raise ValueError(
                "ModelConfig with both qkv_bias and qk_norm matches no supported HF family "
                "(llama, qwen2, qwen3)"
            )
        return "qwen3" if self.qk_norm else "qwen2" if self.qkv_bias else "llama"

    @classmethod
    def tiny(cls, vocab_size: int, **overrides) -> ModelConfig:
        """A ~3M-parameter config (plus V x 256 embedding) that trains quickly on a CPU."""
        kw = dict(vocab_size=vocab_size, hidden_size=256, intermediate_size=768, num_layers=4,
                  num_heads=8, num_kv_heads=4, head_dim=32, tie_word_embeddings=True)
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def demo(cls, vocab_size: int, **overrides) -> ModelConfig:
        """A ~0.4M-parameter config for the built-in CPU demo (width 128, 2 layers)."""
        kw = dict(vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=32, tie_word_embeddings=True)
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def bench29m(cls, **overrides) -> ModelConfig:
        """The throughput benchmark config, a small Qwen2 shape: 29,377,024 parameters, vocab
        8,192, width 512, MLP 1,536, 8 layers, 8 query and 4 KV heads of 64, q/k/v biases, RoPE
        theta 1e6, RMSNorm epsilon 1e-6, tied embeddings (``Qwen2ForCausalLM`` of the same
        ``Qwen2Config`` has as many parameters; tests/model/test_bench_preset.py)."""
        kw = dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_layers=8,
                  num_heads=8, num_kv_heads=4, head_dim=64, tie_word_embeddings=True,
                  qkv_bias=True, rope_theta=1e6, rms_norm_eps=1e-6)
        kw.update(overrides)
        return cls(**kw)

    def rope_inv_freq(self) -> list[float]:
        """Inverse frequencies [Dh/2] after the configured RoPE scaling (as HF computes them)."""
        half = self.head_dim // 2
        inv = [1.0 / self.rope_theta ** (2 * i / self.head_dim) for i in range(half)]
        if self.rope_type == "linear":
            return [x / self.rope_factor for x in inv]
        if self.rope_type == "llama3":
            old = self.rope_original_max_position
            low_wl = old / self.rope_low_freq_factor
            high_wl = old / self.rope_high_freq_factor
            out = []
            for x in inv:
                wl = 2 * math.pi / x
                if wl < high_wl:
                    out.append(x)
                elif wl > low_wl:
                    out.append(x / self.rope_factor)
                else:
                    s = (old / wl - self.rope_low_freq_factor) / (
                        self.rope_high_freq_factor - self.rope_low_freq_factor)
                    out.append((1 - s) * x / self.rope_factor + s * x)
            return out
        return inv
