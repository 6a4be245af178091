"""MT-GRPO task weighting (jaxgrpo.core.weighting) against plain NumPy loop references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgrpo.core import weighting as W

# ------------------------------------------------------------------------------------------
# NumPy loop references, written from the paper (arXiv 2602.05547 §3.1, App. F, Subroutine 1; not from the module)


def ref_softmax(xi):
    m = max(xi)
    e = [math.exp(x - m) for x in xi]
    tot = sum(e)
    return [v / tot for v in e]


def ref_iwu_gradient(xi, acc, imp, lam):
    z = ref_softmax(xi)
    s = [imp[k] + lam * acc[k] for k in range(len(xi))]
    avg = sum(z[j] * s[j] for j in range(len(xi)))
    return np.array([z[k] * (s[k] - avg) for k in range(len(xi))])


def ref_segment(values, ids, k, valid, reduce):
    out = []
    for t in range(k):
        tot, cnt = 0.0, 0
        for v, i, ok in zip(values, ids, valid, strict=True):
            if i == t and ok:
                tot += v
                cnt += 1
        out.append(tot if reduce == "sum" else (tot / cnt if cnt else 0.0))
    return np.array(out), cnt


def rand(rng, *shape):
    return rng.normal(size=shape).astype(np.float32)


# ------------------------------------------------------------------------------------------
# iwu_gradient


@pytest.mark.parametrize("k", [1, 3, 9])
def test_iwu_gradient_matches_numpy_reference(k):
    rng = np.random.default_rng(k)
    for _ in range(5):
        xi, acc, imp = rand(rng, k), rng.uniform(size=k).astype(np.float32), rand(rng, k) * 0.1
        lam = float(rng.uniform(0, 2))
        got = jax.jit(lambda a, b, c, lam=lam: W.iwu_gradient(a, b, c, lam=lam))(xi, acc, imp)
        np.testing.assert_allclose(got, ref_iwu_gradient(xi, acc, imp, lam), atol=1e-6)


def test_iwu_gradient_is_the_autodiff_gradient_of_the_weighted_signal():
    rng = np.random.default_rng(0)
    xi, acc, imp = rand(rng, 5), rng.uniform(size=5).astype(np.float32), rand(rng, 5)
    lam = 0.3
    s = jnp.asarray(imp) + lam * jnp.asarray(acc)
    auto = jax.grad(lambda x: jnp.sum(jax.nn.softmax(x) * s))(jnp.asarray(xi))
    np.testing.assert_allclose(W.iwu_gradient(xi, acc, imp, lam=lam), auto, atol=1e-6)


def test_iwu_gradient_sums_to_zero_and_vanishes_for_uniform_signal():
    rng = np.random.default_rng(1)
    for _ in range(10):
        xi = rand(rng, 7) * 3
        g = W.iwu_gradient(xi, rng.uniform(size=7), rand(rng, 7), lam=0.7)
        assert abs(float(jnp.sum(g))) < 1e-6
        same = np.full(7, 0.4, np.float32)
        g0 = W.iwu_gradient(xi, same, np.full(7, -0.1, np.float32), lam=0.7)
        np.testing.assert_array_equal(np.asarray(g0), np.zeros(7))


def test_iwu_gradient_vmaps_over_runs():
    rng = np.random.default_rng(2)
    xi, acc, imp = rand(rng, 4, 3), rng.uniform(size=(4, 3)).astype(np.float32), rand(rng, 4, 3)
    got = jax.vmap(lambda a, b, c: W.iwu_gradient(a, b, c, lam=0.5))(xi, acc, imp)
    for r in range(4):
        np.testing.assert_allclose(got[r], ref_iwu_gradient(xi[r], acc[r], imp[r], 0.5), atol=1e-6)
    # The [..., K] form gives the same without vmap.
    np.testing.assert_allclose(W.iwu_gradient(xi, acc, imp, lam=0.5), got, atol=1e-7)


def test_descending_iwu_moves_weight_to_the_lagging_task():
    # Task 0: accurate and improving; task 2: inaccurate and not improving.
    acc = np.array([0.9, 0.5, 0.1], np.float32)
    imp = np.array([0.1, 0.0, -0.05], np.float32)
    g = np.asarray(W.iwu_gradient(np.zeros(3, np.float32), acc, imp, lam=0.2))
    assert g[0] > 0 > g[2]  # descent lowers xi_0 and raises xi_2


def test_iwu_is_nan_free_on_degenerate_inputs():
    big = np.array([80.0, -80.0, 0.0], np.float32)  # softmax saturates
    g = W.iwu_gradient(big, np.array([1.0, 0.0, 0.5]), np.zeros(3), lam=1.0)
    assert np.all(np.isfinite(np.asarray(g)))
    g1 = W.iwu_gradient(np.zeros(1), np.ones(1), np.ones(1), lam=1.0)  # one task
    np.testing.assert_array_equal(np.asarray(g1), np.zeros(1))


def test_iwu_gradient_rejects_bad_input():
    with pytest.raises(ValueError, match="accuracy"):
        W.iwu_gradient(np.zeros(3), np.zeros(2), np.zeros(3), lam=0.1)
    with pytest.raises(ValueError, match="improvement"):
        W.iwu_gradient(np.zeros(3), np.zeros(3), np.zeros(4), lam=0.1)
    with pytest.raises(ValueError, match="lam"):
        W.iwu_gradient(np.zeros(3), np.zeros(3), np.zeros(3), lam=-1.0)
    with pytest.raises(ValueError, match="lam"):
        W.iwu_gradient(np.zeros(3), np.zeros(3), np.zeros(3), lam=float("nan"))
    with pytest.raises(ValueError, match="task_logits"):
        W.iwu_gradient(np.float32(0.0), np.zeros(()), np.zeros(()), lam=0.1)


# ------------------------------------------------------------------------------------------
# strict worst-task and regularised reward-only updates


# ------------------------------------------------------------------------------------------
# signals


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_task_improvement_matches_loop_reference(reduce):
    rng = np.random.default_rng(4)
    n, k = 40, 5
    before, after = rand(rng, n), rand(rng, n)
    ids = rng.integers(0, k - 1, size=n).astype(np.int32)  # task k-1 is absent
    valid = rng.uniform(size=n) > 0.2
    fn = jax.jit(lambda b, a, i, v: W.task_improvement(b, a, i, k, clip=None, reduce=reduce,
                                                       valid=v))
    got = fn(before, after, ids, valid)
    want, _ = ref_segment(list(after - before), list(ids), k, list(valid), reduce)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert float(got[k - 1]) == 0.0
    clipped = W.task_improvement(before, after, ids, k, clip=0.1, reduce=reduce, valid=valid)
    np.testing.assert_allclose(clipped, np.clip(want, -0.1, 0.1), atol=1e-6)


def test_task_improvement_sign_is_objective_increase_and_code_clip():
    # Surrogate objective rises by 0.3 on each of two task-0 sequences: I_0 = +0.6 -> clip 0.2.
    before = np.array([0.0, 0.1, 0.5, 0.5], np.float32)
    after = np.array([0.3, 0.4, 0.4, 0.5], np.float32)
    ids = np.array([0, 0, 1, 1], np.int32)
    got = W.task_improvement(before, after, ids, 3, clip=0.2)
    np.testing.assert_allclose(got, [0.2, -0.1, 0.0], atol=1e-6)
    got_mean = W.task_improvement(before, after, ids, 3, clip=0.2, reduce="mean")
    np.testing.assert_allclose(got_mean, [0.2, -0.05, 0.0], atol=1e-6)


def test_task_improvement_vmaps_over_minibatches_and_rejects_bad_input():
    rng = np.random.default_rng(5)
    before, after = rand(rng, 4, 10), rand(rng, 4, 10)
    ids = rng.integers(0, 3, size=(4, 10)).astype(np.int32)
    got = jax.vmap(lambda b, a, i: W.task_improvement(b, a, i, 3, clip=0.5))(before, after, ids)
    for m in range(4):
        want, _ = ref_segment(list(after[m] - before[m]), list(ids[m]), 3, [True] * 10, "sum")
        np.testing.assert_allclose(got[m], np.clip(want, -0.5, 0.5), atol=1e-5)
    with pytest.raises(ValueError, match="reduce"):
        W.task_improvement(before[0], after[0], ids[0], 3, clip=0.1, reduce="max")
    with pytest.raises(ValueError, match="clip"):
        W.task_improvement(before[0], after[0], ids[0], 3, clip=0.0)
    with pytest.raises(ValueError, match="surrogate_after"):
        W.task_improvement(before[0], after[0, :5], ids[0], 3, clip=0.1)
    with pytest.raises(TypeError, match="task_ids"):
        W.task_improvement(before[0], after[0], ids[0].astype(np.float32), 3, clip=0.1)
    with pytest.raises(TypeError, match="num_tasks"):
        W.task_improvement(before[0], after[0], ids[0], 3.0, clip=0.1)


def test_per_task_mean_matches_loop_and_gives_zero_for_empty_tasks():
    rng = np.random.default_rng(6)
    vals, ids = rand(rng, 25), rng.integers(0, 4, size=25).astype(np.int32)
    ids[ids == 2] = 1  # task 2 empty
    valid = rng.uniform(size=25) > 0.3
    mean, count = jax.jit(lambda v, i, m: W.per_task_mean(v, i, 5, valid=m))(vals, ids, valid)
    for t in range(5):
        sel = [v for v, i, ok in zip(vals, ids, valid, strict=True) if i == t and ok]
        assert float(count[t]) == len(sel)
        want = sum(sel) / len(sel) if sel else 0.0
        assert abs(float(mean[t]) - want) < 1e-5
    assert float(mean[2]) == 0.0 and float(mean[4]) == 0.0
    mean_all, _ = W.per_task_mean(vals, ids, 5)
    assert abs(float(mean_all[0]) - float(np.mean(vals[ids == 0]))) < 1e-5
    # valid rows with NaN values elsewhere do not leak NaN
    nan_vals = vals.copy()
    nan_vals[~valid] = np.nan
    m2, _ = W.per_task_mean(nan_vals, ids, 5, valid=valid)
    np.testing.assert_allclose(m2, mean, atol=1e-6)


def test_task_accuracy_counts_correctness_not_format_credit():
    # 3 prompts x 4 rollouts; rewards 1 (correct), 0.1 (format only), 0.
    rewards = np.array([[1.0, 0.1, 0.1, 0.0],
                        [1.0, 1.0, 0.0, 0.1],
                        [0.1, 0.1, 0.1, 0.1]], np.float32)
    task_ids = np.array([0, 0, 2], np.int32)
    acc, present = W.task_accuracy(rewards, task_ids, 3)
    np.testing.assert_allclose(acc, [(0.25 + 0.5) / 2, 0.0, 0.0], atol=1e-7)
    np.testing.assert_array_equal(present, [True, False, True])
    # valid mask: prompt 1 keeps only its first two rollouts (both correct); prompt 2 none.
    valid = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], bool)
    acc, present = jax.jit(lambda r, i, v: W.task_accuracy(r, i, 3, valid=v))(
        rewards, task_ids, valid)
    np.testing.assert_allclose(acc, [(0.25 + 1.0) / 2, 0.0, 0.0], atol=1e-7)
    np.testing.assert_array_equal(present, [True, False, False])


def test_task_accuracy_matches_loop_reference_on_random_rounds():
    rng = np.random.default_rng(7)
    p, g, k = 12, 6, 4
    rewards = rng.choice([0.0, 0.1, 1.0], size=(p, g)).astype(np.float32)
    ids = rng.integers(0, k, size=p).astype(np.int32)
    acc, present = W.task_accuracy(rewards, ids, k)
    for t in range(k):
        fracs = [sum(r >= 1 - 1e-6 for r in rewards[i]) / g for i in range(p) if ids[i] == t]
        assert bool(present[t]) == bool(fracs)
        assert abs(float(acc[t]) - (sum(fracs) / len(fracs) if fracs else 0.0)) < 1e-6


def test_ema_update_keeps_absent_tasks_and_matches_loop():
    rng = np.random.default_rng(8)
    prev = np.zeros(4, np.float32)  # the code starts the accuracy EMA at 0
    ref = [0.0] * 4
    step = jax.jit(lambda p, v, m: W.ema_update(p, v, m, decay=0.5))
    for _ in range(6):
        val = rng.uniform(size=4).astype(np.float32)
        present = rng.uniform(size=4) > 0.4
        val_nan = np.where(present, val, np.nan).astype(np.float32)  # absent values ignored
        prev = step(prev, val_nan, present)
        ref = [0.5 * ref[k] + 0.5 * float(val[k]) if present[k] else ref[k] for k in range(4)]
        np.testing.assert_allclose(prev, ref, atol=1e-6)
    with pytest.raises(ValueError, match="decay"):
        W.ema_update(prev, prev, np.ones(4, bool), decay=1.5)
    with pytest.raises(ValueError, match="present_mask"):
        W.ema_update(prev, prev, np.ones(3, bool), decay=0.5)
    got = jax.vmap(lambda p, v, m: W.ema_update(p, v, m, decay=0.9))(
        np.ones((2, 4)), np.zeros((2, 4)), np.array([[1, 0, 1, 0], [0, 0, 0, 0]], bool))
    np.testing.assert_allclose(got, [[0.9, 1, 0.9, 1], [1, 1, 1, 1]], atol=1e-7)


# ------------------------------------------------------------------------------------------
# how weights enter the loss


def test_all_empty_batch_is_nan_free():
    ids = np.zeros(4, np.int32)
    valid = np.zeros(4, bool)
    imp = W.task_improvement(np.ones(4), np.zeros(4), ids, 2, clip=0.1, reduce="mean",
                             valid=valid)
    np.testing.assert_array_equal(imp, np.zeros(2))


def test_per_row_functions_vmap_over_a_batch_of_rounds():
    rng = np.random.default_rng(10)
    b, n, k = 3, 12, 4
    vals = rand(rng, b, n)
    ids = rng.integers(0, k, size=(b, n)).astype(np.int32)
    rewards = rng.choice([0.0, 0.1, 1.0], size=(b, 5, 6)).astype(np.float32)
    pids = rng.integers(0, k, size=(b, 5)).astype(np.int32)
    xi, acc = rand(rng, b, k), rng.uniform(size=(b, k)).astype(np.float32)

    def one_row(v, i, r, pi, x, a):
        return (W.per_task_mean(v, i, k)[0], W.task_accuracy(r, pi, k)[0],
                W.softmax_objective_gradient(x, a))

    args = (vals, ids, rewards, pids, xi, acc)
    batched = jax.jit(jax.vmap(one_row))(*args)
    single = jax.jit(one_row)
    for r in range(b):
        row = single(*(x[r] for x in args))
        for got, want in zip(batched, row, strict=True):
            np.testing.assert_allclose(got[r], want, atol=1e-6)
        np.testing.assert_allclose(row[2], ref_iwu_gradient(xi[r], acc[r], np.zeros(k), 1.0),
                                   atol=1e-6)
        want_mean = [np.mean(vals[r][ids[r] == t]) if np.any(ids[r] == t) else 0.0
                     for t in range(k)]
        np.testing.assert_allclose(row[0], want_mean, atol=1e-6)


def test_hand_computed_iwu_example():
    # K = 3 at the code's start (xi = 0, z = 1/3): J = [0.9, 0.5, 0.1], I = [0.1, 0, -0.1],
    # lam = 0.2 -> s = [0.28, 0.10, -0.08], <z, s> = 0.10, g = z (s - 0.10) = [0.06, 0, -0.06].
    g = W.iwu_gradient(np.zeros(3, np.float32), np.array([0.9, 0.5, 0.1], np.float32),
                       np.array([0.1, 0.0, -0.1], np.float32), lam=0.2)
    np.testing.assert_allclose(g, [0.06, 0.0, -0.06], atol=1e-7)
    assert float(g[1]) == 0.0


# ----------------------------------------------------------------------------------------------
# Edges: traced hyper-parameters, NaN values, ids outside [0, K)
# ----------------------------------------------------------------------------------------------


def test_traced_hyperparameters_give_the_static_result():
    rng = np.random.default_rng(50)
    xi, acc, imp = (rng.normal(size=4).astype(np.float32) for _ in range(3))
    before, after = rng.normal(size=8).astype(np.float32), rng.normal(size=8).astype(np.float32)
    ids = rng.integers(0, 4, size=8).astype(np.int32)
    rewards = rng.uniform(size=(4, 3)).astype(np.float32)
    pids = np.array([0, 1, 1, 3], np.int32)
    present = np.array([True, False, True, True])
    cases = [
        (lambda h: W.iwu_gradient(xi, acc, imp, lam=h), 0.3),
        (lambda h: W.ema_update(acc, imp, present, decay=h), 0.5),
        (lambda h: W.task_improvement(before, after, ids, 4, clip=h), 0.1),
        (lambda h: W.task_accuracy(rewards, pids, 4, threshold=h)[0], 0.5),
    ]
    for f, value in cases:
        want = np.asarray(f(value))
        got = np.asarray(jax.jit(f)(jnp.float32(value)))
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_nan_values_stay_in_their_task_and_out_of_range_ids_are_dropped():
    vals = np.array([1.0, np.nan, 2.0, 4.0, 8.0], np.float32)
    ids = np.array([0, 1, 1, 2, 7], np.int32)  # id 7 is outside [0, 3): dropped
    mean, count = W.per_task_mean(vals, ids, 3)
    assert float(mean[0]) == 1.0 and np.isnan(float(mean[1])) and float(mean[2]) == 4.0
    np.testing.assert_array_equal(np.asarray(count), [1, 2, 1])
    imp = np.asarray(W.task_improvement(np.zeros(5, np.float32), vals, ids, 3, clip=0.5))
    assert imp[0] == 0.5 and np.isnan(imp[1]) and imp[2] == 0.5
    acc, _ = W.task_accuracy(np.array([[1.0, np.nan]], np.float32), np.array([0]), 1)
    assert float(acc[0]) == 0.5  # the NaN rollout counts as incorrect
