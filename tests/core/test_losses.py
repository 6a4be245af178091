"""Tests for jaxgrpo.core.losses against NumPy loop references and TRL 1.16's formulas."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgrpo.core import losses
from jaxgrpo.core.advantages import block_token_weights
from jaxgrpo.core.losses import (
    accumulate_terms,
    aux_from_terms,
    loss_from_terms,
    policy_loss,
    policy_loss_terms,
)

N, T = 6, 9


def make_inputs(seed=0, n=N, t=T, per_token_adv=False, spread=0.4):
    rng = np.random.default_rng(seed)
    logp = -rng.uniform(0.1, 3.0, size=(n, t)).astype(np.float32)
    old = (logp + rng.normal(0.0, spread, size=(n, t))).astype(np.float32)
    ref = (logp + rng.normal(0.0, spread, size=(n, t))).astype(np.float32)
    adv_shape = (n, t) if per_token_adv else (n,)
    adv = rng.normal(size=adv_shape).astype(np.float32)
    mask = rng.uniform(size=(n, t)) < 0.7
    mask[0] = False  # an empty row
    mask[1] = True  # a full row
    ent = rng.uniform(0.0, 2.0, size=(n, t)).astype(np.float32)
    return logp, old, ref, adv, mask, ent


# ----------------------------------------------------------------------------------------------
# NumPy loop reference
# ----------------------------------------------------------------------------------------------


def ref_policy_loss(
    logp,
    old,
    adv,
    mask,
    *,
    ref=None,
    clip_low=0.2,
    clip_high=0.2,
    dual_clip=None,
    kl_coef=0.0,
    kl_estimator="k3",
    kl_ratio_correction=False,
    agg="token_mean",
    max_len=None,
    token_weights=None,
    sequence_weights=None,
    ratio_level="token",
):
    n, t = logp.shape
    w = np.ones(n) if sequence_weights is None else np.asarray(sequence_weights, np.float64)
    per = np.zeros((n, t))
    for i in range(n):
        valid = [j for j in range(t) if mask[i, j]]
        if ratio_level == "sequence" and valid:
            s = math.exp(sum(float(logp[i, j]) - float(old[i, j]) for j in valid) / len(valid))
        for j in valid:
            a = float(adv[i, j]) if np.ndim(adv) == 2 else float(adv[i])
            if ratio_level == "token":
                r = math.exp(float(logp[i, j]) - float(old[i, j]))
            else:
                r = s
            rc = min(max(r, 1 - clip_low), 1 + clip_high)
            loss = -min(r * a, rc * a)
            if dual_clip is not None and a < 0:
                loss = min(loss, -dual_clip * a)
            if kl_coef != 0.0:
                lp, rf = float(logp[i, j]), float(ref[i, j])
                if kl_estimator == "k1":
                    kl = lp - rf
                elif kl_estimator == "k2":
                    kl = 0.5 * (lp - rf) ** 2
                else:
                    kl = math.exp(rf - lp) - (rf - lp) - 1
                if kl_ratio_correction:
                    kl *= r
                loss += kl_coef * kl
            per[i, j] = loss
    if agg == "token_mean":
        num = sum(w[i] * per[i, j] for i in range(n) for j in range(t) if mask[i, j])
        den = sum(1 for i in range(n) for j in range(t) if mask[i, j])
        return num / den if den else 0.0
    total = 0.0
    for i in range(n):
        cnt = sum(1 for j in range(t) if mask[i, j])
        row = sum(per[i, j] for j in range(t) if mask[i, j])
        if agg == "seq_mean_token_mean":
            val = row / cnt if cnt else 0.0
        elif agg == "seq_mean_token_sum_norm":
            val = row / (t if max_len is None else max_len)
        else:
            val = sum(token_weights[i, j] * per[i, j] for j in range(t) if mask[i, j])
        total += w[i] * val
    return total / n


def ref_block_weights(block_ids, k):
    n, t = block_ids.shape
    out = np.zeros((n, t))
    for i in range(n):
        for b in range(k):
            idx = [j for j in range(t) if block_ids[i, j] == b]
            for j in idx:
                out[i, j] = 1.0 / len(idx)
    return out


# ----------------------------------------------------------------------------------------------
# Values against the reference
# ----------------------------------------------------------------------------------------------

AGGS = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm", "block_mean"]


def _block_ids(seed, n=N, t=T):
    rng = np.random.default_rng(seed + 100)
    ids = rng.integers(-1, 3, size=(n, t)).astype(np.int32)
    ids[2] = np.where(ids[2] == 1, 0, ids[2])  # block 1 empty in row 2
    return ids


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize(
    "ratio_level,per_token_adv", [("token", False), ("token", True), ("sequence", True)]
)
def test_matches_reference_all_aggs(agg, ratio_level, per_token_adv):
    logp, old, ref, adv, mask, _ = make_inputs(seed=1, per_token_adv=per_token_adv)
    kw = dict(clip_low=0.2, clip_high=0.28, agg=agg, ratio_level=ratio_level)
    if agg == "block_mean":
        kw["token_weights"] = ref_block_weights(_block_ids(1), 3).astype(np.float32)
    if agg == "seq_mean_token_sum_norm":
        kw["max_len"] = 12
    got, _ = jax.jit(functools.partial(policy_loss, **kw))(logp, old, adv, mask)
    want = ref_policy_loss(logp, old, adv, mask, **kw)
    np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
@pytest.mark.parametrize("correction,ratio_level", [(False, "token"), (True, "token"), (True, "sequence")])
def test_kl_estimators(est, correction, ratio_level):
    logp, old, ref, adv, mask, _ = make_inputs(seed=2)
    kw = dict(
        kl_coef=0.07,
        kl_estimator=est,
        kl_ratio_correction=correction,
        agg="seq_mean_token_mean",
        ratio_level=ratio_level,
    )
    got, aux = policy_loss(logp, old, adv, mask, ref_logp=ref, **kw)
    want = ref_policy_loss(logp, old, adv, mask, ref=ref, **kw)
    np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)
    # kl_ref_mean is the plain estimator over valid tokens.
    d = (ref - logp).astype(np.float64)[mask]
    lp_ref = (logp - ref).astype(np.float64)[mask]
    kl = {"k1": lp_ref, "k2": 0.5 * lp_ref**2, "k3": np.exp(d) - d - 1}[est]
    np.testing.assert_allclose(float(aux["kl_ref_mean"]), kl.mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_dual_clip(ratio_level):
    logp, old, ref, adv, mask, _ = make_inputs(seed=3, spread=1.5)
    kw = dict(dual_clip=1.5, ratio_level=ratio_level, agg="token_mean")
    got, aux = policy_loss(logp, old, adv, mask, **kw)
    want = ref_policy_loss(logp, old, adv, mask, **kw)
    np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)
    no_dual, _ = policy_loss(logp, old, adv, mask, ratio_level=ratio_level)
    if ratio_level == "token":
        # With this spread some A < 0 tokens have r > 1.5: the cap binds and lowers the loss.
        r = np.exp(logp - old)
        a = np.broadcast_to(adv[:, None], logp.shape)
        frac = np.sum(mask & (a < 0) & (r > 1.5)) / mask.sum()
        assert frac > 0
        np.testing.assert_allclose(float(aux["clip_frac_dual"]), frac, rtol=1e-6)
        assert float(got) < float(no_dual)


def test_sequence_weights_each_agg():
    logp, old, ref, adv, mask, _ = make_inputs(seed=4)
    sw = np.random.default_rng(4).uniform(0.0, 2.0, size=N).astype(np.float32)
    for agg in AGGS:
        kw = dict(agg=agg, sequence_weights=sw)
        if agg == "block_mean":
            kw["token_weights"] = ref_block_weights(_block_ids(4), 3).astype(np.float32)
        got, _ = policy_loss(logp, old, adv, mask, **kw)
        want = ref_policy_loss(logp, old, adv, mask, **kw)
        np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6, err_msg=agg)


def test_dr_grpo_max_len_defaults_to_T():
    logp, old, ref, adv, mask, _ = make_inputs(seed=5)
    a, _ = policy_loss(logp, old, adv, mask, agg="seq_mean_token_sum_norm")
    b, _ = policy_loss(logp, old, adv, mask, agg="seq_mean_token_sum_norm", max_len=T)
    c, _ = policy_loss(logp, old, adv, mask, agg="seq_mean_token_sum_norm", max_len=np.int64(T))
    assert float(a) == float(b) == float(c)


# ----------------------------------------------------------------------------------------------
# TRL 1.16 formulas (GRPOTrainer._compute_loss as TRL documents it:
# k3 KL in the loss, multiplied by coef_1 = exp(logp - old) when use_bias_correction_kl; the
# per-token loss -min(coef_1 A, clip(coef_1) A) + beta kl, masked by multiplication, then:
#   grpo:    mean over rows of (sum_t loss*mask / clamp(sum_t mask, 1))
#   dr_grpo: sum(loss*mask) / (rows * max_completion_length)
#   dapo:    sum(loss*mask) / num_items_in_batch (the number of completion tokens in the batch)
# ----------------------------------------------------------------------------------------------


def trl_loss_numpy(logp, old, ref, adv, mask, *, loss_type, beta, eps_low, eps_high, max_cl):
    logp, old, ref = (x.astype(np.float64) for x in (logp, old, ref))
    m = mask.astype(np.float64)
    coef_1 = np.exp(logp - old)
    coef_2 = np.clip(coef_1, 1 - eps_low, 1 + eps_high)
    a = adv.astype(np.float64)[:, None]
    per_token = -np.minimum(coef_1 * a, coef_2 * a)
    kl = np.exp(ref - logp) - (ref - logp) - 1
    kl = kl * coef_1
    per_token = per_token + beta * kl
    if loss_type == "grpo":
        return np.mean((per_token * m).sum(-1) / np.maximum(m.sum(-1), 1.0))
    if loss_type == "dr_grpo":
        return (per_token * m).sum() / (per_token.shape[0] * max_cl)
    if loss_type == "dapo":
        return (per_token * m).sum() / m.sum()
    raise AssertionError(loss_type)


@pytest.mark.parametrize(
    "loss_type,agg",
    [("grpo", "seq_mean_token_mean"), ("dr_grpo", "seq_mean_token_sum_norm"), ("dapo", "token_mean")],
)
def test_matches_trl_formulas(loss_type, agg):
    logp, old, ref, adv, mask, _ = make_inputs(seed=6, spread=0.5)
    want = trl_loss_numpy(
        logp, old, ref, adv, mask, loss_type=loss_type, beta=0.04, eps_low=0.2, eps_high=0.28,
        max_cl=16,
    )
    kw = dict(max_len=16) if agg == "seq_mean_token_sum_norm" else {}
    got, _ = policy_loss(
        logp, old, adv, mask, ref_logp=ref, clip_low=0.2, clip_high=0.28, kl_coef=0.04,
        kl_estimator="k3", kl_ratio_correction=True, agg=agg, **kw,
    )
    np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)


@pytest.mark.hf
@pytest.mark.parametrize(
    "loss_type,agg",
    [("grpo", "seq_mean_token_mean"), ("dr_grpo", "seq_mean_token_sum_norm"), ("dapo", "token_mean")],
)
def test_trl_formula_gradient_with_torch_autograd(loss_type, agg):
    """The ratio correction keeps its gradient (coef_1 is not detached in TRL)."""
    torch = pytest.importorskip("torch")
    logp, old, ref, adv, mask, _ = make_inputs(seed=7, spread=0.5)
    lp = torch.tensor(logp, dtype=torch.float64, requires_grad=True)
    o, rf, a, m = (torch.tensor(x, dtype=torch.float64) for x in (old, ref, adv, mask))
    coef_1 = torch.exp(lp - o)
    coef_2 = torch.clamp(coef_1, 1 - 0.2, 1 + 0.28)
    per = -torch.min(coef_1 * a[:, None], coef_2 * a[:, None])
    per = per + 0.04 * (torch.exp(rf - lp) - (rf - lp) - 1) * coef_1
    if loss_type == "grpo":
        loss = ((per * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "dr_grpo":
        loss = (per * m).sum() / (per.shape[0] * 16)
    else:
        loss = (per * m).sum() / m.sum()
    loss.backward()
    kw = dict(max_len=16) if agg == "seq_mean_token_sum_norm" else {}
    f = lambda x: policy_loss(
        x, old, adv, mask, ref_logp=ref, clip_low=0.2, clip_high=0.28, kl_coef=0.04,
        kl_ratio_correction=True, agg=agg, **kw,
    )[0]
    g = jax.jit(jax.grad(f))(logp)
    np.testing.assert_allclose(np.asarray(g), lp.grad.numpy(), rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------


def test_token_gradient_unclipped_closed_form():
    """Inside the clip range d loss / d logp[n,t] = -A r / #tokens for token_mean."""
    logp, old, ref, adv, mask, _ = make_inputs(seed=8, spread=0.05)
    g = jax.grad(lambda x: policy_loss(x, old, adv, mask, clip_low=0.5, clip_high=0.5)[0])(logp)
    r = np.exp(logp.astype(np.float64) - old)
    want = np.where(mask, -adv[:, None] * r / mask.sum(), 0.0)
    np.testing.assert_allclose(np.asarray(g), want, rtol=1e-5, atol=1e-7)


