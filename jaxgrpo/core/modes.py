"""Every set of mode names, defined once (plain Python: no jax, importable by the config).

The config builds its enums from these registries and validates against them, the core
dispatches on them, and the loop reads an entry's fields instead of testing names. Adding a mode
is one entry here plus its function: the core modules check at import that their function tables
name exactly these modes.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class EstimatorSpec:
    """An advantage estimator.

    Attributes:
      baseline: the ``group_relative`` baseline (``GROUP_BASELINES``); None for ``blockwise``,
        which takes one baseline per block (``BLOCK_BASELINES``).
      scale: the default ``group_relative`` scale (``GROUP_SCALES``) when the config sets none.
    """

    baseline: str | None
    scale: str


@dataclasses.dataclass(frozen=True)
class BaselineSpec:
    """A per-block baseline of the ``blockwise`` estimator.

    Attributes:
      group_relative: compares completions of one prompt (needs G > 1).
      outcome_conditioned: conditions on the first block's outcome (needs int outcomes).
    """

    group_relative: bool
    outcome_conditioned: bool = False


@dataclasses.dataclass(frozen=True)
class AlgorithmSpec:
    """A training algorithm: the batch sampler it runs and whether it learns task weights.

    Attributes:
      sampler: the ``RatioPreservingSampler`` preset it runs (``jaxgrpo.data.PRESETS``).
      dynamic_sampling: that preset filters and regenerates, as ``algo.sampling`` configures.
      with_sampling: the algorithm that runs instead when ``algo.sampling.enabled`` (GRPO with
        dynamic sampling is DAPO); None: ``algo.sampling.enabled`` changes nothing.
      task_weights: learns MT-GRPO's task weights (``algo.mt_grpo``; the train step reports the
        per-task improvement signal).
      min_tasks: the fewest tasks its mixture may have.
    """

    sampler: str
    dynamic_sampling: bool
    with_sampling: str | None = None
    task_weights: bool = False
    min_tasks: int = 1


ESTIMATORS: dict[str, EstimatorSpec] = {
    "grpo": EstimatorSpec(baseline="mean", scale="group"),  # (r - mean) / (std + eps)
    "dr_grpo": EstimatorSpec(baseline="mean", scale="none"),  # r - mean (Dr. GRPO)
    "rloo": EstimatorSpec(baseline="leave_one_out", scale="none"),
    "blockwise": EstimatorSpec(baseline=None, scale="none"),  # BAE: one advantage per block
}
GROUP_BASELINES = ("mean", "leave_one_out")
GROUP_SCALES = ("group", "batch", "none")
BLOCK_BASELINES: dict[str, BaselineSpec] = {
    "none": BaselineSpec(group_relative=False),
    "batch_mean": BaselineSpec(group_relative=False),
    "group_mean": BaselineSpec(group_relative=True),
    "ocb": BaselineSpec(group_relative=True, outcome_conditioned=True),
    "ocb_loo": BaselineSpec(group_relative=True, outcome_conditioned=True),
    "ocb_shrink": BaselineSpec(group_relative=True, outcome_conditioned=True),
}
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm", "block_mean")
KL_ESTIMATORS = ("k1", "k2", "k3")
IMPROVEMENT_REDUCTIONS = ("sum", "mean")
TASK_WEIGHT_OPTIMIZERS = ("adam_l2", "adamw", "sgd")
ALGORITHMS: dict[str, AlgorithmSpec] = {
    "grpo": AlgorithmSpec(sampler="grpo", dynamic_sampling=False, with_sampling="dapo"),
    "dapo": AlgorithmSpec(sampler="dapo", dynamic_sampling=True),
    "mt_grpo": AlgorithmSpec(sampler="mt_grpo", dynamic_sampling=True, task_weights=True,
                             min_tasks=2),
}


def check_table(kind: str, table, names) -> None:
    """Raises if a function ``table`` does not name exactly the registered ``names``."""
    if tuple(table) != tuple(names):
        raise RuntimeError(f"the {kind} table {tuple(table)} must name exactly the registered "
                           f"modes {tuple(names)} (jaxgrpo.core.modes)")
