"""The optax step on MT-GRPO task logits vs a NumPy transcription of the paper's Subroutine 1
(arXiv 2602.05547) and the released code."""

import functools
import math

import jax
import numpy as np
import pytest

from jaxgrpo.core import weighting
from jaxgrpo.train import task_weights as TW


def ref_iwu_grad(xi, acc, imp, lam):
    m = max(xi)
    e = [math.exp(x - m) for x in xi]
    z = [v / sum(e) for v in e]
    s = [imp[k] + lam * acc[k] for k in range(len(xi))]
    avg = sum(z[j] * s[j] for j in range(len(xi)))
    return [z[k] * (s[k] - avg) for k in range(len(xi))]


def ref_run(kind, xi0, signals, lam, lr, wd, b1=0.9, b2=0.999, eps=1e-8):
    """Plain loops: torch-Adam coupled L2, AdamW decoupled decay, or SGD with coupled L2."""
    xi = [float(x) for x in xi0]
    k = len(xi)
    m, v = [0.0] * k, [0.0] * k
    out = []
    for t, (acc, imp) in enumerate(signals, start=1):
        g = ref_iwu_grad(xi, acc, imp, lam)
        new = []
        for i in range(k):
            if kind == "sgd":
                new.append(xi[i] - lr * (g[i] + wd * xi[i]))
                continue
            gi = g[i] + wd * xi[i] if kind == "adam_l2" else g[i]
            m[i] = b1 * m[i] + (1 - b1) * gi
            v[i] = b2 * v[i] + (1 - b2) * gi * gi
            mhat = m[i] / (1 - b1**t)
            vhat = v[i] / (1 - b2**t)
            step = mhat / (math.sqrt(vhat) + eps)
            if kind == "adamw":
                step += wd * xi[i]
            new.append(xi[i] - lr * step)
        xi = new
        out.append(list(xi))
    return np.array(out)


def random_signals(rng, steps, k):
    return [(rng.uniform(size=k).astype(np.float32),
             np.clip(rng.normal(scale=0.1, size=k), -0.1, 0.1).astype(np.float32))
            for _ in range(steps)]


@pytest.mark.parametrize("kind,wd", [("adam_l2", 1e-2), ("adamw", 1e-2), ("sgd", 1e-1),
                                     ("adam_l2", 1e-5)])
def test_optimizer_steps_match_numpy_transcription(kind, wd):
    rng = np.random.default_rng(0)
    k, lam, lr = 4, 0.25, 0.025
    tx = TW.make_task_weight_optimizer(kind, lr=lr, weight_decay=wd)
    xi0 = rng.normal(scale=0.5, size=k).astype(np.float32)  # nonzero so the decay matters
    xi, state = xi0, tx.init(xi0)
    step = jax.jit(functools.partial(TW.iwu_step, tx=tx, lam=lam))
    signals = random_signals(rng, 8, k)
    want = ref_run(kind, xi0, signals, lam, lr, wd)
    for t, (acc, imp) in enumerate(signals):
        xi, state = step(xi, state, acc, imp)
        np.testing.assert_allclose(np.asarray(xi), want[t], atol=1e-6, rtol=0)


def test_adam_l2_and_adamw_differ_when_decay_matters():
    rng = np.random.default_rng(1)
    xi0 = np.array([2.0, -1.0, 0.0], np.float32)
    outs = {}
    for kind in ("adam_l2", "adamw"):
        tx = TW.make_task_weight_optimizer(kind, lr=0.1, weight_decay=0.5)
        xi, st = xi0, tx.init(xi0)
        for acc, imp in random_signals(rng, 3, 3):
            xi, st = TW.iwu_step(xi, st, acc, imp, tx, lam=1.0)
        outs[kind] = np.asarray(xi)
    assert np.max(np.abs(outs["adam_l2"] - outs["adamw"])) > 1e-3


@pytest.mark.hf
def test_adam_l2_matches_torch_adam_as_in_the_released_code():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    k, lam, lr, wd = 3, 0.2, 0.025, 1e-4
    w = torch.zeros(k, requires_grad=True)
    opt = torch.optim.Adam([w], lr=lr, weight_decay=wd)
    tx = TW.make_task_weight_optimizer("adam_l2", lr=lr, weight_decay=wd)
    xi, state = TW.init_task_weights(k, tx)
    for acc, imp in random_signals(rng, 6, k):
        s = torch.tensor(imp + lam * acc)
        opt.zero_grad()
        torch.sum(torch.softmax(w, dim=0) * s).backward()  # autograd gives z*(s - <z,s>)
        opt.step()
        xi, state = TW.iwu_step(xi, state, acc, imp, tx, lam=lam)
        np.testing.assert_allclose(np.asarray(xi), w.detach().numpy(), atol=1e-6, rtol=0)


