"""PRNG streams: one per purpose; the train step's shuffle is independent of the rollout's draws.

The real step's row order is read off its MT-GRPO improvement signal: with one row per minibatch
and one task per row, minibatch ``m``'s only non-zero task column is the row it trained on.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxgrpo.train import batch as batch_lib
from jaxgrpo.train.state import init_train_state, split_model
from jaxgrpo.train.step import StepConfig, make_train_step
from tests.train.test_step import Toy, _batch

SEED, STEP = 7, 3


def _historical_rollout_key(seed, step, round_index):
    """The loop's rollout key of round ``round_index`` at ``step`` (a fixed derivation)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), round_index)


def _real_step_order(epochs=1):
    """``[epochs, N]``: the rows, in the order the real train step visited them at ``STEP``."""
    b = _batch(seed=1, p=4, g=2)
    n = b.tokens.shape[0]
    b = jax.tree.map(jnp.asarray,
                     batch_lib.TrainBatch(**{**b.__dict__, "task_ids": np.arange(n)}))
    # Small steps and a wide clip range: no row's surrogate is clipped flat by earlier updates.
    cfg = StepConfig(num_minibatches=n, epochs=epochs, num_tasks=n, shuffle=True,
                     logprob_chunk=4, clip_low=0.9, clip_high=10.0)
    parts, params = split_model(Toy(nnx.Rngs(0)))
    tx = optax.sgd(0.05)
    state = init_train_state(params, tx, SEED, with_ref=False).replace(step=jnp.int32(STEP))
    _, metrics = make_train_step(parts, tx, cfg)(state, b)
    imp = np.abs(np.asarray(metrics["task_improvement"]))  # [epochs*N, N]
    assert np.all((imp > 0).sum(axis=1) == 1), "each minibatch must move exactly one row"
    order = imp.argmax(axis=1).reshape(epochs, n)
    for e in range(epochs):
        assert sorted(order[e]) == list(range(n))
    return order


def test_shuffle_is_not_the_rollouts_sampling_order():
    """The epoch order is no argsort of any uniforms the sampler drew at this step (token ``i``
    of round ``r`` draws ``uniform(fold_in(rollout_key, i), (N,))``)."""
    order = _real_step_order(epochs=2)
    n = order.shape[1]
    for r in range(4):
        rk = _historical_rollout_key(SEED, STEP, r)
        for i in range(16):
            u = np.asarray(jax.random.uniform(jax.random.fold_in(rk, i), (n,), jnp.float32))
            for e in range(order.shape[0]):
                assert not np.array_equal(order[e], np.argsort(u)), (r, i, e)
    assert not np.array_equal(order[0], order[1])  # a new order every epoch


def test_streams_are_distinct_and_rollout_eval_keys_unchanged():
    from jaxgrpo.train import rng

    base = rng.base_key(SEED)
    data = lambda k: tuple(np.asarray(jax.random.key_data(k)).tolist())
    # Rollout and evaluation keys keep their historical values (runs reproduce).
    for s in (0, 1, STEP, 1000):
        for r in range(3):
            assert data(rng.rollout_key(base, s, r)) == data(_historical_rollout_key(SEED, s, r))
    ev = jax.random.fold_in(jax.random.key(SEED), 2**30)
    assert data(rng.eval_key(base)) == data(ev)
    assert data(rng.eval_task_key(rng.eval_key(base), 2)) == data(jax.random.fold_in(ev, 2))
    # The shuffle keys meet no rollout or evaluation key of the step (nor of nearby steps).
    others = {data(rng.rollout_key(base, s, r)) for s in range(STEP + 3) for r in range(8)}
    others |= {data(rng.eval_key(base))} | {data(rng.eval_task_key(rng.eval_key(base), k))
                                             for k in range(8)}
    shuffles = {data(rng.shuffle_key(base, s, e)) for s in range(STEP + 3) for e in range(4)}
    assert len(shuffles) == (STEP + 3) * 4
    assert not shuffles & others


def test_real_step_uses_the_shuffle_stream():
    """The order of the real step is the permutation drawn from ``rng.shuffle_key`` (one row
    block without a mesh)."""
    from jaxgrpo.train import rng

    order = _real_step_order(epochs=2)
    base = rng.base_key(SEED)
    for e in range(2):
        key = jax.random.split(rng.shuffle_key(base, STEP, e), 1)[0]
        np.testing.assert_array_equal(order[e], np.asarray(jax.random.permutation(key, 8)))