def test_sequence_ratio_gradient_is_gspo():
    """GSPO-token form with a sequence advantage: grad = -A s / |o| per valid token."""
    logp, old, ref, adv, mask, _ = make_inputs(seed=9, spread=0.05)
    f = lambda x: policy_loss(
        x, old, adv, mask, ratio_level="sequence", agg="seq_mean_token_mean",
        clip_low=0.5, clip_high=0.5,
    )[0]
    g = np.asarray(jax.grad(f)(logp))
    want = np.zeros((N, T))
    for i in range(N):
        idx = np.flatnonzero(mask[i])
        if idx.size:
            s = np.exp(np.mean(logp[i, idx].astype(np.float64) - old[i, idx]))
            want[i, idx] = -adv[i] * s / idx.size / N
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7)


def test_clipped_tokens_have_zero_gradient():
    logp, old, ref, adv, mask, _ = make_inputs(seed=10, spread=2.0)
    g = np.asarray(jax.grad(lambda x: policy_loss(x, old, adv, mask)[0])(logp))
    r = np.exp(logp - old)
    a = np.broadcast_to(adv[:, None], logp.shape)
    clipped = mask & (((a > 0) & (r > 1.2)) | ((a < 0) & (r < 0.8)))
    assert clipped.any()
    assert np.all(g[clipped] == 0.0)
    assert np.all(g[mask & ~clipped & (a != 0)] != 0.0)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_masked_tokens_zero_gradient_and_nan_does_not_leak(agg, ratio_level):
    logp, old, ref, adv, mask, _ = make_inputs(seed=11, per_token_adv=True)
    bad = lambda x: np.where(mask, x, np.nan).astype(np.float32)
    kw = dict(agg=agg, ratio_level=ratio_level, kl_coef=0.1, kl_ratio_correction=True)
    if agg == "block_mean":
        kw["token_weights"] = bad(ref_block_weights(_block_ids(11), 3))
    f = lambda x, o, r, a: policy_loss(x, o, a, mask, ref_logp=r, **kw)
    clean, _ = f(logp, old, ref, adv)
    (loss, aux), g = jax.value_and_grad(f, has_aux=True, argnums=(0, 1, 2))(
        bad(logp), bad(old), bad(ref), bad(adv)
    )
    assert float(loss) == float(clean)
    for gi in g:
        gi = np.asarray(gi)
        assert np.all(np.isfinite(gi))
        assert np.all(gi[~mask] == 0.0)
    assert all(np.isfinite(float(v)) for v in aux.values())


