"""Shared set-up for the sharding tests: a nano transformer, a fixed batch, one-device reference.

Used by the pytest tests and by the two-process worker script (which imports it by path).
"""

import jax
import numpy as np
import optax
from flax import nnx

from jaxgrpo.model.config import ModelConfig
from jaxgrpo.model.transformer import Transformer
from jaxgrpo.train import batch as batch_lib
from jaxgrpo.train.state import init_train_state, split_model
from jaxgrpo.train.step import StepConfig

VOCAB = 64
P, G, TP, TC = 8, 2, 4, 6
STEP_CFG = StepConfig(microbatches=2, shuffle=False, logprob_chunk=4)


def model_config() -> ModelConfig:
    # Widths chosen so every sharded dimension divides the test meshes (the one KV head is
    # replicated over tensor).
    return ModelConfig.tiny(VOCAB, hidden_size=32, intermediate_size=64, num_layers=2,
                            num_heads=2, num_kv_heads=1, head_dim=16)


def make_tx():
    return optax.sgd(0.5, momentum=0.9)


def fresh_state(seed: int = 0):
    """``(parts, tx, state)`` with every array on the default device (numpy-reproducible)."""
    model = Transformer(model_config(), rngs=nnx.Rngs(seed))
    parts, params = split_model(model)
    tx = make_tx()
    return parts, tx, init_train_state(params, tx, seed, with_ref=False)


def host_batch(seed: int = 0) -> batch_lib.TrainBatch:
    rng = np.random.default_rng(seed)
    ptok = rng.integers(1, VOCAB, (P, TP)).astype(np.int32)
    pmask = np.ones((P, TP), bool)
    pmask[::3, 0] = False  # some left-padded prompts
    ctok = rng.integers(1, VOCAB, (P, G, TC)).astype(np.int32)
    lengths = rng.integers(1, TC + 1, (P, G))
    cmask = np.arange(TC)[None, None, :] < lengths[..., None]
    adv = rng.normal(size=(P, G)).astype(np.float32)
    return batch_lib.assemble(ptok, pmask, ctok, cmask, adv, old_logp=np.zeros((P, G, TC)),
                              task_ids=np.arange(P) % 2)


def to_numpy(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)
