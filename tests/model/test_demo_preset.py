"""The ``demo`` preset: the built-in CPU demo's small decoder."""

import jax
from flax import nnx

from jaxgrpo.model import ModelConfig, Transformer


def test_demo_preset_is_small_and_its_param_count_matches_the_model():
    cfg = ModelConfig.demo(100)
    m = Transformer(cfg, rngs=nnx.Rngs(0))
    n = sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
    assert n == cfg.num_params and 300_000 < n < 600_000
    assert n < ModelConfig.tiny(100).num_params / 4
    assert ModelConfig.demo(100, num_layers=1).num_layers == 1
