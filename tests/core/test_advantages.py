"""Tests for jaxgrpo.core.advantages: NumPy loop references, peers' formulas, the BAE spec."""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgrpo.core import advantages as adv_lib
from jaxgrpo.core.advantages import (
    block_token_weights,
    blockwise,
    flatten_groups,
    group_relative,
    token_advantages,
)
from jaxgrpo.core.masked import masked_all_equal

# Most tests call these jitted wrappers (one compile per shape and mode instead of eager
# op-by-op dispatch); the jit/vmap tests compare them with plain eager calls.
gr = jax.jit(group_relative, static_argnames=("baseline", "scale", "std_ddof", "eps"))
bw = jax.jit(blockwise, static_argnames=("baselines", "std_normalize", "ocb_kappa", "eps"))

RTOL, ATOL = 1e-5, 1e-6
GROUP_MODES = list(itertools.product(("mean", "leave_one_out"), ("group", "batch", "none"), (0, 1)))


# ------------------------------------------------------------------------------------------
# NumPy loop references (float64, one sample at a time)
# ------------------------------------------------------------------------------------------


def _mean(vals):
    return sum(vals) / len(vals)


def _std(vals, ddof):
    m = _mean(vals)
    return math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - ddof))


def ref_group_relative(r, valid, baseline, scale, ddof, eps):
    P, G = r.shape
    out = np.zeros((P, G))
    batch = [float(r[p, g]) for p in range(P) for g in range(G) if valid[p, g]]
    for p in range(P):
        idx = [g for g in range(G) if valid[p, g]]
        vals = [float(r[p, g]) for g in idx]
        n = len(vals)
        if n == 0 or max(vals) == min(vals):
            continue
        if baseline == "leave_one_out" and n < 2:
            continue
        if scale == "group":
            if n <= ddof:
                continue
            s = _std(vals, ddof)
        elif scale == "batch":
            if len(batch) <= ddof:
                continue
            s = _std(batch, ddof)
        for g in idx:
            x = float(r[p, g])
            b = _mean(vals) if baseline == "mean" else (sum(vals) - x) / (n - 1)
            a = x - b
            if scale != "none":
                a = a / (s + eps)
            out[p, g] = a
    return out


def ref_blockwise(r, o, valid, baselines, std_normalize, kappa, eps):
    P, G, K = r.shape
    out = np.zeros((P, G, K))
    for k, name in enumerate(baselines):
        batch = [float(r[p, g, k]) for p in range(P) for g in range(G) if valid[p, g]]
        for p in range(P):
            group = [float(r[p, j, k]) for j in range(G) if valid[p, j]]
            for g in range(G):
                if not valid[p, g]:
                    continue
                x = float(r[p, g, k])
                if name in ("ocb", "ocb_loo", "ocb_shrink"):
                    members = [j for j in range(G) if valid[p, j] and o[p, j, k] == o[p, g, k]]
                    stratum = [float(r[p, j, k]) for j in members]
                if name == "none":
                    a, s = x, math.sqrt(sum(v * v for v in batch) / len(batch))
                elif name == "batch_mean":
                    a = 0.0 if max(batch) == min(batch) else x - _mean(batch)
                    s = _std(batch, 0)
                elif name == "group_mean":
                    a = 0.0 if max(group) == min(group) else x - _mean(group)
                    s = _std(group, 0)
                elif name == "ocb":
                    a = 0.0 if max(stratum) == min(stratum) else x - _mean(stratum)
                    s = _std(stratum, 0)
                elif name == "ocb_loo":
                    others = [float(r[p, j, k]) for j in members if j != g]
                    flat = len(others) == 0 or max(stratum) == min(stratum)
                    a = 0.0 if flat else x - _mean(others)
                    s = _std(stratum, 0)
                else:  # ocb_shrink
                    n = len(stratum)
                    lam = n / (n + kappa)
                    b = lam * _mean(stratum) + (1 - lam) * _mean(group)
                    a = 0.0 if max(group) == min(group) else x - b
                    s = math.sqrt(lam * _std(stratum, 0) ** 2 + (1 - lam) * _std(group, 0) ** 2)
                if std_normalize:
                    a = a / (s + eps) if s + eps > 0 else 0.0
                out[p, g, k] = a
    return out


def random_group_batch(seed, P=7, G=6, degenerate=True):
    """Random rewards and a random valid mask, with degenerate groups planted."""
    rng = np.random.default_rng(seed)
    r = rng.normal(size=(P, G)).astype(np.float32)
    valid = rng.random((P, G)) < 0.75
    if degenerate:
        valid[0] = False  # no valid sample
        valid[1] = False
        valid[1, 2] = True  # one valid sample
        r[2] = 0.1  # all equal (0.1 leaves rounding error in r - mean)
        valid[2] = True
        r[3, valid[3]] = -0.49  # all valid rewards equal, invalid ones differ
        valid[4, :2] = True  # at least two valid samples
    r[~valid] = rng.normal(size=int((~valid).sum())) * 100  # garbage where invalid
    return r, valid


