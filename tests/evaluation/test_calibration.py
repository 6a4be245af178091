"""Calibration metrics vs loop references written independently of the implementation."""

import math

import numpy as np
import pytest

from jaxgrpo.evaluation import calibration as C

# ------------------------------------------------------------------------------------------
# references: explicit per-bin loops and pairwise AUROC


def ref_bin_paper11(q):
    # Bins [k/10, (k+1)/10) for k = 0..10, compared against exact decimal literals.
    lowers = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    b = 0
    for k, lo in enumerate(lowers):
        if q >= lo:
            b = k
    return b


def ref_bin_rlcr10(q):
    # RLCR's code: edges = linspace(0, 1, 11) with the outer edges replaced by -inf/+inf.
    edges = [-math.inf] + list(np.linspace(0, 1, 11)[1:-1]) + [math.inf]
    for b in range(10):
        if edges[b] <= q < edges[b + 1]:
            return b
    raise AssertionError(q)


def ref_ece(q, c, binner, nbins):
    total = 0.0
    for b in range(nbins):
        members = [i for i in range(len(q)) if binner(q[i]) == b]
        if not members:
            continue
        acc = sum(c[i] for i in members) / len(members)
        conf = sum(q[i] for i in members) / len(members)
        total += len(members) / len(q) * abs(acc - conf)
    return total


def ref_auroc(q, c):
    pos = [q[i] for i in range(len(q)) if c[i]]
    neg = [q[i] for i in range(len(q)) if not c[i]]
    if not pos or not neg:
        return math.nan
    score = 0.0
    for a in pos:
        for b in neg:
            score += 1.0 if a > b else (0.5 if a == b else 0.0)
    return score / (len(pos) * len(neg))


def ref_brier(q, c):
    return sum((q[i] - c[i]) ** 2 for i in range(len(q))) / len(q)


def random_case(rng, n, rounded):
    q = rng.uniform(size=n)
    if rounded:  # confidences as models print them: many ties and exact bin edges
        q = np.round(q, 1)
    c = rng.uniform(size=n) < q
    return q, c


# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rounded", [False, True])
@pytest.mark.parametrize("n", [1, 7, 60])
def test_metrics_match_loop_references(n, rounded):
    rng = np.random.default_rng(n + 100 * rounded)
    for _ in range(5):
        q, c = random_case(rng, n, rounded)
        assert abs(C.ece(q, c) - ref_ece(q, c, ref_bin_paper11, 11)) < 1e-12
        assert abs(C.ece(q, c, binning="rlcr10") - ref_ece(q, c, ref_bin_rlcr10, 10)) < 1e-12
        assert abs(C.brier(q, c) - ref_brier(q, c)) < 1e-12
        got, want = C.auroc(q, c), ref_auroc(q, c)
        assert (math.isnan(got) and math.isnan(want)) or abs(got - want) < 1e-12


def test_bin_edges_and_q_equal_one():
    edges = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    np.testing.assert_array_equal(C.bin_index(edges), list(range(11)))
    # RLCR: 1.0 joins [0.9, inf); linspace's 0.3/0.6/0.7 edges sit just above the decimals.
    np.testing.assert_array_equal(C.bin_index(edges, binning="rlcr10"),
                                  [0, 1, 2, 2, 4, 5, 5, 6, 8, 9, 9])
    assert [ref_bin_rlcr10(e) for e in edges] == [0, 1, 2, 2, 4, 5, 5, 6, 8, 9, 9]
    # q = 1.0 alone in its paper bin: perfectly calibrated if correct.
    assert C.ece([1.0, 1.0], [1, 1]) == 0.0
    assert C.ece([1.0, 0.95], [1, 0]) == pytest.approx(0.5 * 0 + 0.5 * 0.95)
    # RLCR merges them into one bin: |0.5 - 0.975| with full weight.
    assert C.ece([1.0, 0.95], [1, 0], binning="rlcr10") == pytest.approx(0.475)


def test_empty_bins_and_hand_computed_ece():
    q = [0.05, 0.05, 0.55, 0.95]
    c = [0, 1, 1, 1]
    # bins 0, 5, 9 occupied: 2/4*|0.5-0.05| + 1/4*|1-0.55| + 1/4*|1-0.95|
    want = 0.5 * 0.45 + 0.25 * 0.45 + 0.25 * 0.05
    assert C.ece(q, c) == pytest.approx(want, abs=1e-15)
    count, acc, conf = C.calibration_bins(q, c)
    assert count.tolist() == [2, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0]
    assert np.isnan(acc[1]) and np.isnan(conf[10])
    assert acc[0] == 0.5 and conf[5] == 0.55