def test_grad_wrt_logp_exactly_zero_on_masked_tokens():
    logp, old, ref, adv, mask, _ = make_inputs(seed=12)
    g = jax.grad(lambda x: policy_loss(x, old, adv, mask, ref_logp=ref, kl_coef=0.3)[0])(logp)
    g = np.asarray(g)
    assert np.all(g[~mask] == 0.0)
    assert np.any(g[mask] != 0.0)


# ----------------------------------------------------------------------------------------------
# Properties and degenerate inputs
# ----------------------------------------------------------------------------------------------


def test_on_policy_equals_minus_mean_advantage():
    logp, old, ref, adv, mask, _ = make_inputs(seed=13)
    loss, aux = policy_loss(logp, logp, adv, mask, agg="token_mean")
    a = np.broadcast_to(adv[:, None], logp.shape)[mask].astype(np.float64)
    np.testing.assert_allclose(float(loss), -a.mean(), rtol=1e-6, atol=1e-7)
    assert float(aux["clip_frac_low"]) == 0.0 and float(aux["clip_frac_high"]) == 0.0
    assert float(aux["ratio_mean"]) == 1.0
    assert float(aux["ratio_min"]) == 1.0 and float(aux["ratio_max"]) == 1.0
    assert float(aux["approx_kl"]) == 0.0