def random_block_batch(seed, P=5, G=7, K=3, num_outcomes=3):
    rng = np.random.default_rng(seed)
    r = rng.normal(size=(P, G, K)).astype(np.float32)
    o = rng.integers(0, num_outcomes, size=(P, G, K)).astype(np.int32)
    valid = rng.random((P, G)) < 0.8
    valid[0] = False
    valid[1] = False
    valid[1, 3] = True
    r[2, :, 1] = 0.1  # a group with all-equal rewards in block 1
    r[~valid] = np.nan  # unscorable samples
    return r, o, valid


# ------------------------------------------------------------------------------------------
# group_relative
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("baseline,scale,ddof", GROUP_MODES)
@pytest.mark.parametrize("seed", [0, 1])
def test_group_relative_matches_loop_reference(baseline, scale, ddof, seed):
    r, valid = random_group_batch(seed)
    got = gr(r, valid, baseline=baseline, scale=scale, std_ddof=ddof, eps=1e-6)
    want = ref_group_relative(r, valid, baseline, scale, ddof, 1e-6)
    assert got.shape == r.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=ATOL)
    assert np.all(np.asarray(got)[~valid] == 0)


def test_group_relative_default_is_grpo_population_zscore():
    r = np.array([[1.0, 0.0, 0.0, 1.0], [0.5, 2.0, -1.0, 3.5]], np.float32)
    got = np.asarray(gr(r))
    want = (r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got[0], [1, -1, -1, 1], rtol=RTOL, atol=ATOL)


# Peers' formulas, transcribed in NumPy from each project's documented formulas (and, for
# TRL's scale_rewards="batch", its GRPOTrainer: group-mean numerator over rewards.std()).


def tunix_grpo(r_flat, G):  # algo_core grpo: np.std ddof=1, +1e-6, contiguous groups
    r = r_flat.reshape(-1, G).astype(np.float64)
    return ((r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-6)).ravel()


def verl_grpo(r_flat, uids):  # torch.std (unbiased), +1e-6, groups by uid; singleton: mean 0, std 1
    out = np.zeros(len(r_flat))
    for uid in set(uids):
        idx = [i for i, u in enumerate(uids) if u == uid]
        vals = np.array([r_flat[i] for i in idx], np.float64)
        mean, std = (vals.mean(), vals.std(ddof=1)) if len(vals) > 1 else (0.0, 1.0)
        for i in idx:
            out[i] = (r_flat[i] - mean) / (std + 1e-6)
    return out


def trl_grpo(r_flat, G, scale_rewards):  # group mean; Bessel std of the group or whole batch; +1e-4
    r = r_flat.astype(np.float64)
    centred = r - np.repeat(r.reshape(-1, G).mean(1), G)
    if scale_rewards == "group":
        std = np.repeat(r.reshape(-1, G).std(1, ddof=1), G)
    else:
        std = np.full_like(r, r.std(ddof=1))
    return centred / (std + 1e-4)


def easydel_grpo(r_flat, G):  # jnp.nanstd (ddof=0), +1e-4
    r = r_flat.reshape(-1, G).astype(np.float64)
    return ((r - r.mean(1, keepdims=True)) / (np.nanstd(r, 1, keepdims=True) + 1e-4)).ravel()


def _peer_rewards(seed, P=6, G=8):
    rng = np.random.default_rng(seed)
    r = rng.integers(0, 2, size=(P, G)).astype(np.float32) + rng.normal(size=(P, G)) * 0.3
    return r.astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_group_relative_reproduces_peers(seed):
    r = _peer_rewards(seed)
    P, G = r.shape
    flat = r.ravel()

    def ours(**kw):
        return np.asarray(flatten_groups(gr(r, **kw)))

    np.testing.assert_allclose(ours(std_ddof=1, eps=1e-6), tunix_grpo(flat, G), RTOL, ATOL)
    uids = [f"prompt{n // G}" for n in range(P * G)]
    np.testing.assert_allclose(ours(std_ddof=1, eps=1e-6), verl_grpo(flat, uids), RTOL, ATOL)
    np.testing.assert_allclose(ours(std_ddof=1, eps=1e-4), trl_grpo(flat, G, "group"), RTOL, ATOL)
    np.testing.assert_allclose(
        ours(scale="batch", std_ddof=1, eps=1e-4), trl_grpo(flat, G, "batch"), RTOL, ATOL
    )
    np.testing.assert_allclose(ours(std_ddof=0, eps=1e-4), easydel_grpo(flat, G), RTOL, ATOL)
    np.testing.assert_allclose(  # Dr. GRPO: centred only
        ours(scale="none"), (r - r.mean(1, keepdims=True)).ravel(), RTOL, ATOL
    )
    loo = (r.sum(1, keepdims=True) - r) / (G - 1)  # RLOO
    np.testing.assert_allclose(
        ours(baseline="leave_one_out", scale="none"), (r - loo).ravel(), RTOL, ATOL
    )


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_mean_baseline_gives_zero_mean_groups(scale):
    r, valid = random_group_batch(3, P=9, G=8)
    a = np.asarray(gr(r, valid, scale=scale))
    np.testing.assert_allclose(np.where(valid, a, 0).sum(1), 0, atol=1e-5)


