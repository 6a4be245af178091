"""Test-time scaling over ``n`` sampled answers per prompt (BAE, arXiv 2602.10231 §5.3, App. G).

One prompt's samples are ``answers`` (strings; ``None`` for an unparsable answer, which never
wins a vote and counts as wrong) with stated ``confidences`` in ``[0, 1]``. Answers are grouped
by ``key(answer)`` (default: the string itself; pass a canonicaliser such as a math-verify
normaliser to group equivalent answers). Every rule returns the index of the *first-occurring*
sample of its winning group (``answers[i]`` is the chosen answer), or -1 if no sample has an
answer. Ties are broken by first occurrence.

* Majority vote: the most frequent group.
* MaxConf: the answer of the sample with the largest confidence.
* WeightedMaj: ``argmax_a sum_i q_i 1{a_i = a}`` (BAE §5.3; RLCR's confidence-weighted vote).
* pass@k: the unbiased estimator ``1 - C(n - c, k) / C(n, k)`` from ``n`` samples with ``c``
  correct (Chen et al. 2021).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence

import numpy as np

from jaxgrpo.evaluation.calibration import _confidence

Answer = str | None
Key = Callable[[str], Hashable]


def pass_at_k(num_samples, num_correct, k):
    """Unbiased pass@k: ``1 - C(n - c, k) / C(n, k)``, computed as ``1 - prod_{i=n-c+1}^{n}
    (1 - k / i)`` (no large binomials). Broadcasts over array inputs.

    Args:
      num_samples: ``n`` (int or int array), >= 1.
      num_correct: ``c`` with ``0 <= c <= n``.
      k: budget with ``1 <= k <= n``.

    Returns:
      A float for scalar inputs, else a float array.
    """
    n, c, kk = (np.asarray(v) for v in (num_samples, num_correct, k))
    for name, v in (("num_samples", n), ("num_correct", c), ("k", kk)):
        if not (np.issubdtype(v.dtype, np.integer)
                or (np.issubdtype(v.dtype, np.floating) and np.all(v == np.round(v)))):
            raise TypeError(f"{name} must be integer-valued; got {v}")
    n, c, kk = np.broadcast_arrays(n.astype(np.int64), c.astype(np.int64), kk.astype(np.int64))
    if np.any(n < 1):
        raise ValueError("num_samples must be >= 1")
    if np.any((c < 0) | (c > n)):
        raise ValueError("num_correct must satisfy 0 <= num_correct <= num_samples")
    if np.any((kk < 1) | (kk > n)):
        raise ValueError("k must satisfy 1 <= k <= num_samples")
    out = np.empty(n.shape, np.float64)
    for idx in np.ndindex(n.shape):
        ni, ci, ki = int(n[idx]), int(c[idx]), int(kk[idx])
        if ni - ci < ki:  # every size-k subset contains a correct sample
            out[idx] = 1.0
        else:
            i = np.arange(ni - ci + 1, ni + 1, dtype=np.float64)
            out[idx] = 1.0 - float(np.prod(1.0 - ki / i))
    return float(out) if out.ndim == 0 else out


def _answers(answers) -> list[Answer]:
    if isinstance(answers, str):
        raise TypeError("answers must be a sequence of strings (or None), not one string")
    out = list(answers)
    for i, a in enumerate(out):
        if a is not None and not isinstance(a, str):
            raise TypeError(f"answers[{i}] must be a str or None; got {type(a).__name__}")
    return out


def _weights(answers: list[Answer], confidences) -> np.ndarray:
    q = _confidence(confidences, clip=False, name="confidences") if len(answers) else np.zeros(0)
    if q.shape[0] != len(answers):
        raise ValueError(
            f"confidences must have one value per answer ({len(answers)}); got {q.shape[0]}"
        )
    return q


def _groups(answers: list[Answer], key: Key | None) -> dict[Hashable, list[int]]:
    """Sample indices of each answer group, in order of first occurrence; None answers skipped."""
    groups: dict[Hashable, list[int]] = {}
    for i, a in enumerate(answers):
        if a is not None:
            groups.setdefault(a if key is None else key(a), []).append(i)
    return groups


def _best_group(groups: dict[Hashable, list[int]], score: Callable[[list[int]], float]) -> int:
    """Representative (first) sample of the highest-scoring group; -1 if none. First wins ties."""
    best, best_score = -1, -math.inf
    for members in groups.values():  # dicts keep first-occurrence order
        s = score(members)
        if s > best_score:
            best, best_score = members[0], s
    return best


def majority_vote_index(answers: Sequence[Answer], *, key: Key | None = None) -> int:
    """Majority vote: the first sample of the most frequent answer group (-1 for none)."""
    return _best_group(_groups(_answers(answers), key), len)


def max_confidence_index(answers, confidences, *, key: Key | None = None) -> int:
    """MaxConf: the first sample of the group of the answer stated with the highest confidence
    (the earliest such sample wins ties; -1 for none)."""
    a = _answers(answers)
    q = _weights(a, confidences)
    best = -1
    for i, ans in enumerate(a):  # earliest sample with the largest confidence
        if ans is not None and (best < 0 or q[i] > q[best]):
            best = i
    if best < 0:
        return -1
    k = a[best] if key is None else key(a[best])
    return _groups(a, key)[k][0]  # its group's first occurrence


def confidence_weighted_majority_index(answers, confidences, *, key: Key | None = None) -> int:
    """WeightedMaj: the first sample of ``argmax_a sum_i q_i 1{key(a_i) = key(a)}`` (-1 for
    none)."""
    a = _answers(answers)
    q = _weights(a, confidences)
    return _best_group(_groups(a, key), lambda members: math.fsum(q[i] for i in members))


def _sample_correct(answers: list[Answer], correct, p: int) -> np.ndarray:
    """Per-sample correctness from a Mapping answer -> bool or a per-sample sequence."""
    if isinstance(correct, Mapping):
        return np.array([a is not None and bool(correct.get(a, False)) for a in answers])
    c = np.asarray(correct)
    if c.shape != (len(answers),):
        raise ValueError(
            f"correct[{p}] must map answers to bools or give one flag per sample "
            f"({len(answers)}); got shape {c.shape}"
        )
    if not (c.dtype == np.bool_ or np.all((c == 0) | (c == 1))):
        raise ValueError(f"correct[{p}] must hold booleans or 0/1")
    return c.astype(bool) & np.array([a is not None for a in answers])


METHODS = ("pass@1", "pass@k", "majority", "max_conf", "weighted_majority")


def scaling_curves(
    answers: Sequence[Sequence[Answer]],
    confidences: Sequence[Sequence[float]],
    correct: Sequence[Mapping[str, bool] | Sequence[bool]],
    ks: Sequence[int],
    *,
    key: Key | None = None,
    num_draws: int = 0,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Accuracy vs sampling budget ``k``, averaged over prompts, for every rule.

    Args:
      answers: per prompt, its ``n`` sampled answers (``n`` may differ between prompts).
      confidences: per prompt, the ``n`` stated confidences in ``[0, 1]``.
      correct: per prompt, either a mapping from each distinct answer string to its correctness
        or one flag per sample. A ``None`` answer is always wrong.
      ks: budgets, each ``1 <= k <= n`` for every prompt.
      key: answer canonicaliser for grouping (see the module docstring).
      num_draws: 0 uses the first ``k`` samples of each prompt for the voting rules; ``> 0``
        averages each rule over that many random size-``k`` subsets (without replacement).
      seed: seed for those subsets.

    Returns:
      ``{method: array [len(ks)]}`` for ``METHODS``: ``pass@1`` (mean sample accuracy over all
      ``n``, flat in ``k``), ``pass@k`` (unbiased estimator over all ``n``), ``majority``,
      ``max_conf`` and ``weighted_majority`` (accuracy of the chosen answer).
    """
    if not (len(answers) == len(confidences) == len(correct)) or len(answers) == 0:
        raise ValueError("answers, confidences and correct must be non-empty, one entry per prompt")
    ks = [int(k) for k in ks]
    if not ks:
        raise ValueError("ks must list at least one budget")
    if isinstance(num_draws, bool) or not isinstance(num_draws, int) or num_draws < 0:
        raise ValueError(f"num_draws must be an int >= 0; got {num_draws!r}")
    rng = np.random.default_rng(seed)
    rules = {
        "majority": lambda a, q: majority_vote_index(a, key=key),
        "max_conf": lambda a, q: max_confidence_index(a, q, key=key),
        "weighted_majority": lambda a, q: confidence_weighted_majority_index(a, q, key=key),
    }
    out = {m: np.zeros(len(ks)) for m in METHODS}
    for p, (ans_p, conf_p, corr_p) in enumerate(zip(answers, confidences, correct, strict=True)):
        a = _answers(ans_p)
        q = _weights(a, conf_p)
        ok = _sample_correct(a, corr_p, p)
        n = len(a)
        for j, k in enumerate(ks):
            if not 1 <= k <= n:
                raise ValueError(f"ks must satisfy 1 <= k <= n; prompt {p} has n={n}, k={k}")
            out["pass@1"][j] += ok.mean()
            out["pass@k"][j] += pass_at_k(n, int(ok.sum()), k)
            subsets = ([np.arange(k)] if num_draws == 0
                       else [np.sort(rng.choice(n, size=k, replace=False))
                             for _ in range(num_draws)])
            for name, rule in rules.items():
                hits = 0.0
                for sub in subsets:
                    i = rule([a[s] for s in sub], q[sub])
                    hits += float(i >= 0 and ok[sub[i]])
                out[name][j] += hits / len(subsets)
    return {m: v / len(answers) for m, v in out.items()}
