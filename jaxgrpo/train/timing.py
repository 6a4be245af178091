"""Wall-clock stages of the training loop, measured where they happen, without a device sync.

Device work is asynchronous: the train step returns as soon as it is dispatched, and the next
step's rollout starts on the host while the update still runs (its generation then waits for the
new parameters). Timing a stage on the host around its call would charge the update's tail to
the next rollout. Instead, every update's completion time is taken by a watcher thread that
waits on the step's outputs (``jax.block_until_ready`` blocks that thread only), and the times
are read one step late, when the step's metrics are fetched anyway.

Step ``s`` owns the wall-clock interval from the end of update ``s - 1`` (the first step: from
its start) to the end of update ``s``, so the steps' times add up to the wall time of the loop.
Within it:

- ``rollout``: the batch sampler's rounds (prompt drawing, generation, decoding), from the later
  of the step's start and the end of the previous update, less the verifier time;
- ``verify``: the verifier calls (the stage's intervals, see :meth:`StageClock.timed`);
- ``update``: from the end of the rollout to the end of the update (advantages, batch assembly
  and transfer, the jitted step);
- ``eval`` and ``checkpoint``: the periodic evaluation and checkpoint after the update, from the
  end of the update (they may be called while it still runs, and then wait for it); they fall in
  the next step's interval, and are reported with the step that ran them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import jax

STAGES = ("rollout", "verify", "update", "eval", "checkpoint")


class StageClock:
    """Per-step stage times (seconds); see the module docstring for what each one covers.

    ``clock`` is a monotonic clock in seconds (injectable for tests).
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self._steps: dict[int, dict] = {}
        self._last_done: float | None = None  # end of the last update whose times were read
        self._current: int | None = None

    def begin(self, step: int) -> None:
        """The loop starts step ``step`` (its rollout comes next)."""
        self._steps[step] = {"start": self.clock(), "intervals": {s: [] for s in STAGES}}
        self._current = step

    def timed(self, stage: str, fn: Callable) -> Callable:
        """``fn`` with each call's interval added to ``stage`` of the current step (its result
        waited for: a host stage's outputs are needed at once anyway)."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")

        def wrapped(*args, **kwargs):
            t0 = self.clock()
            try:
                return jax.block_until_ready(fn(*args, **kwargs))
            finally:
                self._steps[self._current]["intervals"][stage].append((t0, self.clock()))

        return wrapped

    def rollout_done(self) -> None:
        """The step's batch is chosen: the rollout ends and the update begins."""
        self._steps[self._current]["rollout_end"] = self.clock()

    def dispatched(self, outputs) -> None:
        """The step's update was dispatched; ``outputs`` (e.g. its metrics) are ready when it
        has finished. A thread records that moment; the loop does not wait."""
        rec = self._steps[self._current]
        done = {}

        def watch():
            try:
                jax.block_until_ready(outputs)
            finally:
                done["t"] = self.clock()

        rec["watch"] = threading.Thread(target=watch, daemon=True, name="stage-clock")
        rec["done"] = done
        rec["watch"].start()

    def times(self, step: int) -> dict[str, float]:
        """``{"time/<stage>_s": seconds, "time/step_s": ...}`` of ``step`` (waits for its
        update to finish, if it has not already). Steps are read in order, each once."""
        rec = self._steps.pop(step)
        rec["watch"].join()
        done = rec["done"]["t"]
        begin = rec["start"] if self._last_done is None else self._last_done
        self._last_done = done
        # An evaluation or checkpoint after the update may start before the update is done
        # (it then waits for the new state): only its time after the update counts.
        after = {"verify": begin, "rollout": begin, "update": begin, "eval": done,
                 "checkpoint": done}
        spans = {s: sum(max(0.0, b - max(a, after[s])) for a, b in rec["intervals"][s])
                 for s in STAGES}
        rollout_end = rec["rollout_end"]
        return {
            "time/rollout_s": max(0.0, rollout_end - max(rec["start"], begin)) - spans["verify"],
            "time/verify_s": spans["verify"],
            "time/update_s": done - max(rollout_end, begin),
            "time/eval_s": spans["eval"],
            "time/checkpoint_s": spans["checkpoint"],
            "time/step_s": done - begin,
        }