def test_leave_one_out_is_rescaled_mean_advantage():
    # r_i - mean_{-i} = n / (n - 1) * (r_i - mean): the standard RLOO identity.
    r, valid = random_group_batch(4, P=9, G=8)
    n = valid.sum(1, keepdims=True)
    mean_adv = np.asarray(gr(r, valid, scale="none"))
    loo_adv = np.asarray(gr(r, valid, baseline="leave_one_out", scale="none"))
    want = np.where(n >= 2, mean_adv * n / np.maximum(n - 1, 1), 0)
    np.testing.assert_allclose(loo_adv, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("baseline,scale,ddof", GROUP_MODES)
def test_invariant_to_reward_shifts(baseline, scale, ddof):
    r, valid = random_group_batch(5, degenerate=False)
    kw = dict(baseline=baseline, scale=scale, std_ddof=ddof)
    a = np.asarray(gr(r, valid, **kw))
    if scale == "batch":  # the batch std sees between-group shifts; a global shift only
        shift = np.full((r.shape[0], 1), 3.0, np.float32)
    else:
        shift = np.linspace(-5, 5, r.shape[0], dtype=np.float32)[:, None]
    b = np.asarray(gr(r + shift, valid, **kw))
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)  # r + shift rounds at 5 * 2**-23


@pytest.mark.parametrize("baseline,scale", [(b, s) for b, s, d in GROUP_MODES if d == 0])
@pytest.mark.parametrize("factor", [0.25, 8.0, -2.0])
def test_scale_behaviour(baseline, scale, factor):
    r, valid = random_group_batch(6, degenerate=False)
    kw = dict(baseline=baseline, scale=scale, eps=0.0)
    a = np.asarray(gr(r, valid, **kw))
    b = np.asarray(gr(r * np.float32(factor), valid, **kw))
    # Standardised modes are scale-free (up to sign); Dr. GRPO / RLOO scale linearly.
    want = a * (factor if scale == "none" else np.sign(factor))
    np.testing.assert_allclose(b, want, rtol=RTOL, atol=ATOL)


def _degenerate_groups():
    """Rows: all equal (0.1 leaves rounding error in r - mean), equal valid rewards next to a
    different invalid one, one valid sample, no valid sample."""
    r = np.array([[0.1, 0.1, 0.1], [0.1, 0.1, 5.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], np.float32)
    valid = np.array([[1, 1, 1], [1, 1, 0], [0, 1, 0], [0, 0, 0]], bool)
    return r, valid


def test_all_equal_guard_leaves_rounding_error_naively():
    r, _ = _degenerate_groups()
    naive = r[:1] - jnp.mean(jnp.asarray(r[:1]), axis=-1, keepdims=True)
    assert np.any(np.asarray(naive) != 0)  # so the exact-zero tests below test something
    assert np.all(np.asarray(group_relative(r[:1])) == 0)  # eager
    assert np.all(np.asarray(group_relative(r[:1], scale="none", eps=0.0)) == 0)


@pytest.mark.parametrize("baseline,scale,ddof", GROUP_MODES)
def test_degenerate_groups_give_exact_zero(baseline, scale, ddof):
    # eps = 1e-6: where dividing rounding error by (0 + eps) would give a small non-zero value
    r, valid = _degenerate_groups()
    kw = dict(baseline=baseline, scale=scale, std_ddof=ddof, eps=1e-6)
    assert np.all(np.asarray(gr(r, valid, **kw)) == 0)
    assert np.all(np.asarray(gr(r, np.zeros_like(valid), **kw)) == 0)
    assert np.all(np.asarray(gr(np.full_like(r, 0.1), None, **kw)) == 0)


@pytest.mark.parametrize("baseline,scale,ddof", GROUP_MODES)
def test_no_nan_or_inf_from_degenerate_input(baseline, scale, ddof):
    eps = 0.0  # the strictest setting: any unguarded 0 / 0 or x / 0 would show
    r, valid = random_group_batch(7)
    r[~valid] = np.nan
    r[5, :3] = [1e-38, 2e-38, 0.0]  # subnormal spread
    valid[5, :3] = True
    kw = dict(baseline=baseline, scale=scale, std_ddof=ddof, eps=eps)
    assert np.all(np.isfinite(np.asarray(gr(r, valid, **kw))))
    assert np.all(np.isfinite(np.asarray(gr(np.nan_to_num(r[:, :1]), None, **kw))))  # G = 1


def test_ddof_one_needs_two_samples_for_the_std():
    r = np.array([[1.0, 5.0, 2.0]], np.float32)
    valid = np.array([[True, False, False]])
    for scale in ("group", "batch"):
        a = gr(r, valid, scale=scale, std_ddof=1)
        assert np.all(np.asarray(a) == 0)


@pytest.mark.parametrize("baseline,scale", [("mean", "group"), ("leave_one_out", "batch")])
def test_group_relative_jit_vmap_and_stop_gradient(baseline, scale):
    batches = [random_group_batch(s) for s in range(3)]
    r = np.stack([b[0] for b in batches])
    valid = np.stack([b[1] for b in batches])
    fn = functools.partial(group_relative, baseline=baseline, scale=scale, std_ddof=1)
    eager = np.stack([np.asarray(fn(r[i], valid[i])) for i in range(3)])
    jitted = jax.jit(fn)
    np.testing.assert_allclose(np.asarray(jitted(r[0], valid[0])), eager[0], RTOL, ATOL)
    np.testing.assert_allclose(np.asarray(jax.jit(jax.vmap(fn))(r, valid)), eager, RTOL, ATOL)
    jitted(r[1], valid[1])
    assert jitted._cache_size() == 1  # the second call with the same shapes compiles nothing
    # static_argnames works as well as partial
    j2 = jax.jit(group_relative, static_argnames=("baseline", "scale", "std_ddof", "eps"))
    out = j2(r[0], valid[0], baseline=baseline, scale=scale, std_ddof=1)
    np.testing.assert_allclose(np.asarray(out), eager[0], RTOL, ATOL)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(fn(x, valid[0]) * x)))(jnp.asarray(r[0]))
    np.testing.assert_allclose(np.asarray(grad), np.asarray(fn(r[0], valid[0])), RTOL, ATOL)


