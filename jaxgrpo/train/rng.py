"""Every PRNG stream of a run, derived in this one place from ``train.seed``.

One base key ``base = jax.random.key(seed)`` (also stored, as raw key data, in
``TrainState.rng``) and one stream per purpose, so that no two purposes ever draw from the same
key (the shuffle of a step, for instance, is independent of the tokens sampled in that step):

=================  ==========================================================================
purpose            key
=================  ==========================================================================
rollout            ``rollout_key(base, step, r) = fold_in(fold_in(base, step), r)`` for round
                   ``r`` of RL step ``step``; the sampler draws token ``i`` with
                   ``fold_in(key, i)`` (``jaxgrpo.rollout.sampler``). Steps are below
                   ``STREAM_BASE``.
evaluation         ``eval_key(base) = fold_in(base, EVAL_STREAM)``, task ``k`` of the
                   evaluation set with ``eval_task_key(key, k) = fold_in(key, k)``; the same
                   key at every evaluation of the run (the accuracies are comparable).
shuffle            ``shuffle_key(base, step, e) = fold_in(fold_in(fold_in(base,
                   SHUFFLE_STREAM), step), e)``: the row order of epoch ``e`` in the train step
                   of step ``step`` (``jaxgrpo.train.step``), split into one key per row block.
init               the model's weights: ``flax.nnx.Rngs(seed)`` (flax's own per-stream keys,
                   ``jaxgrpo.train.policy``), never a ``fold_in`` of ``base``.
sft                the SFT warm start draws no JAX randomness (its prompts come from the host
                   task sampler seeded ``tasks.seed + 1``).
=================  ==========================================================================

The named streams fold values at or above ``STREAM_BASE = 2**30`` into ``base``; rollout steps
fold the step index (``< STREAM_BASE``), so the two can never meet. The rollout and evaluation
keys are the run's historical derivation (runs reproduce across versions); each new purpose
takes the next ``STREAM_BASE + k``.
"""

from __future__ import annotations

import jax

STREAM_BASE = 2**30
EVAL_STREAM = STREAM_BASE  # evaluation
SHUFFLE_STREAM = STREAM_BASE + 1  # the train step's per-epoch row shuffle


def base_key(seed: int) -> jax.Array:
    """The run's base key, ``jax.random.key(seed)``."""
    return jax.random.key(seed)


def rollout_key(base: jax.Array, step, round_index) -> jax.Array:
    """The key of rollout round ``round_index`` of RL step ``step``."""
    return jax.random.fold_in(jax.random.fold_in(base, step), round_index)


def eval_key(base: jax.Array) -> jax.Array:
    """The evaluation stream (the same key at every evaluation of a run)."""
    return jax.random.fold_in(base, EVAL_STREAM)


def eval_task_key(key: jax.Array, task_index: int) -> jax.Array:
    """The key of the ``task_index``-th task's evaluation prompts under ``key``."""
    return jax.random.fold_in(key, task_index)


def shuffle_key(base: jax.Array, step, epoch) -> jax.Array:
    """The key of the row shuffle of epoch ``epoch`` in the train step of step ``step``."""
    stream = jax.random.fold_in(base, SHUFFLE_STREAM)
    return jax.random.fold_in(jax.random.fold_in(stream, step), epoch)