@pytest.mark.parametrize("agg", AGGS)
def test_all_false_mask(agg):
    logp, old, ref, adv, _, ent = make_inputs(seed=14)
    mask = np.zeros((N, T), bool)
    kw = dict(agg=agg, ratio_level="sequence", dual_clip=3.0, kl_coef=0.1)
    if agg == "block_mean":
        kw["token_weights"] = np.ones((N, T), np.float32)
    f = lambda x: policy_loss(x, old, adv, mask, ref_logp=ref, entropy=ent, **kw)
    (loss, aux), g = jax.value_and_grad(f, has_aux=True)(logp)
    assert float(loss) == 0.0
    assert np.all(np.asarray(g) == 0.0)
    for k, v in aux.items():
        assert float(v) == 0.0, k


def test_empty_block_contributes_nothing():
    ids = np.array([[0, 0, 0, 2, 2, -1], [1, 1, 1, 1, 1, 1]], np.int32)  # block 1 empty in row 0
    tw = np.asarray(block_token_weights(ids, 3))
    np.testing.assert_allclose(tw, ref_block_weights(ids, 3), rtol=1e-7)
    assert np.all(np.isfinite(tw))
    np.testing.assert_allclose(tw.sum(axis=1), [2.0, 1.0], rtol=1e-6)
    # Block mean on row 0 = mean over block 0 + mean over block 2 (block 1 absent).
    rng = np.random.default_rng(15)
    logp = -rng.uniform(0.5, 1.0, size=(2, 6)).astype(np.float32)
    adv = rng.normal(size=(2, 6)).astype(np.float32)
    mask = ids >= 0
    loss, _ = policy_loss(logp, logp, adv, mask, agg="block_mean", token_weights=tw)
    row0 = -(adv[0, :3].mean() + adv[0, 3:5].mean())
    row1 = -adv[1].mean()
    np.testing.assert_allclose(float(loss), (row0 + row1) / 2, rtol=1e-6)


