"""The policy and its tokenizer, from config: the built-in tiny model or a local HF checkpoint."""

from __future__ import annotations

import pathlib

import jax.numpy as jnp
from flax import nnx

from jaxgrpo.config import ModelConfigSpec
from jaxgrpo.model import ModelConfig, Transformer, build_demo_tokenizer, load_hf, load_tokenizer


def build_policy(spec: ModelConfigSpec, *, seed: int, workdir: pathlib.Path, mesh=None,
                 rules=None):
    """Returns ``(model, tokenizer)``.

    ``preset: tiny`` builds the character-level demo tokenizer (saved under
    ``workdir/tokenizer`` in the HF format) and a randomly initialised tiny decoder; ``path``
    loads an HF checkpoint directory and its tokenizer (or ``spec.tokenizer``). Parameters are
    stored in ``spec.param_dtype``, computation runs in ``spec.dtype``. With a ``mesh``
    every parameter is created (or loaded) directly in its ``rules`` layout
    (``jaxgrpo.sharding.init_sharded`` / ``load_hf(mesh=, rules=)``).
    """
    dtype = jnp.bfloat16 if spec.dtype == "bfloat16" else jnp.float32
    param_dtype = jnp.bfloat16 if spec.param_dtype == "bfloat16" else jnp.float32
    if spec.preset in ("tiny", "demo"):
        tokenizer = build_demo_tokenizer(workdir / "tokenizer")
        make = ModelConfig.tiny if spec.preset == "tiny" else ModelConfig.demo
        cfg = make(len(tokenizer), dtype=str(spec.dtype), param_dtype=str(spec.param_dtype),
                   **model_overrides(spec))
        if mesh is None:
            return Transformer(cfg, rngs=nnx.Rngs(seed)), tokenizer
        from jaxgrpo.sharding import init_sharded

        graphdef, params, rest = init_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(seed)),
                                              mesh, rules)
        return nnx.merge(graphdef, params, rest), tokenizer
    model = load_hf(spec.path, dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules,
                    **model_overrides(spec))
    tokenizer = load_tokenizer(spec.tokenizer or spec.path)
    return model, tokenizer


def model_overrides(spec: ModelConfigSpec) -> dict:
    """The ``ModelConfig`` fields the experiment config sets on any model (preset or HF)."""
    return dict(attention=str(spec.attention), attention_block=int(spec.attention_block),
                remat=str(spec.remat), scan_layers=bool(spec.scan_layers))


def special_ids(tokenizer) -> tuple[int, tuple[int, ...]]:
    """``(pad_id, eos_ids)``; a tokenizer without a pad token pads with its EOS token."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token: completions could never end")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return int(pad), (int(eos),)
