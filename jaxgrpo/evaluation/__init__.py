"""Evaluation metrics on the host (NumPy only): calibration and test-time scaling.

``calibration``: ECE (the BAE paper's 11 bins or RLCR's 10), Brier, AUROC, bootstrap standard
errors. ``scaling`` (test-time scaling): pass@k (unbiased), majority vote, max-confidence and
confidence-weighted majority over ``n`` samples per prompt, and accuracy-vs-budget curves.
"""

from jaxgrpo.evaluation import calibration, scaling
from jaxgrpo.evaluation.calibration import (
    auroc,
    bootstrap_se,
    brier,
    calibration_bins,
    calibration_report,
    ece,
)
from jaxgrpo.evaluation.scaling import (
    confidence_weighted_majority_index,
    majority_vote_index,
    max_confidence_index,
    pass_at_k,
    scaling_curves,
)

__all__ = [
    "auroc",
    "bootstrap_se",
    "brier",
    "calibration",
    "calibration_bins",
    "calibration_report",
    "confidence_weighted_majority_index",
    "ece",
    "majority_vote_index",
    "max_confidence_index",
    "pass_at_k",
    "scaling",
    "scaling_curves",
]
