"""The old log-probs of the train step: one forward pass when it is provably the loss pass.

With one epoch, one minibatch and no improvement signal the old policy is the loss pass at the
step's starting parameters, so the step runs one forward and one backward (counted in the
compiled HLO's matmul FLOPs) and gives the same loss, update and sampler-trainer gap as a step
that recomputes the old log-probs by a separate forward pass.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_step import _batch, _setup  # the toy policy of the step tests

from jaxgrpo.core import losses
from jaxgrpo.train import batch as batch_lib
from jaxgrpo.train.flops import hlo_matmul_flops
from jaxgrpo.train.step import StepConfig, make_train_step, token_logprobs_fn

CHUNK = 4


def _sampler_batch(seed=0):
    """A batch whose sampler log-probs differ from the trainer's (a non-zero gap)."""
    b = _batch(seed=seed)
    rng = np.random.default_rng(seed + 100)
    old = -rng.uniform(0.5, 3.0, np.asarray(b.old_logp).shape).astype(np.float32)
    return jax.tree.map(jnp.asarray, batch_lib.TrainBatch(**{**b.__dict__, "old_logp": old}))


def _reference(parts, params, b, cfg):
    """Loss, SGD(0.1) update and gap of the recomputing step, written out: a separate forward
    pass gives the old log-probs, then the loss is differentiated with them held fixed."""
    logp_fn = token_logprobs_fn(parts, CHUNK)
    old, _ = jax.jit(logp_fn)(params, b.tokens, b.attn_mask)

    def loss(p):
        logp, _ = logp_fn(p, b.tokens, b.attn_mask)
        return losses.policy_loss(logp, old, b.advantages, b.loss_mask, **cfg.loss_kwargs())[0]

    value, grads = jax.value_and_grad(loss)(params)
    new = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    m = np.asarray(b.loss_mask, bool)
    gap = np.abs(np.asarray(old) - np.asarray(b.old_logp))[m].mean()
    return float(value), new, float(gap), old


@pytest.mark.parametrize("micro", [1, 2])
def test_inline_old_logp_gives_the_recomputing_steps_loss_update_and_gap(micro):
    cfg = StepConfig(microbatches=micro, logprob_chunk=CHUNK, shuffle=True)
    assert not cfg.old_logp_forward
    parts, tx, state = _setup(cfg)
    b = _sampler_batch()
    ref_loss, ref_params, ref_gap, trainer_old = _reference(
        parts, jax.tree.map(jnp.copy, state.params), b, cfg)
    new_state, metrics = make_train_step(parts, tx, cfg)(state, b)
    np.testing.assert_allclose(float(metrics["loss/total"]), ref_loss, rtol=1e-5, atol=1e-6)
    for a, e in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(ref_params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["logp/sampler_trainer_gap"]), ref_gap, rtol=1e-5)

    # recompute off with the trainer's own log-probs as the sampler's: the same update, gap 0
    off = StepConfig(microbatches=micro, logprob_chunk=CHUNK, recompute_old_logp=False)
    parts, tx, state = _setup(off)
    same = batch_lib.TrainBatch(**{**b.__dict__, "old_logp": trainer_old})
    new_state, metrics = make_train_step(parts, tx, off)(state, same)
    for a, e in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(ref_params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-6)
    assert float(metrics["logp/sampler_trainer_gap"]) == pytest.approx(0.0, abs=1e-6)


def test_gap_without_a_separate_forward_is_the_first_minibatchs():
    """Several minibatches, recompute off: the gap over the first minibatch's rows, from the
    first update's own pass (at the starting parameters)."""
    cfg = StepConfig(num_minibatches=2, logprob_chunk=CHUNK, recompute_old_logp=False,
                     shuffle=False)
    parts, tx, state = _setup(cfg)
    b = _sampler_batch(seed=1)
    logp, _ = jax.jit(token_logprobs_fn(parts, CHUNK))(state.params, b.tokens, b.attn_mask)
    half = b.tokens.shape[0] // 2
    m = np.asarray(b.loss_mask, bool)[:half]
    expected = np.abs(np.asarray(logp) - np.asarray(b.old_logp))[:half][m].mean()
    _, metrics = make_train_step(parts, tx, cfg)(state, b)
    np.testing.assert_allclose(float(metrics["logp/sampler_trainer_gap"]), expected, rtol=1e-5)


def _step_flops(cfg, parts, tx, state, b) -> float:
    compiled = make_train_step(parts, tx, cfg).lower(state, b).compile()
    flops, unknown = hlo_matmul_flops(compiled.as_text())
    assert unknown == 0
    return flops


def test_one_epoch_one_minibatch_compiles_one_forward_and_one_backward():
    parts, tx, state = _setup(StepConfig())
    b = _sampler_batch()
    logp_fn = token_logprobs_fn(parts, CHUNK)
    fwd, _ = hlo_matmul_flops(jax.jit(logp_fn).lower(state.params, b.tokens, b.attn_mask)
                              .compile().as_text())

    def objective(p):  # every output of the forward pass used, as the loss uses them
        logp, ent = logp_fn(p, b.tokens, b.attn_mask)
        return jnp.sum(logp * b.advantages[:, None]) + jnp.sum(ent)

    # value and gradient: one forward, one backward (which recomputes each log-prob chunk's
    # logits, jax.checkpoint in chunked_token_logprobs)
    fwd_bwd, _ = hlo_matmul_flops(jax.jit(jax.value_and_grad(objective)).lower(state.params)
                                  .compile().as_text())
    assert fwd > 0 and fwd_bwd > 2 * fwd
    kw = dict(logprob_chunk=CHUNK, microbatches=2)
    for recompute in (True, False):
        one = StepConfig(recompute_old_logp=recompute, **kw)
        assert _step_flops(one, parts, tx, state, b) == pytest.approx(fwd_bwd, rel=1e-9)
    # Two epochs: the old policy is no longer the current one, so its forward pass is made.
    two = StepConfig(epochs=2, **kw)
    assert two.old_logp_forward
    assert _step_flops(two, parts, tx, state, b) == pytest.approx(fwd + 2 * fwd_bwd, rel=1e-9)
    two_off = StepConfig(epochs=2, recompute_old_logp=False, **kw)
    assert _step_flops(two_off, parts, tx, state, b) == pytest.approx(2 * fwd_bwd, rel=1e-9)
    assert StepConfig(num_tasks=2).old_logp_forward  # the improvement signal needs them
    assert not StepConfig(num_tasks=2, recompute_old_logp=False).old_logp_forward