def test_auroc_ties_and_degenerate_classes():
    assert C.auroc([0.5, 0.5, 0.5, 0.5], [1, 0, 1, 0]) == 0.5  # all tied
    assert C.auroc([0.9, 0.8, 0.1], [1, 1, 0]) == 1.0
    assert C.auroc([0.1, 0.8, 0.9], [1, 1, 0]) == 0.0
    assert C.auroc([0.7, 0.7, 0.2], [1, 0, 0]) == pytest.approx(0.75)
    assert math.isnan(C.auroc([0.2, 0.9], [1, 1]))  # all correct: undefined -> NaN
    assert math.isnan(C.auroc([0.2, 0.9], [False, False]))  # all wrong


def test_all_correct_or_all_wrong_other_metrics():
    q = [0.2, 0.6, 1.0]
    assert C.brier(q, [1, 1, 1]) == pytest.approx((0.64 + 0.16 + 0.0) / 3)
    assert C.ece(q, [0, 0, 0]) == pytest.approx(sum(q) / 3)


def test_validation_names_the_argument():
    with pytest.raises(ValueError, match="confidence"):
        C.ece([0.2, 1.2], [0, 1])
    with pytest.raises(ValueError, match="confidence"):
        C.brier([0.2, float("nan")], [0, 1])
    with pytest.raises(ValueError, match="confidence"):
        C.auroc([], [])
    with pytest.raises(ValueError, match="correct"):
        C.ece([0.2, 0.3], [0, 2])
    with pytest.raises(ValueError, match="correct"):
        C.ece([0.2, 0.3], [0, 1, 1])
    with pytest.raises(TypeError, match="confidence"):
        C.ece(["0.2"], [1])
    with pytest.raises(ValueError, match="binning"):
        C.ece([0.2], [1], binning="fifteen")
    with pytest.raises(ValueError, match="confidence"):
        C.brier([-0.1, 0.5], [1, 0], clip=False)
    # clip=True clips finite values into [0, 1] but never hides NaN
    assert C.brier([-0.1, 1.5], [0, 1], clip=True) == 0.0
    with pytest.raises(ValueError, match="finite"):
        C.brier([float("inf")], [1], clip=True)


def ref_bootstrap(metric, q, c, n, seed):
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n):
        idx = rng.integers(0, len(q), size=len(q))
        v = metric(q[idx], c[idx])
        if np.isfinite(v):
            vals.append(v)
    mean = sum(vals) / len(vals)
    return math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))


def test_bootstrap_se_matches_reference_and_scales_like_binomial():
    rng = np.random.default_rng(11)
    q, c = random_case(rng, 40, rounded=True)
    for metric in (C.brier, C.auroc, C.ece):
        got = C.bootstrap_se(metric, q, c, n=200, seed=3)
        assert got == pytest.approx(ref_bootstrap(metric, q, c, 200, 3), rel=1e-12)
    # SE of a mean of 0/1 outcomes is close to sqrt(p(1-p)/N).
    big = np.random.default_rng(12).uniform(size=400) < 0.3
    se = C.bootstrap_se(lambda x: float(np.mean(x)), big.astype(float), n=1000, seed=0)
    p = big.mean()
    assert abs(se - math.sqrt(p * (1 - p) / 400)) < 0.1 * math.sqrt(p * (1 - p) / 400)


def test_bootstrap_se_degenerate_and_bad_input():
    # AUROC with one negative among 3: many resamples lack a class and are dropped.
    q, c = np.array([0.9, 0.8, 0.1]), np.array([1, 1, 0])
    se = C.bootstrap_se(C.auroc, q, c, n=50)
    assert se == pytest.approx(ref_bootstrap(C.auroc, q, c, 50, 0), rel=1e-12)
    assert math.isnan(C.bootstrap_se(C.auroc, np.array([0.9, 0.8]), np.array([1, 1]), n=20))
    with pytest.raises(ValueError, match="arrays"):
        C.bootstrap_se(C.brier, np.zeros(3), np.zeros(2))
    with pytest.raises(ValueError, match="n must"):
        C.bootstrap_se(C.brier, np.zeros(3), np.zeros(3), n=1)


def test_calibration_report_keys_and_values():
    rng = np.random.default_rng(13)
    q, c = random_case(rng, 50, rounded=False)
    rep = C.calibration_report(q, c, binning="rlcr10", n_bootstrap=50, seed=1)
    assert rep["accuracy"] == pytest.approx(c.mean())
    assert rep["ece"] == pytest.approx(ref_ece(q, c, ref_bin_rlcr10, 10))
    assert rep["auroc"] == pytest.approx(ref_auroc(q, c))
    for name in ("accuracy", "ece", "brier", "auroc"):
        assert rep[f"{name}_se"] > 0
    assert "ece_se" not in C.calibration_report(q, c, n_bootstrap=0)