def test_block_weights_scale():
    ids = np.array([[0, 0, 1, 1, 1]], np.int32)
    tw = np.asarray(block_token_weights(ids, 2, block_weights=np.array([1.0, 3.0], np.float32)))
    np.testing.assert_allclose(tw, [[0.5, 0.5, 1.0, 1.0, 1.0]], rtol=1e-7)


def test_aux_against_reference():
    logp, old, ref, adv, mask, ent = make_inputs(seed=16, spread=0.6)
    _, aux = policy_loss(logp, old, adv, mask, ref_logp=ref, entropy=ent, clip_high=0.28)
    r = np.exp(logp.astype(np.float64) - old)[mask]
    lr = (logp.astype(np.float64) - old)[mask]
    a = np.broadcast_to(adv[:, None], logp.shape)[mask]
    np.testing.assert_allclose(float(aux["clip_frac_low"]), np.mean((r < 0.8) & (a < 0)), rtol=1e-6)
    np.testing.assert_allclose(float(aux["clip_frac_high"]), np.mean((r > 1.28) & (a > 0)), rtol=1e-6)
    np.testing.assert_allclose(float(aux["approx_kl"]), np.mean(np.expm1(lr) - lr), rtol=1e-5)
    np.testing.assert_allclose(float(aux["ratio_mean"]), r.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(aux["ratio_min"]), r.min(), rtol=1e-5)
    np.testing.assert_allclose(float(aux["ratio_max"]), r.max(), rtol=1e-5)
    np.testing.assert_allclose(float(aux["entropy_mean"]), ent[mask].mean(), rtol=1e-5)
    assert float(aux["num_tokens"]) == mask.sum()
    assert "kl_ref_mean" in aux and "clip_frac_dual" not in aux