def test_group_relative_keeps_wider_float_and_promotes_bf16():
    r = jnp.asarray(_peer_rewards(0), jnp.bfloat16)
    assert gr(r).dtype == jnp.float32


def test_group_relative_errors_name_the_argument():
    r = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="rewards"):
        group_relative(np.zeros((6,), np.float32))
    with pytest.raises(ValueError, match="rewards"):
        group_relative(np.zeros((2, 3, 1), np.float32))
    with pytest.raises(TypeError, match="rewards"):
        group_relative(np.zeros((2, 3), np.int32))
    with pytest.raises(ValueError, match="valid"):
        group_relative(r, np.ones((3, 2), bool))
    with pytest.raises(TypeError, match="valid"):
        group_relative(r, np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match="baseline"):
        group_relative(r, baseline="median")
    with pytest.raises(ValueError, match="scale"):
        group_relative(r, scale="global")
    with pytest.raises(ValueError, match="std_ddof"):
        group_relative(r, std_ddof=-1)
    with pytest.raises(TypeError, match="std_ddof"):
        group_relative(r, std_ddof=1.0)
    with pytest.raises(ValueError, match="eps"):
        group_relative(r, eps=-1e-6)
    with pytest.raises(ValueError, match="baseline"):  # at trace time under jit
        jax.jit(functools.partial(group_relative, baseline="loo"))(r)


# ------------------------------------------------------------------------------------------
# blockwise (BAE)
# ------------------------------------------------------------------------------------------


def _bae_example(c, q):
    c = np.asarray([c], np.float32)
    q = np.asarray([q], np.float32)
    rewards = np.stack([c, -((q - c) ** 2)], axis=-1)  # [1, 4, 2]: correctness, Brier
    outcomes = np.stack([c, c], axis=-1).astype(np.int32)
    return rewards, outcomes


def test_bae_spec_worked_example():
    """A worked example: one prompt, G = 4, Brier confidence reward."""
    rewards, outcomes = _bae_example([1, 1, 0, 0], [0.9, 0.6, 0.2, 0.7])
    np.testing.assert_allclose(rewards[0, :, 1], [-0.01, -0.16, -0.04, -0.49], atol=1e-7)
    ocb = np.asarray(bw(rewards, outcomes, baselines=("group_mean", "ocb")))[0]
    np.testing.assert_allclose(ocb[:, 0], [0.5, 0.5, -0.5, -0.5], atol=ATOL)
    np.testing.assert_allclose(ocb[:, 1], [0.075, -0.075, 0.225, -0.225], atol=ATOL)
    gm = np.asarray(bw(rewards, outcomes, baselines=("group_mean", "group_mean")))[0]
    np.testing.assert_allclose(gm[:, 1], [0.165, 0.015, 0.135, -0.315], atol=ATOL)
    rlcr = rewards.sum(-1)  # the RLCR scalar R = c - (q - c)^2 on all tokens
    np.testing.assert_allclose(rlcr[0], [0.99, 0.84, -0.04, -0.49], atol=ATOL)
    a = np.asarray(gr(rlcr, scale="none"))[0]
    np.testing.assert_allclose(a, [0.665, 0.515, -0.365, -0.815], atol=ATOL)


def test_bae_spec_singleton_stratum_example():
    rewards, outcomes = _bae_example([1, 0, 0, 0], [0.3, 0.1, 0.5, 0.9])
    a = np.asarray(bw(rewards, outcomes, baselines=("group_mean", "ocb")))[0, :, 1]
    assert a[0] == 0  # the only correct sample: singleton stratum, exactly 0
    np.testing.assert_allclose(a, [0, 1.04 / 3, 0.32 / 3, -1.36 / 3], atol=ATOL)
    np.testing.assert_allclose(a, [0, 0.3467, 0.1067, -0.4533], atol=5e-5)  # the worked example's 4 decimals


BLOCK_MODES = ("none", "batch_mean", "group_mean", "ocb", "ocb_loo", "ocb_shrink")


