"""``model.param_dtype`` holds on every path: bfloat16 compute keeps float32 parameters, Adam
moments and reference parameters, whether the policy is a preset or an HF checkpoint, on one
device or created directly sharded on a mesh, and after a checkpoint save / restore."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgrpo import sharding as shd
from jaxgrpo.checkpoint import Checkpointer
from jaxgrpo.config import load_config
from jaxgrpo.model import build_demo_tokenizer
from jaxgrpo.train import loop
from tests.model.hf_helpers import build_tiny_hf
from tests.train.conftest import tiny_overrides

pytestmark = pytest.mark.multidevice


def _float_leaves(tree):
    return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]


def _assert_all(tree, dtype, what):
    leaves = _float_leaves(tree)
    assert leaves, what
    bad = sorted({str(x.dtype) for x in leaves if x.dtype != dtype})
    assert not bad, f"{what}: leaves in {bad}, expected only {jnp.dtype(dtype).name}"


def _check_state(state, dtype):
    _assert_all(state.params, dtype, "params")
    _assert_all(state.ref_params, dtype, "ref_params")
    adam = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
            if hasattr(s, "mu")]
    assert adam, "no Adam state found"
    for s in adam:
        _assert_all(s.mu, dtype, "adam mu")
        _assert_all(s.nu, dtype, "adam nu")


@pytest.mark.parametrize("source", ["hf", "preset"])
@pytest.mark.parametrize("mesh_shape", [None, (1, 2, 4)])
def test_bf16_compute_keeps_float32_state_and_restores_it(nano_model, tmp_path, source,
                                                          mesh_shape):
    model_keys = {"model.dtype": "bfloat16", "model.param_dtype": "float32"}
    if source == "hf":
        tok_dir = tmp_path / "tokenizer"
        vocab = len(build_demo_tokenizer(tok_dir))
        build_tiny_hf(tmp_path / "hf", "qwen2", vocab_size=vocab, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True)
        model_keys.update({"model.path": str(tmp_path / "hf"), "model.tokenizer": str(tok_dir)})
    else:
        model_keys["model.preset"] = "tiny"
    cfg = load_config(None, tiny_overrides(tmp_path / "run", **model_keys,
                                           **{"loss.kl_coef": 0.01}))
    mesh = None if mesh_shape is None else shd.make_mesh(mesh_shape)
    su = loop.setup(cfg, mesh=mesh)
    assert su.policy.parts.merge(su.params).cfg.dtype == "bfloat16"
    _assert_all(su.params, jnp.float32, "loaded params")
    if mesh is None:
        _check_state(loop.initial_state(cfg, su.params), jnp.float32)
        mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    tx = loop.optimizer(cfg)
    state, abstract_state, state_sh = loop.sharded_state(cfg, su.params, mesh, tx)
    _check_state(state, jnp.float32)
    _check_state(abstract_state, jnp.float32)
    with Checkpointer(tmp_path / "ckpt", keep=1, asynchronous=False) as ckpt:
        ckpt.save(0, state)
    with Checkpointer(tmp_path / "ckpt", create=False) as ckpt:
        restored, _ = ckpt.restore(abstract_state=shd.abstract_like(abstract_state, state_sh))
    _check_state(restored, jnp.float32)
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params), strict=True):
        assert a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
