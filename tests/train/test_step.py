"""The jitted train step: exact micro-batch accumulation, the non-finite guard, no recompiles.

A toy causal model with the policy interface (``__call__(tokens, mask=, return_hidden=)`` and
``unembedding()``) keeps these tests fast and independent of the transformer.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxgrpo.core import losses
from jaxgrpo.core.logprobs import token_logprobs
from jaxgrpo.train import batch as batch_lib
from jaxgrpo.train.state import init_train_state, split_model
from jaxgrpo.train.step import StepConfig, make_train_step

V, D = 11, 8


class Toy(nnx.Module):
    def __init__(self, rngs):
        self.emb = nnx.Param(jax.random.normal(rngs.params(), (V, D)) * 0.5)
        self.w = nnx.Param(jax.random.normal(rngs.params(), (D, D)) * 0.5)

    def __call__(self, tokens, positions=None, mask=None, return_hidden=False):
        m = (jnp.ones(tokens.shape, bool) if mask is None else mask)[..., None].astype(jnp.float32)
        h = self.emb[...][tokens] * m
        h = jnp.cumsum(h, axis=1) / jnp.maximum(jnp.cumsum(m, axis=1), 1.0)
        h = jnp.tanh(h @ self.w[...])
        return h if return_hidden else h @ self.unembedding()

    def unembedding(self):
        return self.emb[...].T


def _batch(seed=0, p=4, g=2, tp=3, tc=5):
    rng = np.random.default_rng(seed)
    ptok = rng.integers(1, V, (p, tp)).astype(np.int32)
    pmask = np.ones((p, tp), bool)
    pmask[0, 0] = False  # one left-padded prompt
    ctok = rng.integers(1, V, (p, g, tc)).astype(np.int32)
    lengths = rng.integers(1, tc + 1, (p, g))
    cmask = np.arange(tc)[None, None, :] < lengths[..., None]
    adv = rng.normal(size=(p, g)).astype(np.float32)
    return batch_lib.assemble(ptok, pmask, ctok, cmask, adv, old_logp=np.zeros((p, g, tc)),
                              task_ids=np.arange(p) % 2)


def _setup(cfg, seed=0):
    parts, params = split_model(Toy(nnx.Rngs(seed)))
    tx = optax.sgd(0.1)
    state = init_train_state(params, tx, seed, with_ref=False)
    return parts, tx, state


def _full_loss(parts, params, b, cfg):
    model = parts.merge(params)
    logits = model(b.tokens[:, :-1], mask=b.attn_mask[:, :-1])
    logp = token_logprobs(logits, b.tokens[:, 1:])
    return losses.policy_loss(
        logp, jax.lax.stop_gradient(logp), b.advantages, b.loss_mask, **cfg.loss_kwargs()
    )[0]


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean"])
def test_one_update_equals_sgd_on_the_full_batch_loss(agg):
    cfg = StepConfig(agg=agg, microbatches=4, shuffle=False, logprob_chunk=4)
    parts, tx, state = _setup(cfg)
    b = jax.tree.map(jnp.asarray, _batch())
    ref_params = jax.tree.map(jnp.copy, state.params)
    loss, grads = jax.value_and_grad(_full_loss, argnums=1)(parts, ref_params, b, cfg)
    expected = jax.tree.map(lambda p, g: p - 0.1 * g, ref_params, grads)
    new_state, metrics = make_train_step(parts, tx, cfg)(state, b)
    np.testing.assert_allclose(float(metrics["loss/total"]), float(loss), rtol=1e-5, atol=1e-6)
    for a, e in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-6)
    assert int(new_state.step) == 1


def _updated_params(cfg, batch):
    parts, tx, state = _setup(cfg)
    new_state, _ = make_train_step(parts, tx, cfg)(state, batch)
    return jax.tree.leaves(new_state.params)


def _assert_all_close(outs):
    for other in outs[1:]:
        for a, e in zip(other, outs[0], strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-6)


def test_microbatches_do_not_change_the_update():
    b = jax.tree.map(jnp.asarray, _batch(seed=3))
    outs = []
    for micro in (1, 2, 4, 8):
        cfg = StepConfig(microbatches=micro, num_minibatches=1, epochs=2, logprob_chunk=4)
        outs.append(_updated_params(cfg, b))
    _assert_all_close(outs)


def test_microbatches_do_not_change_the_loss_metrics():
    """Aux terms combine over micro-batches as sums, ratio extremes as min / max."""
    b = jax.tree.map(jnp.asarray, _batch(seed=3))
    got = []
    for micro in (1, 2, 4):
        cfg = StepConfig(microbatches=micro, num_minibatches=2, epochs=2, logprob_chunk=4)
        parts, tx, state = _setup(cfg)
        _, metrics = make_train_step(parts, tx, cfg)(state, b)
        got.append({k: float(v) for k, v in metrics.items() if k.startswith("loss/")})
    assert {"loss/ratio_min", "loss/ratio_max", "loss/clip_frac_low"} <= set(got[0])
    assert got[0]["loss/ratio_min"] < 1.0 < got[0]["loss/ratio_max"]  # epoch 2 moved the ratios
    for other in got[1:]:
        assert other.keys() == got[0].keys()
        for k in got[0]:
            np.testing.assert_allclose(other[k], got[0][k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_non_finite_update_is_skipped_and_counted():
    cfg = StepConfig(logprob_chunk=4)
    parts, tx, state = _setup(cfg)
    before = jax.tree.map(np.asarray, state.params)
    b = _batch()
    adv = np.asarray(b.advantages).copy()
    adv[0] = np.nan
    bad = jax.tree.map(jnp.asarray, batch_lib.TrainBatch(**{**b.__dict__, "advantages": adv}))
    new_state, metrics = make_train_step(parts, tx, cfg)(state, bad)
    assert float(metrics["update/skipped"]) == 1.0
    assert int(new_state.nonfinite) == 1
    for a, e in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(np.asarray(a), e)


def test_improvement_signal_per_task_and_minibatch():
    cfg = StepConfig(num_minibatches=2, epochs=1, num_tasks=2, logprob_chunk=4, shuffle=False)
    parts, tx, state = _setup(cfg)
    b = jax.tree.map(jnp.asarray, _batch())
    _, metrics = make_train_step(parts, tx, cfg)(state, b)
    imp = np.asarray(metrics["task_improvement"])
    assert imp.shape == (2, 2) and np.all(np.isfinite(imp))
    # A gradient step on the surrogate should not make it worse overall (small lr).
    assert imp.sum() > -1e-6


def _np_seq_surrogate(logp, old, adv, mask, lo, hi):
    """Per-sequence token-mean clipped surrogate objective, plain loops."""
    out = []
    for n in range(logp.shape[0]):
        terms = []
        for t in range(logp.shape[1]):
            if mask[n, t]:
                r = math.exp(float(logp[n, t]) - float(old[n, t]))
                a = float(adv[n])
                terms.append(min(r * a, min(max(r, 1 - lo), 1 + hi) * a))
        out.append(sum(terms) / len(terms) if terms else 0.0)
    return np.array(out)


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_improvement_is_the_change_over_each_minibatchs_trained_sequences(reduce):
    """I_k[m] = sum or mean, over minibatch m's trained task-k rows, of S_i(after) - S_i(before);
    a padded row (valid False) counts in neither."""
    m_count, k = 2, 2
    cfg = StepConfig(num_minibatches=m_count, num_tasks=k, logprob_chunk=4, shuffle=False,
                     improvement_reduce=reduce)
    parts, tx, state = _setup(cfg)
    b = _batch()
    loss_mask = np.asarray(b.loss_mask).copy()
    loss_mask[1] = False  # row 1 (task 0, minibatch 0) is padding, as assemble(valid=) makes it
    b = jax.tree.map(jnp.asarray, batch_lib.TrainBatch(**{**b.__dict__, "loss_mask": loss_mask}))
    params = jax.tree.map(jnp.copy, state.params)
    _, metrics = make_train_step(parts, tx, cfg)(state, b)

    def logp_of(p):
        model = parts.merge(p)
        return token_logprobs(model(b.tokens[:, :-1], mask=b.attn_mask[:, :-1]), b.tokens[:, 1:])

    old = np.asarray(logp_of(params))
    rows = b.tokens.shape[0] // m_count
    want = np.zeros((m_count, k))
    for m in range(m_count):
        sl = slice(m * rows, (m + 1) * rows)
        mb = jax.tree.map(lambda a, sl=sl: a[sl], b)

        def mb_loss(p, mb=mb, sl=sl):
            model = parts.merge(p)
            lp = token_logprobs(model(mb.tokens[:, :-1], mask=mb.attn_mask[:, :-1]),
                                mb.tokens[:, 1:])
            return losses.policy_loss(lp, jnp.asarray(old[sl]), mb.advantages, mb.loss_mask,
                                      **cfg.loss_kwargs())[0]

        grads = jax.grad(mb_loss)(params)
        new = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
        args = (np.asarray(b.advantages)[sl], np.asarray(b.loss_mask)[sl], 0.2, 0.2)
        before = _np_seq_surrogate(np.asarray(logp_of(params))[sl], old[sl], *args)
        after = _np_seq_surrogate(np.asarray(logp_of(new))[sl], old[sl], *args)
        trained = np.asarray(b.loss_mask)[sl].any(axis=1)
        tasks = np.asarray(b.task_ids)[sl]
        for task in range(k):
            d = [after[i] - before[i] for i in range(rows) if trained[i] and tasks[i] == task]
            want[m, task] = (sum(d) / len(d) if reduce == "mean" else sum(d)) if d else 0.0
        params = new
    np.testing.assert_allclose(np.asarray(metrics["task_improvement"]), want,
                               rtol=1e-5, atol=1e-6)


def test_second_call_compiles_nothing():
    cfg = StepConfig(logprob_chunk=4)
    parts, tx, state = _setup(cfg)
    step = make_train_step(parts, tx, cfg)
    b = jax.tree.map(jnp.asarray, _batch())
    state, _ = step(state, b)
    with jax.log_compiles(True):
        before = step._cache_size()
        state, _ = step(state, jax.tree.map(jnp.asarray, _batch(seed=5)))
        assert step._cache_size() == before


def test_assemble_aligns_targets_with_completion_tokens():
    b = _batch(p=2, g=2, tp=3, tc=4)
    tokens, lm = np.asarray(b.tokens), np.asarray(b.loss_mask)
    # target position t predicts tokens[:, t+1]: the first completion token is at column Tp.
    assert lm[:, :2].sum() == 0 and lm[:, 2].all()
    assert tokens.shape == (4, 7) and lm.shape == (4, 6)


def test_split_takes_each_parts_slice_of_every_row_block():
    from jaxgrpo.train.step import _permute_within, _split, _unsplit

    x = np.arange(24).reshape(12, 2)
    # Reference: part i = [block b's i-th slice for b in blocks], each slice r = 12/(S*parts).
    for shards, parts in ((1, 3), (2, 3), (3, 2), (4, 3), (1, 1)):
        r = 12 // (shards * parts)
        expected = np.stack([
            np.concatenate([x[b * 12 // shards + i * r: b * 12 // shards + (i + 1) * r]
                            for b in range(shards)])
            for i in range(parts)])
        got = _split(jnp.asarray(x), parts, shards)
        np.testing.assert_array_equal(np.asarray(got), expected)
        np.testing.assert_array_equal(np.asarray(_unsplit(got, shards)), x)
    # One block: today's contiguous minibatches.
    np.testing.assert_array_equal(np.asarray(_split(jnp.asarray(x), 3)), x.reshape(3, 4, 2))
    perm = np.array([[2, 0, 1, 3, 5, 4], [5, 4, 3, 2, 1, 0]])
    got = np.asarray(_permute_within(jnp.asarray(x), jnp.asarray(perm)))
    expected = np.concatenate([x[:6][perm[0]], x[6:][perm[1]]])
    np.testing.assert_array_equal(got, expected)


def test_row_shards_keep_the_update_exact():
    """Micro-batches made of every row block's slices give the full-batch update (the
    accumulation is exact whatever the composition); minibatch m of a one-block step without
    shuffle is the m-th contiguous block of rows."""
    b = jax.tree.map(jnp.asarray, _batch(seed=4))
    outs = []
    for shards in (1, 2, 4):
        cfg = StepConfig(microbatches=2, row_shards=shards, shuffle=False, logprob_chunk=4)
        outs.append(_updated_params(cfg, b))
    _assert_all_close(outs)
    cfg = StepConfig(num_minibatches=2, num_tasks=8, shuffle=False, logprob_chunk=4)
    parts, tx, state = _setup(cfg)
    tb = batch_lib.TrainBatch(**{**b.__dict__, "task_ids": jnp.arange(8)})
    _, metrics = make_train_step(parts, tx, cfg)(state, tb)
    moved = np.abs(np.asarray(metrics["task_improvement"])) > 0
    assert not moved[0, 4:].any() and not moved[1, :4].any() and moved.any()


def test_row_shards_must_match_the_mesh_and_divide_the_rows():
    cfg = StepConfig(microbatches=2, row_shards=3, logprob_chunk=4)
    parts, tx, state = _setup(cfg)
    with pytest.raises(ValueError, match="row_shards"):
        make_train_step(parts, tx, cfg)(state, jax.tree.map(jnp.asarray, _batch()))
    with pytest.raises(ValueError, match="row_shards"):
        make_train_step(parts, tx, StepConfig(row_shards=0))
