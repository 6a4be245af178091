"""Rolling out a round in several sampler calls (``rollout.max_prompts_per_call``)."""

import io

import jax
import numpy as np
import pytest
from flax import nnx

from jaxgrpo.config import ConfigError, load_config, validate
from jaxgrpo.model import ModelConfig, Transformer
from jaxgrpo.rollout import generate
from jaxgrpo.train import loop
from jaxgrpo.train.rollouts import generate_chunked
from tests.train.conftest import tiny_overrides


def _prompts(p=5, t=4, vocab=32, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, (p, t)).astype(np.int32)
    mask = np.ones((p, t), bool)
    mask[1, :2] = False  # a left-padded prompt
    return tokens, mask


def test_one_chunk_is_exactly_one_call():
    calls = []

    def gen(tok, msk, key):
        calls.append((tok.shape, np.asarray(jax.random.key_data(key))))
        return {"tokens": tok * 2}

    tok, msk = _prompts()
    key = jax.random.key(3)
    for max_prompts in (None, 5, 99):
        calls.clear()
        out = generate_chunked(gen, tok, msk, key, max_prompts)
        np.testing.assert_array_equal(out["tokens"], tok * 2)
        assert len(calls) == 1 and calls[0][0] == (5, 4)
        np.testing.assert_array_equal(calls[0][1], jax.random.key_data(key))


def test_chunks_are_consecutive_with_their_own_keys():
    seen = []

    def gen(tok, msk, key):
        seen.append((tok.copy(), np.asarray(jax.random.key_data(key))))
        return {"tokens": tok + 1, "mask": msk}

    tok, msk = _prompts()
    key = jax.random.key(7)
    out = generate_chunked(gen, tok, msk, key, 2)
    assert [s[0].shape[0] for s in seen] == [2, 2, 1]
    for c, (rows, k) in enumerate(seen):
        np.testing.assert_array_equal(rows, tok[2 * c:2 * c + 2])
        np.testing.assert_array_equal(k, jax.random.key_data(jax.random.fold_in(key, c)))
    np.testing.assert_array_equal(out["tokens"], tok + 1)
    np.testing.assert_array_equal(out["mask"], msk)
    with pytest.raises(ValueError, match="max_prompts"):
        generate_chunked(gen, tok, msk, key, 0)


def test_chunked_sampler_equals_separate_calls():
    model = Transformer(ModelConfig.tiny(32, hidden_size=32, intermediate_size=64, num_layers=1,
                                         num_heads=2, num_kv_heads=1, head_dim=16),
                        rngs=nnx.Rngs(0))
    tok, msk = _prompts()
    key = jax.random.key(1)
    kw = dict(num_samples=3, max_new_tokens=5, eos_ids=(0,), pad_id=0)
    gen = lambda t, m, k: generate(model, t, m, k, **kw)
    out = generate_chunked(gen, tok, msk, key, 3)
    first = gen(tok[:3], msk[:3], jax.random.fold_in(key, 0))
    second = gen(tok[3:], msk[3:], jax.random.fold_in(key, 1))
    for name in ("tokens", "logprobs", "mask", "lengths", "truncated"):
        want = np.concatenate([np.asarray(getattr(first, name)), np.asarray(getattr(second, name))])
        np.testing.assert_array_equal(np.asarray(getattr(out, name)), want)


def test_config_checks_max_prompts_per_call():
    with pytest.raises(ConfigError, match="rollout.max_prompts_per_call"):
        load_config(None, ["rollout.max_prompts_per_call=0"])
    with pytest.raises(ConfigError, match="multiple of the data-parallel size"):
        cfg = load_config(None, ["rollout.max_prompts_per_call=6", "mesh.data=4",
                                 "tasks.prompts_per_step=16"])
        validate(cfg, num_devices=4, check_paths=False)
    cfg = load_config(None, ["rollout.max_prompts_per_call=8", "mesh.data=4",
                             "tasks.prompts_per_step=16"])
    assert validate(cfg, num_devices=4, check_paths=False).rollout.max_prompts_per_call == 8


def test_run_with_chunked_rollouts(nano_model, tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, **{"train.steps": 1,
                                                        "rollout.max_prompts_per_call": 3}))
    out = loop.run(cfg, stream=io.StringIO())
    assert set(out["accuracy_after"]) == set(out["accuracy_before"])
