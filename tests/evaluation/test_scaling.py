"""Test-time scaling rules vs brute-force references."""

import itertools
import math
from collections import Counter

import numpy as np
import pytest

from jaxgrpo.evaluation import scaling as S


def ref_pass_at_k(n, c, k):
    # Brute force: the fraction of size-k subsets of n samples that contain a correct one.
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in sub) for sub in subsets) / len(subsets)


def test_pass_at_k_matches_subset_enumeration():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert S.pass_at_k(n, c, k) == pytest.approx(ref_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_batched_and_large_n():
    got = S.pass_at_k(np.array([16, 16, 16]), np.array([0, 4, 16]), 4)
    want = [0.0, 1 - math.comb(12, 4) / math.comb(16, 4), 1.0]
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert S.pass_at_k(1000, 1, 1) == pytest.approx(1e-3)
    assert S.pass_at_k(1000, 3, 500) == pytest.approx(1 - math.comb(997, 500) / math.comb(1000, 500))


def test_pass_at_k_rejects_bad_input():
    with pytest.raises(ValueError, match="k must"):
        S.pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="num_correct"):
        S.pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="num_samples"):
        S.pass_at_k(0, 0, 1)
    with pytest.raises(TypeError, match="k"):
        S.pass_at_k(4, 1, 1.5)


# ------------------------------------------------------------------------------------------
# one prompt


def _pick(rule, answers, *args, **kw):
    """The answer a rule chooses (None for -1), through its returned sample index."""
    i = rule(answers, *args, **kw)
    assert -1 <= i < len(answers)
    return None if i < 0 else answers[i]


def majority_vote(answers, **kw):
    return _pick(S.majority_vote_index, answers, **kw)


def max_confidence(answers, q, **kw):
    return _pick(S.max_confidence_index, answers, q, **kw)


def confidence_weighted_majority(answers, q, **kw):
    return _pick(S.confidence_weighted_majority_index, answers, q, **kw)


def ref_majority(answers):
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    top = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == top)


def ref_weighted(answers, q):
    w = {}
    for a, x in zip(answers, q, strict=True):
        if a is not None:
            w[a] = w.get(a, 0.0) + x
    if not w:
        return None
    top = max(w.values())
    return next(a for a in answers if a is not None and w[a] == top)


def ref_maxconf(answers, q):
    best, best_q = None, -1.0
    for a, x in zip(answers, q, strict=True):
        if a is not None and x > best_q:
            best, best_q = a, x
    return best


def test_rules_on_hand_examples():
    answers = ["12", "7", "7", None, "12", "3"]
    q = [0.9, 0.2, 0.3, 1.0, 0.1, 0.95]
    assert majority_vote(answers) == "12"  # 12 and 7 tie at 2: first occurrence wins
    assert max_confidence(answers, q) == "3"  # the None answer's 1.0 is ignored
    assert confidence_weighted_majority(answers, q) == "12"  # 1.0 vs 0.5 vs 0.95
    assert majority_vote([None, None]) is None
    assert max_confidence([None], [0.5]) is None
    assert confidence_weighted_majority([], []) is None
    # weighting overturns the plain majority
    assert majority_vote(["a", "b", "b"]) == "b"
    assert confidence_weighted_majority(["a", "b", "b"], [0.9, 0.3, 0.5]) == "a"
    # max-conf ties -> earliest sample
    assert max_confidence(["x", "y", "z"], [0.4, 0.8, 0.8]) == "y"


def test_key_groups_equivalent_answers_and_returns_first_original():
    answers = ["2", " 1/2", "0.5", "2", "1/2"]
    key = lambda a: {"1/2": "0.5"}.get(a.strip(), a.strip())
    assert majority_vote(answers, key=key) == " 1/2"  # group {1/2, 0.5} has 3 votes
    assert S.majority_vote_index(answers, key=key) == 1  # the group's first sample
    assert majority_vote(answers) == "2"  # without key the strings differ
    # max-conf returns the first original of the winning sample's group
    assert max_confidence(answers, [0.1, 0.2, 0.9, 0.3, 0.1], key=key) == " 1/2"
    assert max_confidence(answers, [0.1, 0.2, 0.9, 0.3, 0.1]) == "0.5"
    assert confidence_weighted_majority(answers, [0.5, 0.1, 0.1, 0.5, 0.1], key=key) == "2"
    assert confidence_weighted_majority(answers, [0.1, 0.2, 0.2, 0.1, 0.1], key=key) == " 1/2"


