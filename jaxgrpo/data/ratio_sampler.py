"""MT-GRPO's ratio-preserving sampler (RPS), with GRPO and DAPO dynamic sampling as settings.

MT-GRPO, arXiv 2602.05547: §5, Alg. 2 and the authors' released code (where they differ,
both). One ``run_step``:

1. **Targets** ``n_k`` (post-filter prompts per task, ``target_mode``): ``"multinomial"``
   ``n ~ Multinomial(B, z)`` (paper Alg. 2 line 1); ``"scaled"`` ``round(B * ref_k / R)`` with
   ``ref ~ Multinomial(R, z)``, ``R`` the round size (the released code; may not sum to ``B``;
   without AAS ``ref`` is round 1's own draw, as in the code);
   ``"exact"`` ``largest_remainder(z, B)`` (deterministic, as ``TaskSampler``).
2. **Inflation** (acceptance-aware sampling, AAS, Alg. 2 line 2): ``m_k = min(1/(1-rho_k),
   max_inflation)``; ``max_inflation=1`` turns AAS off. Recomputed each round from the current
   ``rho`` (the code's behaviour).
3. **Rounds.** Each round requests ``R = ceil(oversample * B)`` prompts (rounded up to
   ``round_multiple``, e.g. the host count) split over tasks by ``draw_mode``
   (``"multinomial"``, paper and code, or ``"exact"`` largest remainder) from a distribution
   ``p``; ``generate`` rolls them out; the zero-advantage ``filter`` drops groups; ``rho_k``
   takes one EMA step per round for every task generated in it: ``rho = d*rho + (1-d)*filtered
   fraction`` (``rho_decay`` d = 0.9, from 0, as the released code). Round 1 uses ``p ∝ z*m``.
   Another round
   runs while the batch is short and fewer than ``max_rounds`` rounds (the first included: the
   code's ``max_num_gen_batches``; the paper's ``N_rs`` extra rounds is ``max_rounds = N_rs +
   1``) were run; "short" and the next ``p`` depend on ``schedule``:

   * ratios not preserved (GRPO, DAPO): short = fewer than ``B`` accepted; ``p ∝ z*m``.
   * ``schedule="paper"`` (Alg. 2 line 7): short = some deficit ``def_k = max(n_k - c_k, 0) >
     0``; ``p ∝ def*m``.
   * ``schedule="code"`` (the released code): while fewer than ``B`` accepted, ``p ∝ z*m``;
     then, while some
     ``def_k > 0``, ``p ∝ def*m``.
4. **Trim and fill** (Alg. 2 line 8, and the released code): with ratios preserved, keep a random
   ``min(c_k, n_k)`` per task (at most ``B`` in all); ``fill="accepted"`` tops up to ``B`` at
   random from the other accepted groups, ``fill="none"`` does not. Without preservation (DAPO),
   keep a random ``B`` of the accepted groups. If the round cap left fewer than ``B``, the batch
   is short (the code trains on it); ``fill="pad"`` instead pads it with random filtered
   groups, flagged in ``StepResult.padded``, to keep JAX shapes static (under the lenient
   filters they have zero advantage; under ``"strict"`` mask them with ``padded``).

**Streamed** (``run_step_streamed``, for a continuous-batching rollout engine): the same targets,
``m_k``, filter, trim and fill, but a stream of finished groups replaces the rounds. The sampler
``submit``s prompts, takes groups from ``finished()`` as they finish, and after every return
re-decides: done as soon as the batch is not short ("short" as in step 3, for each setting and
schedule), then ``cancel()`` drops whatever is still in flight (``StepResult.dropped``).
Otherwise, with ``a_k = 1 - rho_k`` the acceptance estimate and ``m_k ~ 1/a_k`` its AAS
inflation, it keeps enough prompts in flight that the expected acceptances cover the need:

* ratios preserved: per task ``ceil(def_k * m_k)`` in flight (``def_k = max(n_k - c_k, 0)``);
* not preserved, and for ``schedule="code"`` while fewer than ``B`` are accepted:
  ``ceil((B - accepted) * sum_k z_k m_k)`` in flight in all, the missing ones split by
  ``draw_mode`` from ``p ∝ z*m`` (round 1's distribution);
* at least ``stream_min_outstanding`` in flight in all (default ``B // 2``), the extra split
  from the distribution step 3 would draw the next round from (``z*m`` or ``def*m``). More in
  flight keeps the engine busy while stragglers finish but means more cancelled work at the end;
  0 submits only what the acceptance estimate asks for.

The budget is the round schedule's cap, ``max_rounds * R`` prompts per step (a ``submit`` is
shrunk to what is left); when it is spent and every submitted group has finished while the
batch is still short, the step ends with ``hit_cap``. ``rho`` takes one EMA step per task at the
end of the step, from the filtered fraction of the groups that finished (cancelled ones do not
count), not one per round; with AAS the inflation therefore stays ``m_k`` of the step's start
throughout it. ``"scaled"`` targets are drawn as in ``run_step``, but never serve as a first
request. ``round_multiple`` only sizes the budget: the stream shares prompts between hosts.
Randomness is a pure function of ``(seed, step)`` and the order in which groups finish.

Defaults follow the suggested settings: paper Alg. 2 with ``M_os = 3``, AAS on with ``M_acc =
5`` (App. E), ``rho`` EMA 0.9, 10 rounds, the zero-variance (``"lenient"``) filter (the
released code).

When the cap is not hit and the targets sum to ``B``, the realised per-task counts equal the
targets exactly. Randomness is a pure function of ``(seed, step)``; the state is ``step`` and
``rho``. For several hosts, run the same sampler on every host on the *global* groups (gather
the filter outcome first) and let ``generate`` draw each host's share from a ``TaskSampler``
(set ``round_multiple`` to the host count).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxgrpo.data.groups import FILTERS, Group, GroupStream, StepResult, is_filtered
from jaxgrpo.data.task_sampler import _check_int, _normalized, largest_remainder

TARGET_MODES = ("multinomial", "scaled", "exact")
DRAW_MODES = ("multinomial", "exact")
SCHEDULES = ("paper", "code")
FILLS = ("accepted", "pad", "none")
_STATE_FORMAT = "jaxgrpo.RatioPreservingSampler/1"


# Settings of the one object that give each algorithm (the paper's §5 and App. D.2 ablations).
PRESETS: dict[str, dict[str, Any]] = {
    # B prompts in the fixed ratios, no filter, one round.
    "grpo": dict(filter="none", oversample=1.0, max_rounds=1, preserve_ratios=False,
                 max_inflation=1.0, target_mode="exact", draw_mode="exact"),
    # Dynamic sampling: 3x oversampling, drop zero-advantage groups, regenerate until B.
    "dapo": dict(filter="lenient", oversample=3.0, max_rounds=10, preserve_ratios=False,
                 max_inflation=1.0),
    # Ablation GRPO_RPS (App. D.2): DAPO plus ratio preservation and AAS; pass uniform weights.
    "grpo_rps": dict(filter="lenient", oversample=3.0, max_rounds=10, preserve_ratios=True,
                     max_inflation=5.0),
    # MT-GRPO with the suggested defaults (paper Alg. 2, AAS on).
    "mt_grpo": dict(filter="lenient", oversample=3.0, max_rounds=10, preserve_ratios=True,
                    max_inflation=5.0, schedule="paper", target_mode="multinomial"),
    # The released Exp. 1 scripts: strict filter, 10 rounds in all, no AAS, code schedule.
    "mt_grpo_exp1_code": dict(filter="strict", oversample=3.0, max_rounds=10,
                              preserve_ratios=True, max_inflation=1.0, schedule="code",
                              target_mode="scaled"),
    # The released Exp. 2 scripts: lenient (code) filter, 2 rounds, AAS, RPS from step 10.
    "mt_grpo_exp2_code": dict(filter="lenient_code", oversample=3.0, max_rounds=2,
                              preserve_ratios=True, preserve_from_step=10, max_inflation=5.0,
                              schedule="code", target_mode="scaled"),
}


@dataclasses.dataclass
class _StepPool:
    """Everything generated within one step (the paper's set X, plus what was filtered)."""

    num_tasks: int
    accepted: list[tuple[int, Group]] = dataclasses.field(default_factory=list)
    rejected: list[tuple[int, Group]] = dataclasses.field(default_factory=list)
    seen: set[str] = dataclasses.field(default_factory=set)
    requests: list[dict[str, int]] = dataclasses.field(default_factory=list)
    accepted_counts: list[dict[str, int]] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        self.generated = np.zeros(self.num_tasks, np.int64)
        self.filtered = np.zeros(self.num_tasks, np.int64)
        self.zero_adv = np.zeros(self.num_tasks, np.int64)
        self.have = np.zeros(self.num_tasks, np.int64)  # accepted so far, per task
        self.dropped = np.zeros(self.num_tasks, np.int64)  # cancelled in flight (streamed)

    def snapshot(self, names: Sequence[str]) -> None:
        """Appends the cumulative per-task accepted counts to ``accepted_counts``."""
        self.accepted_counts.append(dict(zip(names, map(int, self.have), strict=True)))


def _ceil(x) -> np.ndarray:
    """``ceil`` that ignores float noise below 1e-6 (``ceil(0.1 * 30)`` is 3, not 4)."""
    return np.ceil(np.asarray(x, dtype=np.float64) - 1e-6).astype(np.int64)


def _choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


class RatioPreservingSampler:
    """Builds each step's post-filter batch with per-task counts equal to targets drawn from z.

    See the module docstring for the algorithm; ``PRESETS`` for GRPO, DAPO, GRPO+RPS and MT-GRPO.

    Args:
      task_names: the tasks, in the order weights are given.
      batch_size: ``B``, prompts per training batch (post-filter).
      target_mode: ``"multinomial"`` (paper), ``"scaled"`` (code) or ``"exact"``.
      draw_mode: how a round's prompt count is split over tasks: ``"multinomial"`` or ``"exact"``.
      oversample: ``M_os >= 1``; a round requests ``ceil(M_os * B)`` prompts.
      max_inflation: ``M_acc >= 1``, cap of the AAS inflation; 1 turns AAS off.
      rho_decay: EMA decay ``d`` of the per-task filter rate, in ``[0, 1)``.
      max_rounds: cap on generation rounds per step, the first included.
      schedule: ``"paper"`` or ``"code"`` resampling schedule (ratios preserved only).
      filter: zero-gradient filter, one of ``FILTERS`` (see ``is_filtered``).
      preserve_ratios: enforce the per-task targets (RPS); False gives DAPO/GRPO.
      preserve_from_step: enforce only from this step on, steps counted from 1 (the metrics
        log's and the released code's numbering: 10 makes the 10th step the first preserved, as
        the released Exp. 2 scripts' warm-up); 0 and 1 both preserve from the first step.
      fill: ``"accepted"``, ``"pad"`` or ``"none"`` (module docstring, step 4).
      round_multiple: round sizes are rounded up to a multiple of this (e.g. the host count).
      correct: reward threshold for "correct" in the strict filter.
      stream_min_outstanding: ``run_step_streamed`` only: the fewest prompts kept in flight
        while the batch is short (module docstring, "Streamed"); ``None`` means ``B // 2``.
      seed: non-negative int; step ``t`` uses ``np.random.default_rng([seed, t])``.

    Example (prompts from a ``TaskSampler``; odd records give mixed rewards, even ones all-1):
      >>> from jaxgrpo.data import TaskSampler
      >>> prompts = TaskSampler({t: [{"q": i} for i in range(40)] for t in ("a", "b")},
      ...                       global_batch=2, seed=0)
      >>> def generate(requests):
      ...     return [Group(it.task, it.uid, (1.0, 0.0) if it.index % 2 else (1.0, 1.0))
      ...             for it in prompts.draw(requests)]
      >>> rps = RatioPreservingSampler.from_preset("mt_grpo", ["a", "b"], 8, seed=0)
      >>> res = rps.run_step({"a": 0.25, "b": 0.75}, generate)
      >>> res.realised_counts == res.targets, len(res.batch), res.hit_cap
      (True, 8, False)
    """

    def __init__(
        self,
        task_names: Sequence[str],
        batch_size: int,
        *,
        target_mode: str = "multinomial",
        draw_mode: str = "multinomial",
        oversample: float = 3.0,
        max_inflation: float = 5.0,
        rho_decay: float = 0.9,
        max_rounds: int = 10,
        schedule: str = "paper",
        filter: str = "lenient",
        preserve_ratios: bool = True,
        preserve_from_step: int = 0,
        fill: str = "accepted",
        round_multiple: int = 1,
        correct: float = 1.0 - 1e-6,
        stream_min_outstanding: int | None = None,
        seed: int = 0,
    ):
        names = tuple(task_names)
        if not names or len(set(names)) != len(names) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"task_names must be distinct strings, got {task_names!r}")
        self.task_names = names
        self.batch_size = _check_int("batch_size", batch_size, minimum=1)
        self.target_mode = _choice("target_mode", target_mode, TARGET_MODES)
        self.draw_mode = _choice("draw_mode", draw_mode, DRAW_MODES)
        self.schedule = _choice("schedule", schedule, SCHEDULES)
        self.filter = _choice("filter", filter, FILTERS)
        self.fill = _choice("fill", fill, FILLS)
        if not oversample >= 1.0:
            raise ValueError(f"oversample must be >= 1, got {oversample}")
        if not max_inflation >= 1.0:
            raise ValueError(f"max_inflation must be >= 1 (1 turns AAS off), got {max_inflation}")
        if not 0.0 <= rho_decay < 1.0:
            raise ValueError(f"rho_decay must be in [0, 1), got {rho_decay}")
        self.oversample = float(oversample)
        self.max_inflation = float(max_inflation)
        self.rho_decay = float(rho_decay)
        self.max_rounds = _check_int("max_rounds", max_rounds, minimum=1)
        self.preserve_ratios = bool(preserve_ratios)
        self.preserve_from_step = _check_int("preserve_from_step", preserve_from_step, minimum=0)
        self.round_multiple = _check_int("round_multiple", round_multiple, minimum=1)
        self.correct = float(correct)
        self.stream_min_outstanding = (
            self.batch_size // 2 if stream_min_outstanding is None
            else _check_int("stream_min_outstanding", stream_min_outstanding, minimum=0)
        )
        self.seed = _check_int("seed", seed, minimum=0)
        self.round_size = self.round_multiple * math.ceil(
            self.oversample * self.batch_size / self.round_multiple - 1e-9
        )
        self.step = 0
        self.rho = np.zeros(len(names), dtype=np.float64)

    @classmethod
    def from_preset(cls, name: str, task_names: Sequence[str], batch_size: int, **overrides):
        """A sampler with ``PRESETS[name]`` settings, updated by ``overrides``."""
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {name!r}")
        return cls(task_names, batch_size, **{**PRESETS[name], **overrides})

    # ---- helpers ---------------------------------------------------------------------------

    def _weights(self, weights) -> np.ndarray:
        if weights is None:
            return np.full(len(self.task_names), 1.0 / len(self.task_names))
        if isinstance(weights, Mapping):
            if set(weights) != set(self.task_names):
                raise ValueError(f"weights must name exactly the tasks {self.task_names}, "
                                 f"got {list(weights)}")
            weights = [weights[k] for k in self.task_names]
        w = _normalized(list(weights), "weights")
        if w.size != len(self.task_names):
            raise ValueError(f"weights has {w.size} entries for {len(self.task_names)} tasks")
        return w

    def inflation(self) -> np.ndarray:
        """``m_k = min(1 / (1 - rho_k), max_inflation)`` from the current ``rho``."""
        return np.minimum(1.0 / np.maximum(1.0 - self.rho, 1e-12), self.max_inflation)

    def _split(self, total: int, p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        p = p / p.sum()
        if self.draw_mode == "exact":
            return np.asarray(largest_remainder(list(p), total), dtype=np.int64)
        return rng.multinomial(total, p)

    def _targets(self, z: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, Any]:
        """The targets ``n_k``, and for ``"scaled"`` the reference draw ``Multinomial(R, z)``."""
        b = self.batch_size
        if self.target_mode == "exact":
            return np.asarray(largest_remainder(list(z), b), dtype=np.int64), None
        if self.target_mode == "multinomial":
            return rng.multinomial(b, z), None
        ref = self._split(self.round_size, z, rng)
        return np.asarray([round(b * r / self.round_size) for r in ref], dtype=np.int64), ref

    def _check_groups(self, groups, seen: set[str], who: str) -> np.ndarray:
        """Validates returned groups (type, task, uid unique in the step); per-task counts."""
        got = np.zeros(len(self.task_names), np.int64)
        for g in groups:
            if not isinstance(g, Group):
                raise TypeError(f"{who} must return Group objects, got {type(g).__name__}")
            if g.task not in self.task_names:
                raise ValueError(f"{who} returned a group of unknown task {g.task!r}")
            if g.uid in seen:
                raise ValueError(f"{who} returned uid {g.uid!r} twice in one step")
            seen.add(g.uid)
            got[self.task_names.index(g.task)] += 1
        return got

    def _generate(self, generate, counts: np.ndarray, seen: set[str]) -> list[Group]:
        requests = dict(zip(self.task_names, (int(c) for c in counts), strict=True))
        groups = list(generate(requests))
        got = self._check_groups(groups, seen, "generate")
        got = dict(zip(self.task_names, map(int, got), strict=True))
        if got != requests:
            raise ValueError(f"generate returned per-task counts {got} for requests {requests}")
        return groups

    def _file(self, pool: _StepPool, groups: Sequence[Group]) -> tuple[np.ndarray, np.ndarray]:
        """Filters ``groups`` into ``pool``; per-task generated and filtered counts."""
        names = self.task_names
        r_gen = np.zeros(len(names), np.int64)
        r_filt = np.zeros(len(names), np.int64)
        for g in groups:
            k = names.index(g.task)
            r_gen[k] += 1
            pool.zero_adv[k] += is_filtered(g.rewards, "lenient")
            if is_filtered(g.rewards, self.filter, correct=self.correct):
                r_filt[k] += 1
                pool.rejected.append((k, g))
            else:
                pool.accepted.append((k, g))
                pool.have[k] += 1
        pool.generated += r_gen
        pool.filtered += r_filt
        return r_gen, r_filt

    def _ema(self, r_gen: np.ndarray, r_filt: np.ndarray) -> None:
        """One EMA step of ``rho`` for every task with generated groups."""
        hit, d = r_gen > 0, self.rho_decay
        self.rho[hit] = d * self.rho[hit] + (1 - d) * r_filt[hit] / r_gen[hit]

    # ---- one step --------------------------------------------------------------------------

    def run_step(
        self,
        weights: Mapping[str, float] | Sequence[float] | None,
        generate: Callable[[dict[str, int]], Sequence[Group]],
    ) -> StepResult:
        """Builds one training batch; advances ``step`` and ``rho``.

        Args:
          weights: task weights ``z`` (sum 1) for this step; ``None`` means uniform.
          generate: ``requests -> groups``; called once per round with task -> prompt count and
            must return exactly that many ``Group``s per task, uids unique within the step.
        """
        z = self._weights(weights)
        rng = np.random.default_rng([self.seed, self.step])
        # Steps are counted from 1 here, as in the metrics log and the released code.
        preserve = self.preserve_ratios and self.step + 1 >= self.preserve_from_step
        m0 = self.inflation()
        targets, ref = self._targets(z, rng)
        # "scaled" (the released code): without AAS the code takes the reference shares from
        # round 1's own
        # draw (from z); with AAS from a separate draw made before inflation.
        counts = ref if ref is not None and np.all(m0 == 1.0) else None
        pool = _StepPool(len(self.task_names))
        p, hit_cap = z * m0, False
        while True:
            if counts is None:
                counts = self._split(self.round_size, p, rng)
            self._run_round(pool, generate, counts)
            short, p = self._next_round(pool, z, targets, preserve)
            counts = None
            if not short:
                break
            if len(pool.requests) >= self.max_rounds:
                hit_cap = True
                break
        batch = self._select(pool.accepted, pool.rejected, targets, preserve, rng)
        return self._result(z, targets, m0, batch, hit_cap, pool)

    def _run_round(self, pool: _StepPool, generate, counts: np.ndarray) -> None:
        """Generates one round, filters it into ``pool`` and takes one EMA step of ``rho``."""
        names = self.task_names
        pool.requests.append(dict(zip(names, (int(c) for c in counts), strict=True)))
        self._ema(*self._file(pool, self._generate(generate, counts, pool.seen)))
        pool.snapshot(names)

    def _next_round(self, pool: _StepPool, z, targets, preserve) -> tuple[bool, np.ndarray]:
        """Whether the batch is still short, and the next round's distribution (step 3)."""
        deficit = np.maximum(targets - pool.have, 0)
        short_total = len(pool.accepted) < self.batch_size
        m = self.inflation()
        if not preserve:
            return short_total, z * m
        if self.schedule == "paper":
            return bool(deficit.sum() > 0), deficit * m
        return short_total or bool(deficit.sum() > 0), z * m if short_total else deficit * m

    # ---- one step from a stream of finished groups -------------------------------------------

    def run_step_streamed(
        self, weights: Mapping[str, float] | Sequence[float] | None, stream: GroupStream
    ) -> StepResult:
        """Builds one training batch from groups as they finish; advances ``step`` and ``rho``.

        The same targets, filter, trim and fill as ``run_step``; only the generation schedule
        differs (module docstring, "Streamed").

        Args:
          weights: task weights ``z`` (sum 1) for this step; ``None`` means uniform.
          stream: a ``GroupStream``: ``submit(requests)`` enqueues that many new prompts per
            task, ``finished()`` blocks until some submitted group has finished and returns the
            finished groups not returned before, ``cancel()`` drops the rest and returns how
            many it dropped. Uids must be unique within the step.
        """
        z = self._weights(weights)
        rng = np.random.default_rng([self.seed, self.step])
        preserve = self.preserve_ratios and self.step + 1 >= self.preserve_from_step
        m = self.inflation()  # rho moves only at the end of a streamed step
        targets, _ = self._targets(z, rng)
        names = self.task_names
        pool = _StepPool(len(names))
        outstanding = np.zeros(len(names), np.int64)
        left = self.max_rounds * self.round_size  # the prompt budget of the round schedule
        while True:
            counts = self._stream_counts(pool, z, targets, preserve, m, outstanding, left, rng)
            if counts is None:  # not short: done
                break
            if counts.sum() > 0:
                if pool.requests:
                    pool.snapshot(names)
                request = dict(zip(names, (int(c) for c in counts), strict=True))
                pool.requests.append(request)
                stream.submit(dict(request))
                outstanding += counts
                left -= int(counts.sum())
            if outstanding.sum() == 0:  # budget spent, every group in: the cap
                break
            groups = list(stream.finished())
            if not groups:
                raise ValueError(f"stream.finished() returned no group while "
                                 f"{int(outstanding.sum())} prompts are outstanding")
            got = self._check_groups(groups, pool.seen, "stream.finished()")
            if np.any(got > outstanding):
                k = int(np.argmax(got > outstanding))
                raise ValueError(f"stream.finished() returned {int(got[k])} groups of task "
                                 f"{names[k]!r}, but only {int(outstanding[k])} were outstanding")
            outstanding -= got
            self._file(pool, groups)
        hit_cap = counts is not None
        pool.snapshot(names)
        if outstanding.sum() > 0:
            dropped = stream.cancel()
            if dropped != outstanding.sum():
                raise ValueError(f"stream.cancel() dropped {dropped} prompts, but "
                                 f"{int(outstanding.sum())} were outstanding")
            pool.dropped += outstanding
        self._ema(pool.generated, pool.filtered)
        batch = self._select(pool.accepted, pool.rejected, targets, preserve, rng)
        return self._result(z, targets, m, batch, hit_cap, pool)

    def _stream_counts(self, pool, z, targets, preserve, m, outstanding, left, rng):
        """The next ``submit``'s per-task counts; ``None`` when the batch is not short."""
        short, p = self._next_round(pool, z, targets, preserve)
        if not short:
            return None
        b, accepted = self.batch_size, len(pool.accepted)
        counts = np.zeros(len(self.task_names), np.int64)
        if preserve:  # enough in flight per task that the expected acceptances cover def_k
            deficit = np.maximum(targets - pool.have, 0)
            counts = np.maximum(_ceil(deficit * m) - outstanding, 0)
        if not preserve or (self.schedule == "code" and accepted < b):
            # B - accepted over tasks in z: sum_k z_k * m_k prompts per missing group, drawn
            # from p = z*m as round 1.
            missing = int(_ceil((b - accepted) * float(np.sum(z * m)))) - int(
                (outstanding + counts).sum())
            if missing > 0:
                counts += self._split(missing, z * m, rng)
        extra = self.stream_min_outstanding - int((outstanding + counts).sum())
        if extra > 0:
            counts += self._split(extra, p, rng)
        total = int(counts.sum())
        if total > left:  # the budget: shrink in proportion, never above the counts
            counts = np.asarray(largest_remainder(list(counts / total), left), dtype=np.int64)
        return counts

    def _select(self, accepted, rejected, targets, preserve, rng) -> list[tuple[int, Group, bool]]:
        """Trim to the targets and fill (module docstring, step 4); sorted by task, then order."""
        b = self.batch_size
        order = np.arange(len(accepted))
        task_of = np.asarray([k for k, _ in accepted], dtype=np.int64)
        if preserve:
            keep = []
            for k, n_k in enumerate(targets):
                mine = order[task_of == k]
                keep.extend(rng.choice(mine, size=min(int(n_k), mine.size), replace=False))
            keep = np.asarray(keep, dtype=np.int64)
            if keep.size > b:  # only "scaled" targets can sum to more than B
                keep = self._trim(keep, task_of, targets, rng)
            if self.fill != "none" and keep.size < b:
                rest = np.setdiff1d(order, keep)
                extra = rng.choice(rest, size=min(b - keep.size, rest.size), replace=False)
                keep = np.concatenate([keep, extra])
        else:
            keep = rng.choice(order, size=min(b, order.size), replace=False)
        chosen = [(accepted[i][0], i, accepted[i][1], False) for i in keep.tolist()]
        if self.fill == "pad" and len(chosen) < b and rejected:
            pads = rng.choice(len(rejected), size=min(b - len(chosen), len(rejected)),
                              replace=False)
            chosen += [(rejected[i][0], len(accepted) + i, rejected[i][1], True)
                       for i in pads.tolist()]
        chosen.sort(key=lambda t: (t[0], t[1]))
        return [(k, g, pad) for k, _, g, pad in chosen]

    def _trim(self, keep, task_of, targets, rng) -> np.ndarray:
        """Drops ``keep.size - B`` kept groups, each a random one of the task with the largest
        target among those keeping more than one group (ties: the lowest task index), so that
        rounding ``"scaled"`` targets to ``B + 1`` never empties a task's only slot."""
        keep = list(keep.tolist())
        while len(keep) > self.batch_size:
            kept = np.bincount(task_of[keep], minlength=len(self.task_names))
            k = int(np.argmax(np.where(kept > 1, targets, np.where(kept > 0, -1, -2))))
            mine = [i for i, j in enumerate(keep) if task_of[j] == k]
            del keep[mine[int(rng.integers(len(mine)))]]
        return np.asarray(keep, dtype=np.int64)

    def _result(self, z, targets, m0, batch, hit_cap, pool: _StepPool) -> StepResult:
        names = self.task_names
        realised = np.bincount([k for k, _, pad in batch if not pad], minlength=len(names))

        def per_task(values, cast=float):
            return {n: cast(v) for n, v in zip(names, values, strict=True)}

        gen = pool.generated
        rates = np.divide(pool.filtered, gen, out=np.zeros(len(names)), where=gen > 0)
        zrates = np.divide(pool.zero_adv, gen, out=np.zeros(len(names)), where=gen > 0)
        result = StepResult(
            step=self.step,
            batch=[g for _, g, _ in batch],
            padded=[pad for _, _, pad in batch],
            targets=per_task(targets, int),
            realised_counts=per_task(realised, int),
            rounds=len(pool.requests),
            hit_cap=hit_cap,
            generated=per_task(gen, int),
            filtered=per_task(pool.filtered, int),
            filtered_rates=per_task(rates),
            zero_adv_rates=per_task(zrates),
            rho=per_task(self.rho),
            inflation=per_task(m0),
            weights=per_task(z),
            requests=pool.requests,
            accepted_counts=pool.accepted_counts,
            dropped=per_task(pool.dropped, int),
        )
        self.step += 1
        return result

    # ---- state -----------------------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        """JSON-able: the step (which with the seed fixes all randomness) and ``rho``."""
        return {
            "format": _STATE_FORMAT,
            "seed": self.seed,
            "step": self.step,
            "rho": {n: float(r) for n, r in zip(self.task_names, self.rho, strict=True)},
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restores ``get_state()`` output."""
        if not isinstance(state, Mapping) or state.get("format") != _STATE_FORMAT:
            raise ValueError(f"state is not a {_STATE_FORMAT} dict (from get_state)")
        if state["seed"] != self.seed:
            raise ValueError(f"state was saved with seed {state['seed']}, sampler has {self.seed}")
        rho = state["rho"]
        if list(rho) != list(self.task_names):
            raise ValueError(f"state has tasks {list(rho)}, sampler {list(self.task_names)}")
        values = np.asarray([rho[n] for n in self.task_names], dtype=np.float64)
        if not np.all((values >= 0) & (values <= 1)):
            raise ValueError(f"state['rho'] must lie in [0, 1], got {values.tolist()}")
        self.step = _check_int("state['step']", state["step"], minimum=0)
        self.rho = values
