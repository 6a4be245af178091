"""Flax NNX decoder for the Llama, Qwen2 and Qwen3 families.

Parameters are stored in a layout that makes each step a few large matmuls: the query projection
``q_weight [D, H, Dh]``, keys and values fused as ``kv_weight [D, 2, Hkv, Dh]`` (index 0 of the
second axis is k, 1 is v) and gate/up fused as ``gate_up_weight [D, 2, F]``. Every parameter
carries logical axis names in its ``out_sharding`` metadata (``nnx.get_partition_spec`` returns
them); the words are ``"vocab"``, ``"embed"``, ``"heads"`` (query heads), ``"kv_heads"``,
``"head_dim"`` and ``"mlp"``. Query head ``i`` belongs to KV group ``i // (H / Hkv)``: with
``"heads"`` and ``"kv_heads"`` split contiguously over the same mesh axis, a shard holding query
head ``i`` holds KV head ``i // (H / Hkv)`` too (or k/v are replicated when the axis does not
divide ``Hkv``), so grouped-query attention needs no cross-shard exchange of keys or values.

Attention masks work on cache *slots*: a sequence occupies slots ``0..S-1``; a key slot is
attended when it holds a real token (``key_valid``) and is not after the query's slot. Positions
(for RoPE) are separate, so left-padded prompts get positions ``0..len-1`` on their real tokens.
The attention math lives in ``jaxgrpo.model.attention``: the cache-free forward uses
``ModelConfig.attention`` (memory-efficient by default), the cached decode step the plain
version. ``ModelConfig.remat`` rematerialises whole blocks (or all but their weight matmuls) in
the backward pass of the cache-free forward.

Sharding: under a mesh context (``jax.set_mesh``) the activations entering and leaving every
block are constrained to rows split over ``("data", "fsdp")``
(``jaxgrpo.sharding.constrain_rows``); without a mesh context the constraint is a no-op.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgrpo.model.attention import attention
from jaxgrpo.model.config import ModelConfig
from jaxgrpo.sharding import constrain_cached_query, constrain_rows


def _dtype(name: str):
    return jnp.bfloat16 if name == "bfloat16" else jnp.float32


def _param(rngs: nnx.Rngs | None, shape, axes, cfg: ModelConfig, init: str = "normal"):
    dt = _dtype(cfg.param_dtype)
    if init == "ones":
        value = jnp.ones(shape, dt)
    elif init == "zeros":
        value = jnp.zeros(shape, dt)
    else:
        # The barrier keeps XLA from fusing the scaling into the sampler, so an init under jit
        # (jaxgrpo.sharding.init_sharded) gives the same bits as an eager one.
        noise = jax.lax.optimization_barrier(jax.random.normal(rngs.params(), shape, jnp.float32))
        value = (cfg.initializer_range * noise).astype(dt)
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, dtype) -> jax.Array:
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last axis, the statistics in float32."""
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    w = weight.astype(dtype).reshape((1,) * (x.ndim - 1) + weight.shape)
    return w * (x32 * jax.lax.rsqrt(var + eps)).astype(dtype)