def test_sgd_is_the_papers_subroutine_one_and_two():
    rng = np.random.default_rng(3)
    xi0 = rng.normal(size=3).astype(np.float32)
    acc = rng.uniform(size=3).astype(np.float32)
    imp = np.zeros(3, np.float32)
    # Subroutine 2 literally: xi - beta (g + eta xi), via the gradient or via the optimiser.
    g_reg = np.array(ref_iwu_grad(xi0, acc, imp, 0.2)) + 0.1 * xi0  # Subroutine 2's gradient
    tx0 = TW.make_task_weight_optimizer("sgd", lr=0.5, weight_decay=0.0)
    a, _ = TW.task_weight_step(xi0, tx0.init(xi0), g_reg, tx0)
    tx1 = TW.make_task_weight_optimizer("sgd", lr=0.5, weight_decay=0.1)
    b, _ = TW.iwu_step(xi0, tx1.init(xi0), acc, imp, tx1, lam=0.2)
    np.testing.assert_allclose(a, b, atol=1e-6)
    want = xi0 - 0.5 * (np.array(ref_iwu_grad(xi0, acc, imp, 0.2)) + 0.1 * xi0)
    np.testing.assert_allclose(a, want, atol=1e-6)


def test_init_is_uniform_and_lagging_task_gains_weight():
    tx = TW.make_task_weight_optimizer()
    xi, st = TW.init_task_weights(3, tx)
    np.testing.assert_allclose(weighting.task_weights(xi), np.full(3, 1 / 3), atol=1e-7)
    acc = np.array([0.9, 0.6, 0.1], np.float32)
    for _ in range(4):  # four minibatch updates in one training step, as in the code
        xi, st = TW.iwu_step(xi, st, acc, np.zeros(3, np.float32), tx, lam=0.2)
    z = np.asarray(weighting.task_weights(xi))
    assert z[2] > 1 / 3 > z[0]


def test_step_compiles_once():
    tx = TW.make_task_weight_optimizer("adamw")
    step = jax.jit(functools.partial(TW.iwu_step, tx=tx, lam=0.3))
    xi, st = TW.init_task_weights(3, tx)
    acc, imp = np.full(3, 0.5, np.float32), np.array([0.1, 0.0, -0.1], np.float32)
    xi, st = step(xi, st, acc, imp)
    before = step._cache_size()
    xi, st = step(xi, st, acc * 0.5, imp)
    assert step._cache_size() == before == 1


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="kind"):
        TW.make_task_weight_optimizer("adagrad")
    with pytest.raises(ValueError, match="lr"):
        TW.make_task_weight_optimizer(lr=0.0)
    with pytest.raises(ValueError, match="weight_decay"):
        TW.make_task_weight_optimizer(weight_decay=-1e-3)
    with pytest.raises(ValueError, match="b2"):
        TW.make_task_weight_optimizer(b2=1.0)
    with pytest.raises(TypeError, match="lr"):
        TW.make_task_weight_optimizer(lr="0.1")
    tx = TW.make_task_weight_optimizer()
    xi, st = TW.init_task_weights(3, tx)
    with pytest.raises(ValueError, match="grad"):
        TW.task_weight_step(xi, st, np.zeros(4, np.float32), tx)
    with pytest.raises(ValueError, match="num_tasks"):
        TW.init_task_weights(0, tx)


def test_minibatch_schedule_equals_sequential_steps():
    rng = np.random.default_rng(4)
    tx = TW.make_task_weight_optimizer("adam_l2", weight_decay=1e-4)
    xi0 = rng.normal(size=3).astype(np.float32)
    acc = rng.uniform(size=3).astype(np.float32)
    imps = np.clip(rng.normal(scale=0.2, size=(4, 3)), -0.1, 0.1).astype(np.float32)
    run = jax.jit(functools.partial(TW.iwu_minibatch_steps, tx=tx, lam=0.3))
    xi, st, z_hist = run(xi0, tx.init(xi0), acc, imps)
    want = ref_run("adam_l2", xi0, [(acc, imps[m]) for m in range(4)], 0.3, 0.025, 1e-4)
    np.testing.assert_allclose(xi, want[-1], atol=1e-6, rtol=0)
    for m in range(4):
        np.testing.assert_allclose(z_hist[m], weighting.task_weights(want[m]), atol=1e-6)
    with pytest.raises(ValueError, match="improvements"):
        TW.iwu_minibatch_steps(xi0, tx.init(xi0), acc, imps[0], tx, lam=0.3)


def test_first_adam_step_from_uniform_is_plus_minus_lr():
    # Adam's first bias-corrected step is lr * g / (|g| + eps): about -lr * sign(g); at xi = 0
    # the coupled decay adds nothing. g = [0.06, 0, -0.06] (hand example in test_weighting).
    tx = TW.make_task_weight_optimizer("adam_l2", lr=0.025, weight_decay=1e-5)
    xi, st = TW.init_task_weights(3, tx)
    xi, st = TW.iwu_step(xi, st, np.array([0.9, 0.5, 0.1], np.float32),
                         np.array([0.1, 0.0, -0.1], np.float32), tx, lam=0.2)
    step = 0.025 * 0.06 / (0.06 + 1e-8)
    # 1e-6, the module's standard: optax forms Adam's bias correction 1 - b2**t in float32
    # (relative error ~6e-6 at t = 1), i.e. ~1.6e-7 on a 0.025 step.
    np.testing.assert_allclose(xi, [-step, 0.0, step], atol=1e-6, rtol=0)
    z = np.asarray(weighting.task_weights(xi))
    assert z[2] > z[1] > z[0]