def test_bf16_inputs_computed_in_float32():
    logp, old, ref, adv, mask, _ = make_inputs(seed=17)
    lb, ob = (jnp.asarray(x, jnp.bfloat16) for x in (logp, old))
    loss, aux = policy_loss(lb, ob, adv, mask)
    assert loss.dtype == jnp.float32
    want = ref_policy_loss(np.asarray(lb, np.float32), np.asarray(ob, np.float32), adv, mask)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Exact micro-batch accumulation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_microbatch_accumulation_exact(agg, ratio_level):
    n = 16
    logp, old, ref, adv, mask, ent = make_inputs(seed=18, n=n)
    sw = np.random.default_rng(18).uniform(0.5, 1.5, size=n).astype(np.float32)
    kw = dict(
        agg=agg, ratio_level=ratio_level, ref_logp=ref, kl_coef=0.05, kl_ratio_correction=True,
        dual_clip=3.0, clip_high=0.28,
    )
    tw = ref_block_weights(_block_ids(18, n=n), 3).astype(np.float32)

    def terms(lp, sl):
        extra = dict(kw, ref_logp=ref[sl], entropy=ent[sl], sequence_weights=sw[sl])
        if agg == "block_mean":
            extra["token_weights"] = tw[sl]
        return policy_loss_terms(lp, old[sl], adv[sl], mask[sl], **extra)

    full = slice(0, n)
    (full_loss, full_aux) = jax.jit(
        lambda lp: (loss_from_terms(*terms(lp, full)[:2]), aux_from_terms(terms(lp, full)[2]))
    )(logp)
    full_grad = jax.grad(lambda lp: loss_from_terms(*terms(lp, full)[:2]))(logp)

    acc = None
    grads = []
    for k in range(4):
        sl = slice(4 * k, 4 * k + 4)
        tr = terms(logp[sl], sl)
        acc = tr if acc is None else accumulate_terms(acc, tr)
        grads.append(jax.grad(lambda lp, sl=sl: terms(lp, sl)[0])(logp[sl]))
    num, den, aux_terms = acc
    np.testing.assert_allclose(float(loss_from_terms(num, den)), float(full_loss), rtol=1e-6)
    np.testing.assert_allclose(
        np.concatenate([np.asarray(g) for g in grads]) / float(den), np.asarray(full_grad),
        rtol=1e-6, atol=1e-7,
    )
    aux = aux_from_terms(aux_terms)
    for k in full_aux:
        np.testing.assert_allclose(float(aux[k]), float(full_aux[k]), rtol=1e-6, err_msg=k)


# ----------------------------------------------------------------------------------------------
# jit / vmap
# ----------------------------------------------------------------------------------------------


def test_jit_and_vmap_match_eager():
    batches = [make_inputs(seed=20 + b, per_token_adv=True) for b in range(3)]
    stack = [np.stack([b[i] for b in batches]) for i in range(6)]
    logp, old, ref, adv, mask, ent = stack
    tw = np.stack([ref_block_weights(_block_ids(20 + b), 3) for b in range(3)]).astype(np.float32)
    f = functools.partial(
        policy_loss, agg="block_mean", kl_coef=0.1, ratio_level="sequence", dual_clip=2.0
    )
    eager = [f(logp[b], old[b], adv[b], mask[b], ref_logp=ref[b], entropy=ent[b],
               token_weights=tw[b]) for b in range(3)]
    g = lambda lp, o, a, m, r, e, w: f(lp, o, a, m, ref_logp=r, entropy=e, token_weights=w)
    vm_loss, vm_aux = jax.jit(jax.vmap(g))(logp, old, adv, mask, ref, ent, tw)
    for b in range(3):
        np.testing.assert_allclose(float(vm_loss[b]), float(eager[b][0]), rtol=1e-6)
        for k, v in eager[b][1].items():
            np.testing.assert_allclose(float(vm_aux[k][b]), float(v), rtol=1e-6, err_msg=k)


def test_jit_does_not_recompile():
    logp, old, ref, adv, mask, _ = make_inputs(seed=21)
    f = jax.jit(functools.partial(policy_loss, agg="seq_mean_token_mean"))
    f(logp, old, adv, mask)
    before = f._cache_size()
    f(logp + 0.1, old, adv, mask)
    assert f._cache_size() == before


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,exc,word",
    [
        (dict(agg="mean"), ValueError, "agg"),
        (dict(kl_estimator="k4"), ValueError, "kl_estimator"),
        (dict(ratio_level="seq"), ValueError, "ratio_level"),
        (dict(clip_low=1.0), ValueError, "clip_low"),
        (dict(clip_high=-0.1), ValueError, "clip_high"),
        (dict(dual_clip=1.0), ValueError, "dual_clip"),
        (dict(kl_coef=0.1), ValueError, "ref_logp"),
        (dict(agg="block_mean"), ValueError, "token_weights"),
        (dict(token_weights=np.ones((N, T), np.float32)), ValueError, "token_weights"),
        (dict(agg="seq_mean_token_sum_norm", max_len=0), ValueError, "max_len"),
        (dict(sequence_weights=np.ones(N + 1, np.float32)), ValueError, "sequence_weights"),
        (dict(entropy=np.ones((N, T + 1), np.float32)), ValueError, "entropy"),
        (dict(ref_logp=np.ones((N, T), np.int32)), TypeError, "ref_logp"),
    ],
)
def test_validation(kwargs, exc, word):
    logp, old, ref, adv, mask, _ = make_inputs(seed=22)
    with pytest.raises(exc, match=word):
        policy_loss(logp, old, adv, mask, **kwargs)