def apply_rope(x_BxTxNxDh: jax.Array, positions_BxT: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotary embedding in the HF (rotate-half) convention; angles computed in float32."""
    ang_BxTxF = positions_BxT.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]
    cos = jnp.cos(ang_BxTxF)[:, :, None, :].astype(x_BxTxNxDh.dtype)
    sin = jnp.sin(ang_BxTxF)[:, :, None, :].astype(x_BxTxNxDh.dtype)
    half = x_BxTxNxDh.shape[-1] // 2
    x1, x2 = x_BxTxNxDh[..., :half], x_BxTxNxDh[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class Block(nnx.Module):
    """Pre-norm decoder block: x + Attn(RMSNorm(x)), then x + SwiGLU(RMSNorm(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, f, h, k, dh = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads,
                          cfg.num_kv_heads, cfg.head_dim)
        self.attn_norm = _param(rngs, (d,), ("embed",), cfg, "ones")
        self.q_weight = _param(rngs, (d, h, dh), ("embed", "heads", "head_dim"), cfg)
        self.kv_weight = _param(rngs, (d, 2, k, dh), ("embed", None, "kv_heads", "head_dim"), cfg)
        if cfg.qkv_bias:
            self.q_bias = _param(rngs, (h, dh), ("heads", "head_dim"), cfg, "zeros")
            self.kv_bias = _param(rngs, (2, k, dh), (None, "kv_heads", "head_dim"), cfg, "zeros")
        else:
            self.q_bias = self.kv_bias = None
        if cfg.qk_norm:
            self.q_norm = _param(rngs, (dh,), ("head_dim",), cfg, "ones")
            self.k_norm = _param(rngs, (dh,), ("head_dim",), cfg, "ones")
        else:
            self.q_norm = self.k_norm = None
        self.o_weight = _param(rngs, (h, dh, d), ("heads", "head_dim", "embed"), cfg)
        self.mlp_norm = _param(rngs, (d,), ("embed",), cfg, "ones")
        self.gate_up_weight = _param(rngs, (d, 2, f), ("embed", None, "mlp"), cfg)
        self.down_weight = _param(rngs, (f, d), ("mlp", "embed"), cfg)

    def qkv(self, x_BxTxD, positions_BxT, inv_freq, cache_shape=None):
        """The attention inputs of ``x``: queries ``[B, T, H, Dh]`` and keys, values
        ``[B, Hkv, T, Dh]`` (RoPE applied to queries and keys), in the compute dtype.

        ``cache_shape`` (the ``[B, Hkv, S, Dh]`` shape of a KV cache being decoded against)
        pins the queries' sharding to that cache's (``constrain_cached_query``).
        """
        cfg = self.cfg
        dt = _dtype(cfg.dtype)
        y = rms_norm(x_BxTxD, self.attn_norm[...], cfg.rms_norm_eps, dt)
        q = jnp.einsum("btd,dnh->btnh", y, self.q_weight[...].astype(dt))
        kvp = jnp.einsum("btd,dcnh->btcnh", y, self.kv_weight[...].astype(dt))
        if self.q_bias is not None:
            q = q + self.q_bias[...].astype(dt)[None, None]
            kvp = kvp + self.kv_bias[...].astype(dt)[None, None]
        kk, v = kvp[:, :, 0], kvp[:, :, 1]
        if cache_shape is not None:  # decoding against a cache whose slots may be split
            q = constrain_cached_query(q, cache_shape)
        if self.q_norm is not None:
            q = rms_norm(q, self.q_norm[...], cfg.rms_norm_eps, dt)
            kk = rms_norm(kk, self.k_norm[...], cfg.rms_norm_eps, dt)
        q = apply_rope(q, positions_BxT, inv_freq)
        # Keys/values as [B, Hkv, T, Dh]: per-(b, kv-head) contiguous [S, Dh] blocks make the
        # decode-time attention a plain batched matmul.
        kk = jnp.transpose(apply_rope(kk, positions_BxT, inv_freq), (0, 2, 1, 3))
        v = jnp.transpose(v, (0, 2, 1, 3))
        return q, kk, v

    def out(self, x_BxTxD, att_BxTxHxDh):
        """The rest of the block after attention: ``x + o_proj(att)``, then the SwiGLU MLP."""
        cfg = self.cfg
        dt = _dtype(cfg.dtype)
        x_BxTxD = x_BxTxD + jnp.einsum("btnh,nhd->btd", att_BxTxHxDh,
                                       self.o_weight[...].astype(dt))
        y = rms_norm(x_BxTxD, self.mlp_norm[...], cfg.rms_norm_eps, dt)
        gu = jnp.einsum("btd,dcf->btcf", y, self.gate_up_weight[...].astype(dt))
        act = jax.nn.silu(gu[:, :, 0]) * gu[:, :, 1]
        return x_BxTxD + jnp.einsum("btf,fd->btd", act, self.down_weight[...].astype(dt))

    def __call__(self, x_BxTxD, positions_BxT, inv_freq, kv, write_index, key_valid_BxS):
        """One block. ``kv`` is ``None`` (keys are this call's tokens) or ``(k, v)`` caches
        ``[B, Hkv, S, Dh]`` into which this call's keys are written at slot ``write_index``.

        Returns the new activations and the (updated) ``(k, v)`` of this layer.
        """
        cfg = self.cfg
        q, kk, v = self.qkv(x_BxTxD, positions_BxT, inv_freq,
                            None if kv is None else kv[0].shape)
        if kv is None:
            k_all, v_all = kk, v
        else:
            k_cache, v_cache = kv
            k_all = jax.lax.dynamic_update_slice_in_dim(k_cache, kk.astype(k_cache.dtype),
                                                        write_index, axis=2)
            v_all = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype),
                                                        write_index, axis=2)
        impl = cfg.attention if kv is None else "plain"  # decode: a few queries vs the cache
        att = attention(q, k_all, v_all, key_valid_BxS, q_offset=0 if kv is None else write_index,
                        impl=impl, block_size=cfg.attention_block)
        return self.out(x_BxTxD, att), (k_all, v_all)


