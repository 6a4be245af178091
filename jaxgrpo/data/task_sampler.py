"""Host-side multi-task prompt sampler: exact per-task counts, sharded, deterministic, resumable.

How one draw works:

1. **Per-task counts.** ``next_batch()`` uses the fixed targets ``largest_remainder(ratios,
   global_batch)``; ``draw(counts)`` takes any per-task counts (MT-GRPO's ratio-preserving
   sampler changes them every step and every resampling round).
2. **Per-task streams.** Task ``k`` reads an endless stream ``position -> record index``: epoch
   ``e`` covers positions ``[e*n_k, (e+1)*n_k)`` and is a fresh permutation of ``range(n_k)``
   seeded by ``(seed, crc32(task name), e)``, so every record appears exactly once per epoch and
   adding or reordering tasks leaves the other streams unchanged. The permutation of the
   current epoch is cached (O(n_k) once per epoch, O(1) per item). grain's lazy
   ``MapDataset.shuffle`` computes the same kind of per-epoch permutation element by element, but
   reading an epoch through it costs 190x (10,000 records) to 10,000x (20 records) more per
   record than this cached permutation (``benchmarks/grain_shuffle.py``, one run on a shared
   CPU: ``benchmarks/results/data/grain_shuffle.json``), which made small tasks dominate the
   step; and its iterators (``mix``, ``batch``) fix proportions, not the exact
   per-step-variable counts needed here. So this module is plain numpy index arithmetic and imports neither grain nor jax.
3. **Global schedule.** Each task keeps one *global* cursor. A draw of ``c_k`` takes the next
   ``c_k`` positions of task ``k``. Every host computes the same schedule and keeps only its
   slice, so hosts never duplicate a record and nothing is skipped.
4. **Host split.** ``c_k = q_k*P + r_k`` with ``P = process_count``: every host gets ``q_k`` of
   task ``k``; the ``r_k`` leftovers of all tasks, in task order, are dealt round-robin to hosts
   ``(j + step) % P`` (``j`` counts leftovers within the draw, ``step`` rotates who starts).
   Since ``sum_k c_k`` divides by ``P``, every host gets the same number of items, and each host
   holds ``q_k`` or ``q_k + 1`` items of each task. Host ``h`` takes the ``h``-th contiguous
   piece of each task's positions. The local batch lists tasks in order, positions ascending;
   concatenating the local batches of hosts ``0..P-1`` gives the global batch, the row order of
   ``jax.make_array_from_process_local_data``.
5. **State.** ``{step, cursor per task}``: JSON-able and independent of the host count, so a
   run can resume on a different number of hosts.

With ``next_batch()`` only, ``cursor_k = step * target_k``: a batch is a pure function of
``(seed, step)``.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

_STATE_FORMAT = "jaxgrpo.TaskSampler/1"
_RATIO_TOL = 1e-5


def _check_int(name: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _normalized(values: Sequence[float], name: str) -> np.ndarray:
    """Validates non-negative finite weights that sum to 1 (within 1e-5) and renormalises them."""
    w = np.asarray(values, dtype=np.float64)
    if w.ndim != 1 or w.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D list of floats, got shape {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"{name} must be finite and non-negative, got {w.tolist()}")
    total = float(w.sum())
    if abs(total - 1.0) > _RATIO_TOL:
        raise ValueError(
            f"{name} must sum to 1 (got {total:.6g}); normalise them, e.g. divide by their sum"
        )
    return w / total


def largest_remainder(
    ratios: Mapping[str, float] | Sequence[float], total: int
) -> dict[str, int] | list[int]:
    """Integer counts with exactly ``total`` items, each within 1 of its share ``ratio_k * total``.

    Hamilton's largest-remainder rounding: ``count_k = floor(ratio_k * total)``, then the
    ``total - sum_k floor(.)`` leftover units go to the largest fractional parts. Ties (fractional
    parts equal to 9 decimals) go to the task listed first, so the result is deterministic.

    Args:
      ratios: per-task shares, non-negative, summing to 1 (within 1e-5; renormalised exactly).
        A mapping gives a dict with the same keys in the same order; a sequence gives a list.
      total: the number of items to allocate, ``>= 0``.

    Returns:
      Non-negative counts that sum to ``total`` exactly, ``|count_k - ratio_k*total| < 1``.

    Example:
      >>> largest_remainder({"a": 0.5, "b": 0.3, "c": 0.2}, 7)
      {'a': 4, 'b': 2, 'c': 1}
    """
    total = _check_int("total", total, minimum=0)
    keys = list(ratios.keys()) if isinstance(ratios, Mapping) else None
    w = _normalized(list(ratios.values()) if keys is not None else list(ratios), "ratios")
    exact = w * total
    counts = np.floor(exact).astype(np.int64)
    leftover = total - int(counts.sum())
    # Rounded so that float noise (0.3*5 = 1.4999...) cannot break a true tie.
    frac = np.round(exact - counts, 9)
    order = sorted(range(len(w)), key=lambda k: (-frac[k], k))
    for k in order[:leftover]:
        counts[k] += 1
    out = [int(c) for c in counts]
    return dict(zip(keys, out, strict=True)) if keys is not None else out


@dataclasses.dataclass(frozen=True)
class Item:
    """One drawn prompt.

    Attributes:
      task: the task name.
      index: the record's index in its task's source.
      record: ``source[index]``, the record itself.
      uid: ``"<task>@<position>"``, unique over the run.
      position: the global stream position; ``epoch = position // len(source)``.
    """

    task: str
    index: int
    record: Mapping[str, Any]
    uid: str
    position: int


class TaskSampler:
    """Draws this host's share of multi-task prompt batches with exact per-task counts.

    See the module docstring for the stream, the host split and the state.

    Args:
      sources: task name -> records (``len`` and ``__getitem__``, deterministic, non-empty).
        Task order is the mapping's order.
      ratios: task name -> share (or a sequence in task order), summing to 1; ``None`` means
        uniform. Only ``next_batch`` uses them.
      global_batch: prompts per ``next_batch`` over all hosts; must divide by ``process_count``.
      seed: non-negative int; the streams are a function of ``(seed, task name)``.
      process_index: this host, ``0 <= process_index < process_count`` (``jax.process_index()``).
      process_count: number of hosts (``jax.process_count()``).

    Example:
      >>> s = TaskSampler({"a": [{"q": i} for i in range(5)], "b": [{"q": 9}]},
      ...                 {"a": 0.75, "b": 0.25}, global_batch=4, seed=0)
      >>> [it.task for it in s.next_batch()]
      ['a', 'a', 'a', 'b']
    """

    def __init__(
        self,
        sources: Mapping[str, Sequence[Mapping[str, Any]]],
        ratios: Mapping[str, float] | Sequence[float] | None = None,
        *,
        global_batch: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if not isinstance(sources, Mapping) or not sources:
            raise ValueError("sources must be a non-empty mapping of task name -> records")
        for name, src in sources.items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"sources: task names must be non-empty strings, got {name!r}")
            if not (hasattr(src, "__len__") and hasattr(src, "__getitem__")):
                raise TypeError(f"sources[{name!r}] must be a sequence (len and [i])")
            if len(src) == 0:
                raise ValueError(f"sources[{name!r}] is empty: every task needs >= 1 record")
        self._sources = dict(sources)
        self.task_names: tuple[str, ...] = tuple(self._sources)
        self.seed = _check_int("seed", seed, minimum=0)
        self.process_count = _check_int("process_count", process_count, minimum=1)
        self.process_index = _check_int("process_index", process_index, minimum=0)
        if self.process_index >= self.process_count:
            raise ValueError(
                f"process_index must be < process_count ({self.process_count}), "
                f"got {self.process_index}"
            )
        self.global_batch = _check_int("global_batch", global_batch, minimum=1)
        if self.global_batch % self.process_count:
            raise ValueError(
                f"global_batch ({self.global_batch}) must divide by process_count "
                f"({self.process_count}): every host needs an equal local share"
            )
        if ratios is None:
            ratios = [1.0 / len(self.task_names)] * len(self.task_names)
        self.ratios: dict[str, float] = self._ratio_dict(ratios)
        self.targets: dict[str, int] = largest_remainder(self.ratios, self.global_batch)
        self._crc = {name: zlib.crc32(name.encode("utf-8")) for name in self.task_names}
        self._perm_cache: dict[tuple[str, int], np.ndarray] = {}
        self.step = 0
        self._cursor = dict.fromkeys(self.task_names, 0)

    # ---- configuration helpers -------------------------------------------------------------

    def _ratio_dict(self, ratios) -> dict[str, float]:
        if isinstance(ratios, Mapping):
            unknown = [k for k in ratios if k not in self._sources]
            if unknown:
                raise ValueError(f"ratios name unknown tasks {unknown}; tasks: {self.task_names}")
            missing = [k for k in self.task_names if k not in ratios]
            if missing:
                raise ValueError(f"ratios lack tasks {missing}; give every task a share (0 is ok)")
            values = [ratios[k] for k in self.task_names]
        else:
            values = list(ratios)
            if len(values) != len(self.task_names):
                raise ValueError(
                    f"ratios has {len(values)} entries for {len(self.task_names)} tasks "
                    f"{self.task_names}"
                )
        w = _normalized(values, "ratios")
        return dict(zip(self.task_names, (float(x) for x in w), strict=True))

    def _permutation(self, name: str, epoch: int) -> np.ndarray:
        key = (name, epoch)
        if key not in self._perm_cache:
            if len(self._perm_cache) >= 2 * len(self.task_names):  # keep about 2 epochs per task
                self._perm_cache.pop(next(iter(self._perm_cache)))
            rng = np.random.default_rng([self.seed, self._crc[name], epoch])
            self._perm_cache[key] = rng.permutation(len(self._sources[name]))
        return self._perm_cache[key]

    def _check_counts(self, counts: Mapping[str, int]) -> dict[str, int]:
        if not isinstance(counts, Mapping):
            raise TypeError(f"counts must be a mapping task -> int, got {type(counts).__name__}")
        unknown = [k for k in counts if k not in self._sources]
        if unknown:
            raise ValueError(f"counts name unknown tasks {unknown}; tasks: {self.task_names}")
        out = {k: _check_int(f"counts[{k!r}]", counts.get(k, 0), minimum=0)
               for k in self.task_names}
        total = sum(out.values())
        if total % self.process_count:
            up = math.ceil(total / self.process_count) * self.process_count
            raise ValueError(
                f"counts sum to {total}, which does not divide by process_count "
                f"({self.process_count}); request a multiple, e.g. {up}"
            )
        return out

    # ---- drawing ---------------------------------------------------------------------------

    def host_shares(self, counts: Mapping[str, int], step: int | None = None) -> np.ndarray:
        """Per-task, per-host item counts ``[K, P]`` of a draw (step 4 of the module docstring)."""
        c = self._check_counts(counts)
        step = self.step if step is None else step
        p = self.process_count
        shares = np.zeros((len(self.task_names), p), dtype=np.int64)
        j = step
        for k, name in enumerate(self.task_names):
            q, r = divmod(c[name], p)
            shares[k, :] = q
            for _ in range(r):
                shares[k, j % p] += 1
                j += 1
        return shares

    def draw(self, counts: Mapping[str, int]) -> list[Item]:
        """Draws ``counts[task]`` prompts per task over all hosts; returns this host's share.

        Args:
          counts: task -> global count (missing tasks draw 0). The sum must divide by
            ``process_count``.

        Returns:
          This host's ``sum(counts) / process_count`` items, tasks in order, positions ascending.
        """
        c = self._check_counts(counts)
        shares = self.host_shares(c)
        h = self.process_index
        items: list[Item] = []
        for k, name in enumerate(self.task_names):
            positions = self._take(name, c[name])
            start = int(shares[k, :h].sum())
            for pos in positions[start : start + int(shares[k, h])]:
                items.append(self._item(name, pos))
        self.step += 1
        return items

    def next_batch(self) -> list[Item]:
        """This host's share of the next batch with the fixed ``targets`` per task."""
        return self.draw(self.targets)

    def _take(self, name: str, count: int) -> range:
        positions = range(self._cursor[name], self._cursor[name] + count)
        self._cursor[name] += count
        return positions

    def _item(self, name: str, position: int) -> Item:
        epoch, offset = divmod(position, len(self._sources[name]))
        index = int(self._permutation(name, epoch)[offset])
        return Item(name, index, self._sources[name][index], f"{name}@{position}", position)

    # ---- state -----------------------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        """A JSON-able snapshot; ``set_state`` of it yields the identical next batches."""
        return {
            "format": _STATE_FORMAT,
            "seed": self.seed,
            "step": self.step,
            "tasks": {
                k: {
                    "size": len(self._sources[k]),
                    "cursor": self._cursor[k],
                }
                for k in self.task_names
            },
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restores ``get_state()`` output (possibly saved with another process_count)."""
        if not isinstance(state, Mapping) or state.get("format") != _STATE_FORMAT:
            raise ValueError(f"state is not a {_STATE_FORMAT} dict (from TaskSampler.get_state)")
        if state["seed"] != self.seed:
            raise ValueError(f"state was saved with seed {state['seed']}, this sampler has "
                             f"{self.seed}: build the sampler with the saved seed")
        tasks = state["tasks"]
        if list(tasks) != list(self.task_names):
            raise ValueError(f"state has tasks {list(tasks)}, this sampler {list(self.task_names)}")
        for k, t in tasks.items():
            if t["size"] != len(self._sources[k]):
                raise ValueError(f"state: task {k!r} had {t['size']} records, now "
                                 f"{len(self._sources[k])}: the source changed")
            _check_int(f"state['tasks'][{k!r}]['cursor']", t["cursor"], minimum=0)
            if t.get("returned"):  # earlier versions saved an empty list
                raise ValueError(f"state: task {k!r} lists returned positions; this sampler "
                                 "does not serve given-back prompts")
        self.step = _check_int("state['step']", state["step"], minimum=0)
        self._cursor = {k: int(t["cursor"]) for k, t in tasks.items()}
