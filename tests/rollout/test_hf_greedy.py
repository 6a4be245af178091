"""Greedy decoding equals transformers' greedy ``generate``, token for token."""

import jax
import numpy as np
import pytest

from jaxgrpo.model import load_hf
from jaxgrpo.rollout import generate
from jaxgrpo.rollout.engine import PagedOptions
from tests.model.hf_helpers import build_tiny_hf

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.hf


@pytest.mark.parametrize("engine", ["static", "paged"])
@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_greedy_matches_transformers_generate(tmp_path, model_type, engine):
    hf_model = build_tiny_hf(tmp_path, model_type, seed=4, tie_word_embeddings=False)
    with torch.no_grad():  # smaller embeddings: the greedy stream does not repeat one token
        hf_model.model.embed_tokens.weight.mul_(0.3)
    hf_model.save_pretrained(str(tmp_path))
    model = load_hf(tmp_path)
    prompts = [[5, 17, 3], [40, 2, 88, 61, 9, 12, 30]]
    tp = max(map(len, prompts))
    tokens = np.zeros((2, tp), np.int32)
    mask = np.zeros((2, tp), bool)
    for i, p in enumerate(prompts):
        tokens[i, tp - len(p):] = p
        mask[i, tp - len(p):] = True
    n_new = 16
    ours = generate(model, tokens, mask, jax.random.key(0), num_samples=2,
                    max_new_tokens=n_new, greedy=True, engine=engine,
                    paged=PagedOptions(max_slots=3, steps_per_sync=5, page_size=4))
    assert bool(ours.mask.all()) and bool(ours.truncated.all())
    hf_model.generation_config.eos_token_id = None
    hf_model.generation_config.pad_token_id = 0
    for i, p in enumerate(prompts):
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=n_new,
                                    min_new_tokens=n_new, eos_token_id=None, pad_token_id=0)
        ref = out[0, len(p):].numpy()
        for g in range(2):
            np.testing.assert_array_equal(np.asarray(ours.tokens)[i, g], ref)
    assert len(set(np.asarray(ours.tokens)[0, 0].tolist())) > 1  # not a constant stream
