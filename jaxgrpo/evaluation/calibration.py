"""Calibration metrics over (confidence q, correctness c) pairs (the metrics of BAE, arXiv 2602.10231).

All metrics are global over the pairs given (as BAE computes them). Inputs are 1-D array-likes
of equal, non-zero length: ``confidence`` finite in ``[0, 1]`` (or pass ``clip=True`` to clip
finite values into the range; NaN/inf always raise) and ``correct`` boolean or 0/1.

ECE binnings (``BINNINGS``):

* ``"paper11"`` (BAE App. D): 11 fixed-width bins ``[0, .1), [.1, .2), ..., [.9, 1.0),
  [1.0, 1.1)``, so ``q = 1.0`` has its own bin. Edges are the exact decimals ``k / 10``, so a
  confidence printed as ``0.3`` falls in ``[0.3, 0.4)``.
* ``"rlcr10"`` (RLCR's ``eval_utils.get_ece``): 10 bins with edges ``np.linspace(0, 1, 11)``
  and open outer edges (``-inf``, ``+inf``), bin ``= np.digitize(q, edges) - 1``; ``q = 1.0``
  falls in the last bin ``[0.9, inf)``. Faithful to that code including a float quirk:
  ``linspace`` gives 0.30000000000000004, 0.6000000000000001 and 0.7000000000000001 as edges,
  so ``q = 0.3, 0.6, 0.7`` land one bin *lower* than their decimal value suggests.

Empty bins contribute nothing. ``ECE = sum_m (|B_m| / N) |acc(B_m) - conf(B_m)|``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

BINNINGS = ("paper11", "rlcr10")

_PAPER11_EDGES = np.array([k / 10 for k in range(11)])  # lower edges of the 11 bins
_RLCR10_INNER = np.linspace(0.0, 1.0, 11)[1:-1]  # RLCR's interior edges (outer ones are +-inf)


def _confidence(confidence, *, clip: bool, name: str = "confidence") -> np.ndarray:
    q = np.asarray(confidence)
    if q.dtype == object or not (np.issubdtype(q.dtype, np.floating)
                                 or np.issubdtype(q.dtype, np.integer)
                                 or q.dtype == np.bool_):
        raise TypeError(f"{name} must be numbers in [0, 1]; got dtype {q.dtype}")
    q = q.astype(np.float64)
    if q.ndim != 1:
        raise ValueError(f"{name} must be 1-D; got shape {q.shape}")
    if q.size == 0:
        raise ValueError(f"{name} must be non-empty")
    if not np.all(np.isfinite(q)):
        bad = np.flatnonzero(~np.isfinite(q))[:5].tolist()
        raise ValueError(f"{name} must be finite; found NaN or inf at indices {bad}")
    if clip:
        q = np.clip(q, 0.0, 1.0)
    elif np.any((q < 0) | (q > 1)):
        bad = np.flatnonzero((q < 0) | (q > 1))[:5].tolist()
        raise ValueError(f"{name} must lie in [0, 1] (or pass clip=True); out of range at {bad}")
    return q


def _correct(correct, n: int) -> np.ndarray:
    c = np.asarray(correct)
    if c.ndim != 1 or c.shape[0] != n:
        raise ValueError(f"correct must be 1-D with the length of confidence ({n}); got {c.shape}")
    if c.dtype == np.bool_:
        return c.astype(np.float64)
    if not (np.issubdtype(c.dtype, np.integer) or np.issubdtype(c.dtype, np.floating)):
        raise TypeError(f"correct must be boolean or 0/1; got dtype {c.dtype}")
    if not np.all((c == 0) | (c == 1)):
        raise ValueError("correct must contain only 0/1 (or booleans)")
    return c.astype(np.float64)


def _pairs(confidence, correct, clip: bool) -> tuple[np.ndarray, np.ndarray]:
    q = _confidence(confidence, clip=clip)
    return q, _correct(correct, q.shape[0])


def bin_index(confidence, *, binning: str = "paper11", clip: bool = False) -> np.ndarray:
    """The ECE bin of each confidence: ``0..10`` for ``"paper11"``, ``0..9`` for ``"rlcr10"``."""
    if binning not in BINNINGS:
        raise ValueError(f"binning must be one of {BINNINGS}; got {binning!r}")
    q = _confidence(confidence, clip=clip)
    if binning == "paper11":
        return np.searchsorted(_PAPER11_EDGES, q, side="right") - 1
    return np.searchsorted(_RLCR10_INNER, q, side="right")


def calibration_bins(confidence, correct, *, binning: str = "paper11", clip: bool = False):
    """Per-bin ``(count, accuracy, mean confidence)`` arrays (a reliability diagram).

    Empty bins have count 0 and accuracy/confidence NaN.
    """
    q, c = _pairs(confidence, correct, clip)
    idx = bin_index(q, binning=binning)
    m = 11 if binning == "paper11" else 10
    count = np.bincount(idx, minlength=m).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.bincount(idx, weights=c, minlength=m) / count
        conf = np.bincount(idx, weights=q, minlength=m) / count
    return count, acc, conf


def ece(confidence, correct, *, binning: str = "paper11", clip: bool = False) -> float:
    """Expected calibration error ``sum_m |B_m|/N * |acc(B_m) - conf(B_m)|`` (empty bins skipped).

    Args:
      confidence: ``[N]`` stated confidences ``q`` in ``[0, 1]``.
      correct: ``[N]`` correctness ``c`` (bool or 0/1).
      binning: ``"paper11"`` (BAE) or ``"rlcr10"`` (RLCR's code); see the module docstring.
      clip: clip finite out-of-range confidences into ``[0, 1]`` instead of raising.
    """
    count, acc, conf = calibration_bins(confidence, correct, binning=binning, clip=clip)
    full = count > 0
    return float(np.sum(count[full] / np.sum(count) * np.abs(acc[full] - conf[full])))


def brier(confidence, correct, *, clip: bool = False) -> float:
    """Brier score ``(1/N) sum_i (q_i - c_i)^2`` (lower is better)."""
    q, c = _pairs(confidence, correct, clip)
    return float(np.mean(np.square(q - c)))


def auroc(confidence, correct, *, clip: bool = False) -> float:
    """Area under the ROC curve of ``q`` as a score for ``c``, ties counted as half.

    Equals P(q_pos > q_neg) + 0.5 P(q_pos = q_neg) over correct/incorrect pairs (the
    Mann-Whitney statistic with average ranks; same as sklearn's trapezoidal ``roc_auc``).

    Returns NaN when all answers are correct or all are wrong: the quantity is undefined there,
    and 0.5 would be indistinguishable from an uninformative confidence. ``bootstrap_se`` drops
    such replicates.
    """
    q, c = _pairs(confidence, correct, clip)
    pos = c == 1
    n_pos, n_neg = int(np.sum(pos)), int(np.sum(~pos))
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, inverse, counts = np.unique(q, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # 1-based rank of the last member of each tie group
    avg_rank = ends - (counts - 1) / 2.0
    rank_sum = float(np.sum(avg_rank[inverse][pos]))
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def bootstrap_se(
    metric_fn: Callable[..., float], *arrays, n: int = 1000, seed: int = 0
) -> float:
    """Bootstrap standard error of ``metric_fn(*arrays)`` (BAE App. I: 1000 resamples).

    Resamples the rows (the same indices in every array) with replacement ``n`` times and
    returns the sample standard deviation (ddof=1) of the replicate values. Replicates where the
    metric is not finite (e.g. AUROC of a resample with one class only) are dropped; NaN if fewer
    than 2 remain.

    Args:
      metric_fn: e.g. ``ece``, ``brier``, ``auroc`` or ``lambda q, c: ece(q, c, binning=...)``.
      *arrays: 1-D array-likes of equal length (e.g. confidence, correct).
      n: number of bootstrap resamples (>= 2).
      seed: seed of ``np.random.default_rng``.
    """
    if not arrays:
        raise ValueError("bootstrap_se needs at least one array to resample")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(f"n must be an int >= 2; got {n!r}")
    data = [np.asarray(a) for a in arrays]
    size = data[0].shape[0] if data[0].ndim else 0
    if size == 0:
        raise ValueError("arrays must be non-empty")
    for i, a in enumerate(data):
        if a.ndim < 1 or a.shape[0] != size:
            raise ValueError(f"arrays[{i}] must have length {size}; got shape {a.shape}")
    rng = np.random.default_rng(seed)
    values = np.empty(n)
    for b in range(n):
        idx = rng.integers(0, size, size=size)
        values[b] = metric_fn(*(a[idx] for a in data))
    values = values[np.isfinite(values)]
    if values.size < 2:
        return math.nan
    return float(np.std(values, ddof=1))


def calibration_report(
    confidence,
    correct,
    *,
    binning: str = "paper11",
    n_bootstrap: int = 1000,
    seed: int = 0,
    clip: bool = False,
) -> dict[str, float]:
    """Accuracy, ECE, Brier and AUROC with bootstrap standard errors (``*_se``), as in BAE.

    ``n_bootstrap=0`` skips the standard errors. Keys: ``n, accuracy, ece, brier, auroc`` and
    ``accuracy_se, ece_se, brier_se, auroc_se``.
    """
    q, c = _pairs(confidence, correct, clip)
    metrics: dict[str, Callable[..., float]] = {
        "accuracy": lambda q_, c_: float(np.mean(c_)),
        "ece": lambda q_, c_: ece(q_, c_, binning=binning),
        "brier": brier,
        "auroc": auroc,
    }
    out: dict[str, float] = {"n": float(q.size)}
    for name, fn in metrics.items():
        out[name] = fn(q, c)
    if n_bootstrap:
        for name, fn in metrics.items():
            out[f"{name}_se"] = bootstrap_se(fn, q, c, n=n_bootstrap, seed=seed)
    return out
