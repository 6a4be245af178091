"""What the ratio-preserving sampler consumes and returns: rollout groups (all at once or as a
stream of finished ones), the zero-gradient filter, and the per-step result with its metrics
(MT-GRPO, arXiv 2602.05547, §5)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

FILTERS = ("strict", "lenient", "lenient_code", "none")


@dataclasses.dataclass(frozen=True, eq=False)
class Group:
    """One prompt's rollouts: ``rewards`` is ``[G]``; ``payload`` is opaque to the sampler."""

    task: str
    uid: str
    rewards: Sequence[float]
    payload: Any = None


class GroupStream(Protocol):
    """A continuous-batching rollout engine as ``RatioPreservingSampler.run_step_streamed``
    drives it; the stream draws the prompts itself (e.g. from a ``TaskSampler``)."""

    def submit(self, requests: dict[str, int]) -> None:
        """Enqueues ``requests[task]`` new prompts per task."""

    def finished(self) -> list[Group]:
        """Blocks until at least one submitted group has finished; returns every finished group
        not returned before, or ``[]`` when nothing is outstanding."""

    def cancel(self) -> int:
        """Drops every outstanding prompt (finished but not yet returned included); returns how
        many were dropped."""


def is_filtered(rewards: Sequence[float], mode: str, *, correct: float = 1.0 - 1e-6) -> bool:
    """Whether the zero-gradient filter drops a group (MT-GRPO,
    arXiv 2602.05547 §5, Alg. 2, and the released code).

    Modes: ``"lenient"`` drops groups whose rewards are all equal (zero advantage; DAPO dynamic
    sampling, the best reading of Exp. 2); ``"strict"`` also drops groups with no reward
    ``>= correct`` or with all rewards ``>= correct`` (Exp. 1); ``"lenient_code"`` drops only
    all-0 and all-1 groups, keeping e.g. all-0.1 format-only groups as the released Exp. 2 code
    does; ``"none"`` keeps everything (GRPO).
    """
    if mode not in FILTERS:
        raise ValueError(f"filter must be one of {FILTERS}, got {mode!r}")
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 1 or r.size == 0:
        raise ValueError(f"rewards must be a non-empty 1-D list [G], got shape {r.shape}")
    if mode == "none":
        return False
    if mode == "lenient_code":
        return bool(np.all(r == 0.0) or np.all(r == 1.0))
    constant = bool(np.all(r == r[0]))
    if mode == "lenient":
        return constant
    hits = r >= correct
    return constant or not hits.any() or bool(hits.all())


@dataclasses.dataclass(frozen=True)
class StepResult:
    """What one ``run_step`` (or ``run_step_streamed``) produced; per-task dicts are keyed by
    task name.

    Attributes:
      step: the step index this result belongs to.
      batch: the training groups, tasks in order, generation order within a task.
      padded: aligned with ``batch``; True for filtered groups added by ``fill="pad"``.
      targets: per-task target counts ``n_k``.
      realised_counts: per-task accepted (non-padded) groups in ``batch``.
      rounds: generation rounds used (>= 1); streamed: ``submit`` calls.
      hit_cap: the loop stopped at ``max_rounds`` while still short (streamed: the prompt
        budget ``max_rounds * round_size`` was spent and every submitted group finished).
      generated, filtered: per-task groups generated and dropped by the filter, all rounds
        (streamed: the groups that finished; cancelled prompts are in ``dropped``).
      filtered_rates: ``filtered / generated`` this step, before filtering (0 if none generated).
      zero_adv_rates: share of generated groups with all-equal rewards (0 if none generated).
      rho: the EMA filter rates after this step.
      inflation: ``m_k`` at the start of the step.
      weights: the normalised task weights ``z``.
      requests: per round, the per-task prompt counts asked of ``generate`` (streamed: per
        ``submit`` call).
      accepted_counts: per round, the per-task groups accepted so far (cumulative); streamed:
        entry ``i`` is the count when submit ``i + 1`` was decided (the last: at the end of the
        step), so ``accepted_counts[i - 1]`` is what decided ``requests[i]``, as for rounds.
      dropped: per-task prompts cancelled while in flight (streamed; all 0 for ``run_step``).
    """

    step: int
    batch: list[Group]
    padded: list[bool]
    targets: dict[str, int]
    realised_counts: dict[str, int]
    rounds: int
    hit_cap: bool
    generated: dict[str, int]
    filtered: dict[str, int]
    filtered_rates: dict[str, float]
    zero_adv_rates: dict[str, float]
    rho: dict[str, float]
    inflation: dict[str, float]
    weights: dict[str, float]
    requests: list[dict[str, int]]
    accepted_counts: list[dict[str, int]]
    dropped: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def accepted(self) -> list[Group]:
        """The groups of ``batch`` that passed the filter."""
        return [g for g, p in zip(self.batch, self.padded, strict=True) if not p]

    def metrics(self) -> dict[str, float]:
        """Flat scalar metrics: ``rps/...`` and ``task/<name>/...``."""
        n = max(len(self.batch), 1)
        out = {
            "rps/rounds": float(self.rounds),
            "rps/hit_cap": float(self.hit_cap),
            "rps/batch_size": float(len(self.batch)),
            "rps/num_padded": float(sum(self.padded)),
            "rps/generated": float(sum(self.generated.values())),
            "rps/dropped": float(sum(self.dropped.values())),
        }
        for k in self.targets:
            out[f"task/{k}/weight"] = self.weights[k]
            out[f"task/{k}/target_count"] = float(self.targets[k])
            out[f"task/{k}/realised_count"] = float(self.realised_counts[k])
            out[f"task/{k}/realised_share"] = self.realised_counts[k] / n
            out[f"task/{k}/filtered_rate"] = self.filtered_rates[k]
            out[f"task/{k}/rho"] = self.rho[k]
            out[f"task/{k}/inflation"] = self.inflation[k]
        return out