@pytest.mark.parametrize("std_normalize", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_blockwise_matches_loop_reference(std_normalize, seed):
    r, o, valid = random_block_batch(seed, K=6)
    kw = dict(baselines=BLOCK_MODES, std_normalize=std_normalize, ocb_kappa=1.5, eps=1e-6)
    got = np.asarray(bw(r, o, valid, **kw))
    want = ref_blockwise(r, o, valid, BLOCK_MODES, std_normalize, 1.5, 1e-6)
    assert got.shape == r.shape
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    assert np.all(got[~valid] == 0) and np.all(np.isfinite(got))


def test_blockwise_agrees_with_group_relative():
    r, o, valid = random_block_batch(2, K=2)
    a = np.asarray(bw(r, o, valid, baselines=("group_mean", "group_mean")))
    b = np.asarray(bw(r, o, valid, baselines=("group_mean",) * 2, std_normalize=True))
    for k in range(2):
        np.testing.assert_allclose(a[..., k], gr(r[..., k], valid, scale="none"))
        want = gr(r[..., k], valid, scale="group", std_ddof=0, eps=1e-6)
        np.testing.assert_allclose(b[..., k], want, RTOL, ATOL)


def test_ocb_relations():
    r, o, valid = random_block_batch(3, K=2, num_outcomes=2)
    names = ("ocb", "ocb_loo")
    ocb, loo = np.moveaxis(
        np.asarray(bw(r[..., :1].repeat(2, -1), o[..., :1].repeat(2, -1), valid, baselines=names)),
        -1,
        0,
    )
    # own-sample OCB = (n - 1) / n * leave-one-out OCB (paper §4.3); singletons give 0 in both.
    same = (o[:, :, None, 0] == o[:, None, :, 0]) & valid[:, None, :]
    n = same.sum(-1)
    np.testing.assert_allclose(
        ocb, np.where(valid, loo * (n - 1) / np.maximum(n, 1), 0), RTOL, ATOL
    )
    assert np.all(ocb[(n == 1) & valid] == 0) and np.all(loo[(n == 1) & valid] == 0)
    assert np.any((n == 1) & valid)  # the data holds singleton strata
    # one stratum for everybody: OCB is the group mean
    same_o = np.zeros_like(o)
    a = bw(r, same_o, valid, baselines=("ocb", "ocb"))
    np.testing.assert_array_equal(a, bw(r, same_o, valid, baselines=("group_mean",) * 2))
    # outcome labels are arbitrary integers: relabelling changes nothing; bool works
    relabelled = np.where(o == 0, -7, o * 1000)
    np.testing.assert_array_equal(
        bw(r, relabelled, valid, baselines=("ocb", "ocb")),
        bw(r, o, valid, baselines=("ocb", "ocb")),
    )
    np.testing.assert_array_equal(
        bw(r, o == 1, valid, baselines=("ocb", "ocb")),
        bw(r, o, valid, baselines=("ocb", "ocb")),
    )


@pytest.mark.parametrize("std_normalize", [False, True])
def test_ocb_shrink_limits(std_normalize):
    r, o, valid = random_block_batch(4, K=2, num_outcomes=3)
    kw = dict(std_normalize=std_normalize)
    ocb = bw(r, o, valid, baselines=("ocb", "ocb"), **kw)
    k0 = bw(r, o, valid, baselines=("ocb_shrink",) * 2, ocb_kappa=0.0, **kw)
    np.testing.assert_array_equal(k0, ocb)
    gm = bw(r, o, valid, baselines=("group_mean",) * 2, **kw)
    kbig = bw(r, o, valid, baselines=("ocb_shrink",) * 2, ocb_kappa=1e7, **kw)
    np.testing.assert_allclose(kbig, gm, rtol=1e-4, atol=1e-5)
    # the default kappa keeps singleton strata alive: half the deviation from the group mean
    rewards, outcomes = _bae_example([1, 0, 0, 0], [0.3, 0.1, 0.5, 0.9])
    a = np.asarray(bw(rewards, outcomes, baselines=("group_mean", "ocb_shrink")))
    group_dev = rewards[0, 0, 1] - rewards[0, :, 1].mean()
    assert adv_lib.DEFAULT_OCB_KAPPA == 1.0
    np.testing.assert_allclose(a[0, 0, 1], 0.5 * group_dev, atol=ATOL)


def test_blockwise_ignores_invalid_samples():
    r, o, valid = random_block_batch(5, K=3)
    names = ("batch_mean", "ocb_shrink", "ocb_loo")
    a = bw(r, o, valid, baselines=names, std_normalize=True)
    r2, o2 = r.copy(), o.copy()
    r2[~valid] = 1e6
    o2[~valid] = 0
    np.testing.assert_array_equal(a, bw(r2, o2, valid, baselines=names, std_normalize=True))


@pytest.mark.parametrize("std_normalize", [False, True])
@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_blockwise_degenerate_inputs(std_normalize, eps):
    kw = dict(baselines=BLOCK_MODES, std_normalize=std_normalize, eps=eps)
    K = len(BLOCK_MODES)
    o = np.zeros((4, 3, K), np.int32)
    o[:, 1] = 1  # strata of one and two samples
    # groups: all equal; no valid sample; one valid sample; all zero
    r = np.random.default_rng(0).normal(size=(4, 3, K)).astype(np.float32)
    r[0] = 0.1
    r[3] = 0.0
    valid = np.array([[1, 1, 1], [0, 0, 0], [0, 1, 0], [1, 1, 1]], bool)
    a = np.asarray(bw(r, o, valid, **kw))
    assert np.all(np.isfinite(a)) and np.all(a[~valid] == 0)
    group_based = [BLOCK_MODES.index(n) for n in ("group_mean", "ocb", "ocb_loo", "ocb_shrink")]
    assert np.all(a[:, :, group_based] == 0)
    assert np.all(a[:, 1, BLOCK_MODES.index("ocb")] == 0)  # singleton strata
    assert np.all(a[3][:, [BLOCK_MODES.index("none")] + group_based] == 0)  # zero rewards
    # the whole batch degenerate: all equal, all invalid, all zero
    flat = np.asarray(bw(np.full_like(r, 0.1), o, None, **kw))
    none = BLOCK_MODES.index("none")
    want = 0.1 / (0.1 + eps) if std_normalize else 0.1  # raw reward / its RMS (+ eps)
    np.testing.assert_allclose(flat[..., none], want, rtol=RTOL)
    assert np.all(np.delete(flat, none, axis=-1) == 0)
    assert np.all(np.asarray(bw(r, o, np.zeros_like(valid), **kw)) == 0)
    assert np.all(np.asarray(bw(np.zeros_like(r), o, None, **kw)) == 0)


def test_blockwise_jit_vmap_and_stop_gradient():
    batches = [random_block_batch(s, K=3) for s in range(3)]
    r, o, valid = (np.stack([b[i] for b in batches]) for i in range(3))
    fn = functools.partial(
        blockwise, baselines=("group_mean", "ocb", "ocb_shrink"), std_normalize=True
    )
    eager = np.stack([np.asarray(fn(r[i], o[i], valid[i])) for i in range(3)])
    jitted = jax.jit(fn)
    np.testing.assert_allclose(np.asarray(jitted(r[0], o[0], valid[0])), eager[0], RTOL, ATOL)
    jitted(r[1], o[1], valid[1])
    assert jitted._cache_size() == 1
    np.testing.assert_allclose(np.asarray(jax.jit(jax.vmap(fn))(r, o, valid)), eager, RTOL, ATOL)
    clean = np.nan_to_num(r[0])
    grad = jax.jit(jax.grad(lambda x: jnp.sum(fn(x, o[0], valid[0]) * x)))(jnp.asarray(clean))
    np.testing.assert_allclose(np.asarray(grad), np.asarray(fn(clean, o[0], valid[0])), RTOL, ATOL)


def test_blockwise_errors_name_the_argument():
    r = np.zeros((2, 3, 2), np.float32)
    o = np.zeros((2, 3, 2), np.int32)
    with pytest.raises(ValueError, match="rewards"):
        blockwise(np.zeros((2, 3), np.float32), baselines=("none",))
    with pytest.raises(TypeError, match="rewards"):
        blockwise(o, baselines=("none", "none"))
    with pytest.raises(TypeError, match="outcomes"):
        blockwise(r, o.astype(np.float32), baselines=("group_mean", "ocb"))
    with pytest.raises(ValueError, match="outcomes"):
        blockwise(r, baselines=("group_mean", "ocb_loo"))
    with pytest.raises(ValueError, match="outcomes"):
        blockwise(r, o[..., :1], baselines=("group_mean", "ocb"))
    with pytest.raises(ValueError, match=r"baselines\[1\]"):
        blockwise(r, o, baselines=("group_mean", "stratified"))
    with pytest.raises(ValueError, match="baselines"):
        blockwise(r, o, baselines=("group_mean",))
    with pytest.raises(TypeError, match="baselines"):
        blockwise(r, o, baselines="ocb")
    with pytest.raises(ValueError, match="valid"):
        blockwise(r, o, np.ones((2, 3, 2), bool), baselines=("ocb", "ocb"))
    with pytest.raises(TypeError, match="valid"):
        blockwise(r, o, np.ones((2, 3), np.int32), baselines=("ocb", "ocb"))
    with pytest.raises(ValueError, match="ocb_kappa"):
        blockwise(r, o, baselines=("ocb_shrink", "ocb"), ocb_kappa=-1.0)
    with pytest.raises(TypeError, match="std_normalize"):
        blockwise(r, o, baselines=("ocb", "ocb"), std_normalize="yes")


# ------------------------------------------------------------------------------------------
# Token-level helpers
# ------------------------------------------------------------------------------------------


def _random_block_ids(seed, N=6, T=11, K=3):
    rng = np.random.default_rng(seed)
    ids = np.full((N, T), -1, np.int32)
    for n in range(N):  # prompt (-1), then K contiguous blocks of random length (some empty), pad
        t = int(rng.integers(0, 3))
        for k in range(K):
            length = int(rng.integers(0, 4))
            ids[n, t : t + length] = k
            t += length
    ids[0] = -1  # a row in no block (padding)
    ids[1, :] = 1  # a row with only block 1: blocks 0 and 2 are empty
    return ids


def test_token_advantages_match_loop_reference():
    ids = _random_block_ids(0)
    N, T = ids.shape
    adv = np.random.default_rng(1).normal(size=(N, 3)).astype(np.float32)
    got = np.asarray(token_advantages(adv, ids))
    want = np.zeros((N, T))
    for n in range(N):
        for t in range(T):
            if ids[n, t] >= 0:
                want[n, t] = adv[n, ids[n, t]]
    np.testing.assert_array_equal(got, want.astype(np.float32))
    # sequence-level advantages with a bool mask or block ids
    seq = adv[:, 0]
    mask = ids >= 0
    np.testing.assert_array_equal(token_advantages(seq, mask), np.where(mask, seq[:, None], 0))
    np.testing.assert_array_equal(token_advantages(seq, ids), np.where(mask, seq[:, None], 0))
    # ids outside 0..K-1 belong to no block
    odd = ids.copy()
    odd[2, 0] = 3
    odd[3, 0] = -5
    out = np.asarray(token_advantages(adv, odd))
    assert out[2, 0] == 0 and out[3, 0] == 0


def test_block_token_weights_match_loop_reference_and_block_mean():
    ids = _random_block_ids(2)
    N, T = ids.shape
    K = 3
    bw = np.array([1.0, 0.5, 2.0], np.float32)
    w = np.asarray(block_token_weights(ids, K, block_weights=bw))
    loss = np.random.default_rng(3).normal(size=(N, T)).astype(np.float32)
    for n in range(N):
        per_block = 0.0
        for k in range(K):
            toks = [t for t in range(T) if ids[n, t] == k]
            for t in toks:
                assert w[n, t] == np.float32(bw[k] / len(toks))
            if toks:  # an empty block contributes nothing
                per_block += bw[k] * np.mean([loss[n, t] for t in toks])
        np.testing.assert_allclose((w[n] * loss[n]).sum(), per_block, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(
            w[n].sum(), sum(bw[k] for k in range(K) if (ids[n] == k).any()), rtol=RTOL
        )
    assert np.all(w[ids < 0] == 0) and np.all(w[0] == 0) and np.all(np.isfinite(w))
    unweighted = np.asarray(block_token_weights(ids, K))
    np.testing.assert_allclose(unweighted[1], 1.0 / T)


def test_token_helpers_jit_and_vmap():
    ids = np.stack([_random_block_ids(s) for s in range(3)])
    adv = np.random.default_rng(4).normal(size=(3, ids.shape[1], 3)).astype(np.float32)
    f = jax.jit(jax.vmap(token_advantages))
    g = jax.jit(jax.vmap(functools.partial(block_token_weights, num_blocks=3)))
    for i in range(3):
        np.testing.assert_array_equal(f(adv, ids)[i], token_advantages(adv[i], ids[i]))
        np.testing.assert_array_equal(g(ids)[i], block_token_weights(ids[i], 3))


def test_bae_pipeline_end_to_end():
    """Block advantages -> [N, K] -> per-token advantages and weights for the loss."""
    rewards, outcomes = _bae_example([1, 1, 0, 0], [0.9, 0.6, 0.2, 0.7])
    a = flatten_groups(bw(rewards, outcomes, baselines=("group_mean", "ocb")))  # [4, 2]
    ids = np.array(
        [
            [-1, 0, 0, 0, 1, 1, -1],
            [-1, 0, 1, 1, 1, -1, -1],
            [-1, 0, 0, 0, 0, -1, -1],
            [-1, 0, 0, 1, -1, -1, -1],
        ],
        np.int32,
    )
    tok = np.asarray(token_advantages(a, ids))
    np.testing.assert_allclose(tok[0], [0, 0.5, 0.5, 0.5, 0.075, 0.075, 0], atol=ATOL)
    np.testing.assert_allclose(tok[2], [0, -0.5, -0.5, -0.5, -0.5, 0, 0], atol=ATOL)
    w = np.asarray(block_token_weights(ids, 2))
    np.testing.assert_allclose(w[1], [0, 1, 1 / 3, 1 / 3, 1 / 3, 0, 0], atol=1e-7)
    np.testing.assert_allclose(w[2], [0, 0.25, 0.25, 0.25, 0.25, 0, 0])  # truncated: no block 1


def test_flatten_groups():
    x = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    f = np.asarray(flatten_groups(x))
    assert f.shape == (6, 4)
    for p, g in itertools.product(range(2), range(3)):
        np.testing.assert_array_equal(f[p * 3 + g], x[p, g])
    assert flatten_groups(np.zeros((2, 3))).shape == (6,)
    with pytest.raises(ValueError, match="x"):
        flatten_groups(np.zeros((4,)))


def test_token_helper_errors_name_the_argument():
    ids = np.zeros((2, 5), np.int32)
    with pytest.raises(TypeError, match="block_ids"):
        block_token_weights(ids.astype(np.float32), 2)
    with pytest.raises(ValueError, match="block_ids"):
        block_token_weights(ids[0], 2)
    with pytest.raises(ValueError, match="num_blocks"):
        block_token_weights(ids, 0)
    with pytest.raises(TypeError, match="num_blocks"):
        block_token_weights(ids, 2.0)
    with pytest.raises(ValueError, match="block_weights"):
        block_token_weights(ids, 2, block_weights=np.ones(3, np.float32))
    with pytest.raises(TypeError, match="block_ids_or_mask"):
        token_advantages(np.zeros((2, 2), np.float32), ids.astype(bool))
    with pytest.raises(ValueError, match="block_ids_or_mask"):
        token_advantages(np.zeros((3, 2), np.float32), ids)
    with pytest.raises(ValueError, match="block_ids_or_mask"):
        token_advantages(np.zeros((3,), np.float32), ids)
    with pytest.raises(TypeError, match="block_ids_or_mask"):
        token_advantages(np.zeros((2,), np.float32), ids.astype(np.float32))
    with pytest.raises(TypeError, match="advantages"):
        token_advantages(np.zeros((2,), np.int32), ids)
    with pytest.raises(ValueError, match="advantages"):
        token_advantages(np.zeros((2, 2, 2), np.float32), ids)


def test_masked_all_equal():
    x = np.array([[0.1, 0.1, 7.0], [1.0, 2.0, 3.0], [np.nan, 1.0, 1.0]], np.float32)
    m = np.array([[True, True, False], [False, False, False], [True, True, True]])
    np.testing.assert_array_equal(masked_all_equal(x, m, axis=1), [True, True, False])
    np.testing.assert_array_equal(masked_all_equal(x, np.ones_like(m), axis=1), [False] * 3)


# ----------------------------------------------------------------------------------------------
# Edges: NaN rewards (documented propagation), traced hyper-parameters
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("baseline,scale", [("mean", "group"), ("mean", "none"),
                                            ("leave_one_out", "group"), ("mean", "batch")])
def test_nan_reward_makes_exactly_its_group_nan(baseline, scale):
    rng = np.random.default_rng(40)
    r = rng.normal(size=(4, 5)).astype(np.float32)
    clean = np.asarray(gr(r, baseline=baseline, scale=scale))
    r[2, 1] = np.nan
    out = np.asarray(gr(r, baseline=baseline, scale=scale))
    if scale == "batch":
        assert np.isnan(out).all()
        return
    assert np.isnan(out[2]).all()
    np.testing.assert_array_equal(out[[0, 1, 3]], clean[[0, 1, 3]])
    valid = ~np.isnan(r)  # the documented remedy: mark it invalid
    fixed = np.asarray(gr(r, valid, baseline=baseline, scale=scale))
    assert np.isfinite(fixed).all() and fixed[2, 1] == 0


def test_blockwise_nan_reward_reaches_only_the_sets_that_average_over_it():
    rng = np.random.default_rng(41)
    r = rng.normal(size=(3, 6, 3)).astype(np.float32)
    o = rng.integers(0, 2, size=(3, 6, 3)).astype(np.int32)
    o[1, :, 1] = [0, 0, 0, 1, 1, 1]
    r[1, 4, :] = np.nan  # sample (1, 4), stratum {3, 4, 5} in block 1
    out = np.asarray(bw(r, o, baselines=("group_mean", "ocb", "none")))
    assert np.isnan(out[1, :, 0]).all() and np.isfinite(out[[0, 2], :, 0]).all()
    assert np.isnan(out[1, 3:, 1]).all() and np.isfinite(out[1, :3, 1]).all()
    assert np.isfinite(out[[0, 2], :, 1]).all()
    nan_at = np.isnan(out[..., 2])
    assert nan_at[1, 4] and nan_at.sum() == 1
    # std_normalize: "none" divides by the batch RMS, which the NaN reaches (never a zero RMS).
    normed = np.asarray(bw(r, o, baselines=("group_mean", "ocb", "none"), std_normalize=True))
    assert np.isnan(normed[..., 2]).all()
    assert np.isnan(normed[1, :, 0]).all() and np.isfinite(normed[[0, 2], :, 0]).all()


def test_traced_eps_and_ocb_kappa_give_the_static_result_and_traced_ddof_fails_with_a_sentence():
    rng = np.random.default_rng(42)
    r = rng.normal(size=(3, 4)).astype(np.float32)
    want = group_relative(r, eps=0.5)
    got = jax.jit(lambda e: group_relative(r, eps=e))(jnp.float32(0.5))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=RTOL, atol=ATOL)
    rb = rng.normal(size=(3, 6, 2)).astype(np.float32)
    ob = rng.integers(0, 2, size=(3, 6, 2)).astype(np.int32)
    kw = dict(baselines=("group_mean", "ocb_shrink"), std_normalize=True)
    want = blockwise(rb, ob, ocb_kappa=2.5, eps=0.1, **kw)
    got = jax.jit(lambda k, e: blockwise(rb, ob, ocb_kappa=k, eps=e, **kw))(
        jnp.float32(2.5), jnp.float32(0.1))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=RTOL, atol=ATOL)
    with pytest.raises(TypeError, match="std_ddof must be a static Python int"):
        jax.jit(lambda d: group_relative(r, std_ddof=d))(jnp.int32(1))