def _block_forward(layer: Block, x_BxTxD, positions_BxT, inv_freq, mask_BxT):
    """One block of the cache-free forward (keys are the call's own tokens)."""
    return layer(x_BxTxD, positions_BxT, inv_freq, None, 0, mask_BxT)[0]


def _remat(fn, mode: str):
    """``fn`` wrapped for ``ModelConfig.remat``: "none" as is, "block" recomputed whole in the
    backward pass (only its inputs are kept), "dots" recomputed except the weight matmuls
    (``jax.checkpoint_policies.dots_with_no_batch_dims_saveable``). ``nnx.remat`` leaves the
    module graph, hence the parameter paths, unchanged."""
    if mode == "none":
        return fn
    policy = None if mode == "block" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return nnx.remat(fn, policy=policy)


class Transformer(nnx.Module):
    """Decoder-only transformer (Llama / Qwen2 / Qwen3).

    ``model(tokens)`` returns float32 logits ``[B, T, V]``; with ``return_hidden=True`` the
    final-normed hidden states ``[B, T, D]`` (``hidden @ model.unembedding()`` gives the logits).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if not isinstance(cfg, ModelConfig):
            raise TypeError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.embedding = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg)
        self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = _param(rngs, (cfg.hidden_size,), ("embed",), cfg, "ones")
        self.lm_head = (None if cfg.tie_word_embeddings else
                        _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), cfg))

    # -- pieces -------------------------------------------------------------------------------
    def unembedding(self) -> jax.Array:
        """The output projection ``[D, V]`` (the transposed embedding when tied)."""
        if self.lm_head is None:
            return self.embedding[...].T
        return self.lm_head[...]

    def logits(self, hidden_BxTxD: jax.Array) -> jax.Array:
        """Float32 logits ``[..., V]`` from final-normed hidden states ``[..., D]``."""
        dt = _dtype(self.cfg.dtype)
        h = hidden_BxTxD.astype(dt)
        if self.lm_head is None:
            return jnp.einsum("...d,vd->...v", h, self.embedding[...].astype(dt),
                              preferred_element_type=jnp.float32)
        return jnp.einsum("...d,dv->...v", h, self.lm_head[...].astype(dt),
                          preferred_element_type=jnp.float32)

    def _inv_freq(self) -> jax.Array:
        return jnp.asarray(self.cfg.rope_inv_freq(), jnp.float32)

    def _check_tokens(self, tokens):
        if not hasattr(tokens, "shape") or tokens.ndim != 2:
            raise ValueError(f"tokens must be an int array [B, T], got shape "
                             f"{getattr(tokens, 'shape', None)}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise TypeError(f"tokens must be integer (int32), got {tokens.dtype}")

    def init_cache(self, batch: int, max_len: int) -> list[tuple[jax.Array, jax.Array]]:
        """Zeroed KV cache: one ``(k, v)`` pair ``[B, Hkv, S, Dh]`` per layer, compute dtype."""
        shape = (batch, self.cfg.num_kv_heads, max_len, self.cfg.head_dim)
        dt = _dtype(self.cfg.dtype)
        return [(jnp.zeros(shape, dt), jnp.zeros(shape, dt)) for _ in range(self.cfg.num_layers)]

    def forward_cached(self, tokens_BxT, positions_BxT, cache, write_index, key_valid_BxS):
        """Run ``T`` new tokens against a KV cache.

        Args:
            tokens_BxT: int32 ``[B, T]`` new tokens, written to slots ``write_index..+T-1``.
            positions_BxT: int32 ``[B, T]`` RoPE positions of those tokens.
            cache: list of per-layer ``(k, v)`` ``[B, Hkv, S, Dh]`` (see ``init_cache``).
            write_index: int32 scalar slot of the first new token (shared by the batch).
            key_valid_BxS: bool ``[B, S]``, slots holding real tokens (the new ones included).

        Returns:
            ``(hidden [B, T, D] final-normed, new_cache)``.
        """
        dt = _dtype(self.cfg.dtype)
        x = constrain_rows(self.embedding[...][tokens_BxT].astype(dt))
        inv_freq = self._inv_freq()
        new_cache = []
        for layer, kv in zip(self.layers, cache, strict=True):
            x, kv = layer(x, positions_BxT, inv_freq, kv, write_index, key_valid_BxS)
            x = constrain_rows(x)
            new_cache.append(kv)
        return rms_norm(x, self.final_norm[...], self.cfg.rms_norm_eps, dt), new_cache

    def _scanned_blocks(self, x, positions, inv_freq, mask):
        """The decoder blocks as one ``lax.scan`` over their parameters stacked ``[L, ...]``.

        The same computation as the Python loop over ``self.layers`` (tested equal), but XLA
        compiles the block once, so compile time does not grow with depth. The parameters stay
        one ``Block`` per layer (paths, checkpoints and the HF key table are unchanged); they are
        stacked inside the traced function (a copy of the parameters, ``L`` times one block's,
        whose gradient unstacks into the per-layer gradients).
        """
        graphdef, first = nnx.split(self.layers[0])
        states = [first] + [nnx.state(layer) for layer in list(self.layers)[1:]]
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)

        def body(h, state):
            return constrain_rows(_block_forward(nnx.merge(graphdef, state), h, positions,
                                                 inv_freq, mask)), None

        if self.cfg.remat != "none":
            policy = (None if self.cfg.remat == "block"
                      else jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
            body = jax.checkpoint(body, policy=policy)
        return jax.lax.scan(body, x, stacked)[0]

    def __call__(self, tokens, *, positions=None, mask=None, return_hidden: bool = False):
        """Full forward, no cache.

        Args:
            tokens: int32 ``[B, T]``.
            positions: int32 ``[B, T]``; default ``cumsum(mask) - 1`` clipped at 0 (so left
                padding works), which is ``0..T-1`` without a mask.
            mask: bool ``[B, T]``, real tokens; padded slots are never attended as keys.
            return_hidden: return final-normed hidden ``[B, T, D]`` instead of logits.

        Returns:
            float32 logits ``[B, T, V]``, or hidden states ``[B, T, D]`` in the compute dtype.
        """
        self._check_tokens(tokens)
        b, t = tokens.shape
        if mask is None:
            mask = jnp.ones((b, t), bool)
        elif tuple(mask.shape) != (b, t):
            raise ValueError(f"mask must have the shape of tokens {(b, t)}, got {mask.shape}")
        mask = jnp.asarray(mask).astype(bool)
        if positions is None:
            positions = jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)
        elif tuple(positions.shape) != (b, t):
            raise ValueError(
                f"positions must have the shape of tokens {(b, t)}, got {positions.shape}")
        dt = _dtype(self.cfg.dtype)
        x = constrain_rows(self.embedding[...][tokens].astype(dt))
        inv_freq = self._inv_freq()
        if self.cfg.scan_layers:
            x = self._scanned_blocks(x, positions, inv_freq, mask)
        else:
            step = _remat(_block_forward, self.cfg.remat)
            for layer in self.layers:
                x = constrain_rows(step(layer, x, positions, inv_freq, mask))
        hidden = rms_norm(x, self.final_norm[...], self.cfg.rms_norm_eps, dt)
        return hidden if return_hidden else self.logits(hidden)
