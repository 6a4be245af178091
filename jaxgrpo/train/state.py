"""The train state: a plain pytree of arrays, so it jits, shards and checkpoints as one object.

The NNX model is split once (``nnx.split``) into a static ``graphdef``, the trainable ``params``
(``nnx.Param`` leaves) and the rest (non-trainable variables); only ``params`` and the optimiser
state live in :class:`TrainState`. Functions that need the module call ``nnx.merge`` inside jit.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxgrpo.train import rng as rng_lib


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    step: jax.Array  # int32 []   number of completed updates
    params: Any  # nnx.State of nnx.Param leaves
    opt_state: Any  # optax state for ``params``
    ref_params: Any  # frozen reference params (KL) or None
    rng: jax.Array  # uint32 [2] raw PRNG key data: the run's base key (jaxgrpo.train.rng)
    nonfinite: jax.Array  # int32 [] updates skipped because the loss or gradient was not finite
    entropy_coef: jax.Array  # float32 [] entropy bonus coefficient (adapted on the host for BAE)

    def replace(self, **kw) -> TrainState:
        return dataclasses.replace(self, **kw)


@dataclasses.dataclass(frozen=True)
class ModelParts:
    """The static half of a split NNX model: merge with params inside jit."""

    graphdef: Any
    rest: Any

    def merge(self, params):
        return nnx.merge(self.graphdef, params, self.rest)


def split_model(model: nnx.Module) -> tuple[ModelParts, Any]:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return ModelParts(graphdef, rest), params


def init_train_state(
    params, tx: optax.GradientTransformation, seed: int, *, with_ref: bool, entropy_coef: float = 0.0
):
    """A fresh state around ``params``; the reference policy is a copy when KL is on."""
    ref = jax.tree.map(jnp.copy, params) if with_ref else None
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        ref_params=ref,
        rng=jax.random.key_data(rng_lib.base_key(seed)),
        nonfinite=jnp.zeros((), jnp.int32),
        entropy_coef=jnp.asarray(entropy_coef, jnp.float32),
    )