def test_validation_shapes():
    logp, old, ref, adv, mask, _ = make_inputs(seed=23)
    with pytest.raises(ValueError, match="logp"):
        policy_loss(logp[0], old, adv, mask)
    with pytest.raises(ValueError, match="old_logp"):
        policy_loss(logp, old[:, :-1], adv, mask)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logp, old, adv[:-1], mask)
    with pytest.raises(ValueError, match="mask"):
        policy_loss(logp, old, adv, mask[:, :-1])
    with pytest.raises(TypeError, match="logp"):
        policy_loss(logp.astype(np.int32), old, adv, mask)
    with pytest.raises(ValueError, match="block_ids"):
        block_token_weights(np.zeros(3, np.int32), 2)
    with pytest.raises(TypeError, match="block_ids"):
        block_token_weights(np.zeros((2, 3), np.float32), 2)


def test_mode_tuples_are_the_single_source():
    assert losses.AGG_MODES == tuple(AGGS)
    assert losses.KL_ESTIMATORS == ("k1", "k2", "k3")


# ----------------------------------------------------------------------------------------------
# Edges: max_len with every aggregation, traced hyper-parameters
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("agg", [a for a in AGGS if a != "seq_mean_token_sum_norm"])
def test_max_len_is_accepted_and_ignored_by_aggregations_that_do_not_use_it(agg):
    logp, old, ref, adv, mask, _ = make_inputs(seed=30)
    kw = dict(token_weights=ref_block_weights(_block_ids(30), 3).astype(np.float32)) \
        if agg == "block_mean" else {}
    a, aux_a = policy_loss(logp, old, adv, mask, agg=agg, **kw)
    b, aux_b = policy_loss(logp, old, adv, mask, agg=agg, max_len=1000, **kw)
    assert float(a) == float(b) and aux_a.keys() == aux_b.keys()
    with pytest.raises(ValueError, match="max_len"):  # still validated
        policy_loss(logp, old, adv, mask, agg=agg, max_len=0, **kw)


@pytest.mark.parametrize("name,value", [("clip_low", 0.1), ("clip_high", 0.28),
                                        ("dual_clip", 2.0), ("kl_coef", 0.05)])
def test_traced_hyperparameters_give_the_static_result(name, value):
    logp, old, ref, adv, mask, _ = make_inputs(seed=31)
    base = dict(kl_coef=0.02, dual_clip=3.0)
    want, want_aux = policy_loss(logp, old, adv, mask, ref_logp=ref, **{**base, name: value})
    f = jax.jit(lambda h: policy_loss(logp, old, adv, mask, ref_logp=ref, **{**base, name: h}))
    got, got_aux = f(jnp.float32(value))
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    for k, v in want_aux.items():
        np.testing.assert_allclose(float(got_aux[k]), float(v), rtol=1e-6, err_msg=k)
    np.testing.assert_allclose(float(got), ref_policy_loss(logp, old, adv, mask, ref=ref,
                                                           **{**base, name: value}), rtol=1e-5)
    f(jnp.float32(value * 0.5))
    assert f._cache_size() == 1  # a new value does not recompile


def test_traced_kl_coef_without_ref_logp_and_traced_max_len_fail_with_a_sentence():
    logp, old, ref, adv, mask, _ = make_inputs(seed=32)
    with pytest.raises(ValueError, match="kl_coef is traced.*pass ref_logp"):
        jax.jit(lambda c: policy_loss(logp, old, adv, mask, kl_coef=c))(jnp.float32(0.0))
    with pytest.raises(ValueError, match="max_len must be a static Python int"):
        jax.jit(lambda m: policy_loss(logp, old, adv, mask, agg="seq_mean_token_sum_norm",
                                      max_len=m))(jnp.int32(16))