def test_rules_match_references_on_random_prompts():
    rng = np.random.default_rng(0)
    pool = ["a", "b", "c", "d", None]
    for _ in range(200):
        n = int(rng.integers(1, 9))
        answers = [pool[i] for i in rng.integers(0, 5, size=n)]
        q = list(np.round(rng.uniform(size=n), 1))  # rounded: ties happen
        assert majority_vote(answers) == ref_majority(answers)
        assert max_confidence(answers, q) == ref_maxconf(answers, q)
        assert confidence_weighted_majority(answers, q) == ref_weighted(answers, q)


def test_one_prompt_validation():
    with pytest.raises(TypeError, match="answers"):
        majority_vote("abc")
    with pytest.raises(TypeError, match="answers"):
        majority_vote(["a", 3])
    with pytest.raises(ValueError, match="confidences"):
        max_confidence(["a", "b"], [0.5])
    with pytest.raises(ValueError, match="confidences"):
        confidence_weighted_majority(["a"], [1.5])


# ------------------------------------------------------------------------------------------
# batched curves


def test_scaling_curves_prefix_mode_matches_reference():
    rng = np.random.default_rng(1)
    pool = ["1", "2", "3", None]
    answers, conf, correct = [], [], []
    for _ in range(12):
        a = [pool[i] for i in rng.integers(0, 4, size=8)]
        answers.append(a)
        conf.append(list(rng.uniform(size=8)))
        correct.append({"1": True, "2": False, "3": False})
    ks = [1, 2, 4, 8]
    got = S.scaling_curves(answers, conf, correct, ks)
    for j, k in enumerate(ks):
        ok = lambda ans, m: ans is not None and m.get(ans, False)
        maj = np.mean([ok(ref_majority(a[:k]), m) for a, m in zip(answers, correct, strict=True)])
        mc = np.mean([ok(ref_maxconf(a[:k], q[:k]), m)
                      for a, q, m in zip(answers, conf, correct, strict=True)])
        wm = np.mean([ok(ref_weighted(a[:k], q[:k]), m)
                      for a, q, m in zip(answers, conf, correct, strict=True)])
        p1 = np.mean([np.mean([ok(x, m) for x in a]) for a, m in zip(answers, correct,
                                                                     strict=True)])
        pk = np.mean([ref_pass_at_k(8, sum(ok(x, m) for x in a), k)
                      for a, m in zip(answers, correct, strict=True)])
        assert got["majority"][j] == pytest.approx(maj)
        assert got["max_conf"][j] == pytest.approx(mc)
        assert got["weighted_majority"][j] == pytest.approx(wm)
        assert got["pass@1"][j] == pytest.approx(p1)
        assert got["pass@k"][j] == pytest.approx(pk)
    assert np.all(np.diff(got["pass@k"]) >= 0)
    # A rule cannot beat the oracle on the same k samples (any correct among the first k).
    for j, k in enumerate(ks):
        oracle = np.mean([any(x is not None and m.get(x, False) for x in a[:k])
                          for a, m in zip(answers, correct, strict=True)])
        for name in ("majority", "max_conf", "weighted_majority"):
            assert got[name][j] <= oracle + 1e-12


def test_scaling_curves_per_sample_flags_and_random_draws():
    answers = [["a", "b", "b", "c"]]
    conf = [[0.9, 0.1, 0.1, 0.2]]
    flags = [[True, False, False, False]]
    got = S.scaling_curves(answers, conf, flags, [1, 4])
    assert got["majority"].tolist() == [1.0, 0.0]
    assert got["weighted_majority"].tolist() == [1.0, 1.0]
    # Random size-k draws: with k = n every draw is the full set, so it equals prefix mode.
    full = S.scaling_curves(answers, conf, flags, [4], num_draws=5, seed=2)
    assert full["majority"].tolist() == [0.0]
    # k = 1 draws: the majority pick is the drawn sample itself -> accuracy ~ 1/4.
    one = S.scaling_curves(answers, conf, flags, [1], num_draws=4000, seed=3)
    assert abs(one["majority"][0] - 0.25) < 0.03
    with pytest.raises(ValueError, match="ks"):
        S.scaling_curves(answers, conf, flags, [5])
    with pytest.raises(ValueError, match="correct"):
        S.scaling_curves(answers, conf, [[True, False]], [1])
    with pytest.raises(ValueError, match="one entry per prompt"):
        S.scaling_curves(answers, conf, [], [1])
