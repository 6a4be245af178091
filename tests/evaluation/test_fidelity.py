"""The fidelity study's NumPy part against a loop reference, a worked example and the core."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxgrpo.core import advantages as core_adv
from jaxgrpo.evaluation import fidelity


def _loop_baselines(r, o, v, kappa):
    p_, g_ = r.shape
    vals = [r[p, g] for p in range(p_) for g in range(g_) if v[p, g]]
    batch = sum(vals) / len(vals)
    out = {k: np.zeros((p_, g_)) for k in fidelity.BASELINES}
    for p in range(p_):
        grp = [g for g in range(g_) if v[p, g]]
        gm = sum(r[p, g] for g in grp) / len(grp) if grp else 0.0
        for g in grp:
            st = [j for j in grp if o[p, j] == o[p, g]]
            mu_s = sum(r[p, j] for j in st) / len(st)
            others = [j for j in st if j != g]
            loo = sum(r[p, j] for j in others) / len(others) if others else r[p, g]
            lam = len(st) / (len(st) + kappa)
            out["none"][p, g] = 0.0
            out["batch_mean"][p, g] = batch
            out["group_mean"][p, g] = gm
            out["ocb"][p, g] = mu_s
            out["ocb_loo"][p, g] = loo
            out["ocb_shrink"][p, g] = lam * mu_s + (1 - lam) * gm
    return out


def _random_case(seed, p=5, g=6):
    rng = np.random.default_rng(seed)
    o = rng.integers(0, 2, (p, g))
    q = rng.random((p, g))
    r = -((q - o) ** 2)
    v = rng.random((p, g)) > 0.2
    mc = r + rng.normal(0, 0.1, (p, g))
    return r, o, v, mc


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kappa", [0.0, 1.0, 3.5])
def test_baselines_match_loop_reference(seed, kappa):
    r, o, v, _ = _random_case(seed)
    got = fidelity.proxy_baselines(r, o, v, kappa=kappa)
    ref = _loop_baselines(r, o, v, kappa)
    for k in fidelity.BASELINES:
        np.testing.assert_allclose(got[k], ref[k], atol=1e-12, err_msg=k)


@pytest.mark.parametrize("seed", [0, 3])
def test_advantages_agree_with_core_blockwise(seed):
    """r - b here is the advantage the trainer uses (jaxgrpo.core.advantages.blockwise)."""
    r, o, v, _ = _random_case(seed)
    base = fidelity.proxy_baselines(r, o, v, kappa=core_adv.DEFAULT_OCB_KAPPA)
    for name in fidelity.BASELINES:
        rew = jnp.asarray(np.stack([np.zeros_like(r), r], -1), jnp.float32)
        outc = jnp.asarray(np.stack([np.zeros_like(o), o], -1), jnp.int32)
        adv = core_adv.blockwise(rew, outc, jnp.asarray(v), baselines=("group_mean", name))
        np.testing.assert_allclose(np.asarray(adv)[..., 1], np.where(v, r - base[name], 0),
                                   atol=1e-5, err_msg=name)


def test_table_matches_loop_reference():
    r, o, v, mc = _random_case(7)
    var = np.random.default_rng(8).random(r.shape) * 0.05
    t = fidelity.fidelity_table(r, o, mc, v, mc_var=var, num_mc=8)
    ref = _loop_baselines(r, o, v, 1.0)
    for name, val in fidelity.STRATA:
        idx = [(p, g) for p in range(r.shape[0]) for g in range(r.shape[1])
               if v[p, g] and (val is None or o[p, g] == val)]
        assert t[name]["n"] == len(idx)
        assert t[name]["mc_noise"] == pytest.approx(
            math.sqrt(sum(var[i] / 8 for i in idx) / len(idx)), rel=1e-12)
        for b in fidelity.BASELINES:
            a_mc = [r[i] - mc[i] for i in idx]
            a_b = [r[i] - ref[b][i] for i in idx]
            err = [x - y for x, y in zip(a_b, a_mc, strict=True)]
            assert t[name][b]["rmse"] == pytest.approx(
                math.sqrt(sum(e * e for e in err) / len(err)), rel=1e-10, abs=1e-12)
            assert t[name][b]["bias"] == pytest.approx(sum(err) / len(err), rel=1e-10, abs=1e-12)


def test_worked_example():
    """One prompt, G = 4 (a worked example), hand-picked MC values."""
    c = np.array([[1, 1, 0, 0]])
    r = np.array([[-0.01, -0.16, -0.04, -0.49]])
    mc = np.array([[-0.05, -0.10, -0.20, -0.30]])
    t = fidelity.fidelity_table(r, c, mc)
    # OCB: b = [-0.085, -0.085, -0.265, -0.265]; errors v - b = [.035, -.015, .065, -.035]
    assert t["correct"]["ocb"]["rmse"] == pytest.approx(math.sqrt(0.000725))
    assert t["incorrect"]["ocb"]["rmse"] == pytest.approx(math.sqrt((0.065**2 + 0.035**2) / 2))
    assert t["correct"]["ocb"]["bias"] == pytest.approx(0.01)
    # group mean: b = -0.175; errors [.125, .075, -.025, -.125]
    assert t["correct"]["group_mean"]["rmse"] == pytest.approx(math.sqrt(0.010625))
    assert t["incorrect"]["group_mean"]["bias"] == pytest.approx(-0.075)
    # none: b = 0, the error is the MC value itself
    assert t["correct"]["none"]["rmse"] == pytest.approx(math.sqrt(0.00625))
    assert t["incorrect"]["none"]["rmse"] == pytest.approx(math.sqrt(0.065))
    # one prompt: the batch mean is the group mean
    assert t["all"]["batch_mean"] == t["all"]["group_mean"]
    # when MC values equal the stratum means exactly, OCB is exact
    exact = fidelity.fidelity_table(r, c, np.array([[-0.085, -0.085, -0.265, -0.265]]))
    assert exact["all"]["ocb"]["rmse"] == pytest.approx(0.0, abs=1e-15)
    assert exact["all"]["group_mean"]["rmse"] > 0.05


def test_empty_stratum_is_nan_and_table_formats():
    t = fidelity.fidelity_table(np.array([[-0.1, -0.2]]), np.array([[1, 1]]),
                                np.array([[-0.1, -0.2]]))
    assert t["incorrect"]["n"] == 0 and math.isnan(t["incorrect"]["ocb"]["rmse"])
    text = fidelity.format_table(t)
    assert "| ocb |" in text and "correct (n=2)" in text


def test_bad_input():
    r = np.zeros((2, 3))
    with pytest.raises(ValueError, match="outcomes must have the shape"):
        fidelity.proxy_baselines(r, np.zeros((2, 2)))
    with pytest.raises(ValueError, match="rewards must have 2 dimensions"):
        fidelity.proxy_baselines(np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="kappa"):
        fidelity.proxy_baselines(r, r, kappa=-1.0)
    with pytest.raises(ValueError, match="mc_values must have the shape"):
        fidelity.fidelity_table(r, r, np.zeros((3, 2)))
    with pytest.raises(ValueError, match="num_mc"):
        fidelity.fidelity_table(r, r, r, mc_var=r, num_mc=1)
    with pytest.raises(ValueError, match="rewards must be finite"):
        fidelity.proxy_baselines(np.full((1, 2), np.nan), np.zeros((1, 2)))
