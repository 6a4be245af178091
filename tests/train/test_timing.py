"""Stage times of the training loop: measured where each stage happens, adding up to the wall.

A fake clock drives :class:`StageClock` through an overlapped timeline (the next rollout starts
on the host while the update still runs); a nano-model run with controlled sleeps in the
verifier and on the device checks that the logged stage times add up to the run's wall time.
"""

import io
import json
import threading
import time

import jax
import jax.numpy as jnp
import pytest

from jaxgrpo.config import load_config
from jaxgrpo.train import loop
from jaxgrpo.train.timing import StageClock
from tests.train.conftest import tiny_overrides


class _Ready:
    """Stands for an update's outputs: ready when the test says so."""

    def __init__(self):
        self.event = threading.Event()

    def block_until_ready(self):
        self.event.wait(timeout=10)
        return self


def test_stage_times_follow_an_overlapped_timeline():
    now = [0.0]
    sc = StageClock(clock=lambda: now[0])

    def verify_until(t):
        def fn():
            now[0] = t
        return sc.timed("verify", fn)

    # step 0: rollout 0-3 (verifier 1-2), update dispatched at 3.5, done at 6
    sc.begin(0)
    now[0] = 1.0
    verify_until(2.0)()
    now[0] = 3.0
    sc.rollout_done()
    now[0] = 3.5
    out0 = _Ready()
    sc.dispatched(out0)
    now[0] = 4.0  # the host starts step 1 while update 0 runs ...
    sc.begin(1)
    now[0] = 6.0  # ... and its generation waits for update 0, done at 6
    out0.event.set()
    t0 = sc.times(0)
    assert t0 == {"time/rollout_s": 2.0, "time/verify_s": 1.0, "time/update_s": 3.0,
                  "time/eval_s": 0.0, "time/checkpoint_s": 0.0, "time/step_s": 6.0}
    now[0] = 7.0
    verify_until(8.0)()
    now[0] = 9.0
    sc.rollout_done()
    out1 = _Ready()
    sc.dispatched(out1)
    now[0] = 12.0
    out1.event.set()
    sc._steps[1]["watch"].join()  # the watcher reads the clock at 12
    now[0] = 12.5
    sc.timed("eval", lambda: now.__setitem__(0, 14.0))()  # an evaluation after update 1
    t1 = sc.times(1)
    # step 1 owns 6-12: its rollout counts from 6 (not from its start at 4), less the verifier
    assert t1 == {"time/rollout_s": 2.0, "time/verify_s": 1.0, "time/update_s": 3.0,
                  "time/eval_s": 1.5, "time/checkpoint_s": 0.0, "time/step_s": 6.0}
    # step 2: a checkpoint called at 15, while update 2 runs (done at 16), waits for it
    sc.begin(2)
    now[0] = 14.5
    sc.rollout_done()
    out2 = _Ready()
    sc.dispatched(out2)
    now[0] = 15.0

    def save():
        now[0] = 16.0
        out2.event.set()
        sc._steps[2]["watch"].join()  # the update ends at 16 ...
        now[0] = 17.0  # ... and the checkpoint writes until 17

    sc.timed("checkpoint", save)()
    t2 = sc.times(2)
    assert t2["time/update_s"] == 1.5 and t2["time/checkpoint_s"] == 1.0  # not 2.0: no overlap
    with pytest.raises(ValueError, match="stage must be one of"):
        sc.timed("sleep", lambda: None)


VERIFY_S, UPDATE_S = 0.15, 0.3


def test_logged_stage_times_add_up_to_the_wall_time_of_a_run(nano_model, tmp_path, monkeypatch):
    score = loop.score_many

    def slow_score(*args, **kwargs):
        time.sleep(VERIFY_S)
        return score(*args, **kwargs)

    make = loop.make_train_step

    def slow_make(*args, **kwargs):
        step = make(*args, **kwargs)

        def sleep(x):
            time.sleep(UPDATE_S)
            return x

        @jax.jit
        def delay(state, metrics):  # the new state waits UPDATE_S more on the device
            z = jax.pure_callback(sleep, jax.ShapeDtypeStruct((), jnp.float32),
                                  metrics["loss/total"]) * 0.0
            return state.replace(params=jax.tree.map(lambda p: p + z.astype(p.dtype),
                                                     state.params)), {**metrics, "delay": z}

        return lambda state, batch: delay(*step(state, batch))

    monkeypatch.setattr(loop, "score_many", slow_score)
    monkeypatch.setattr(loop, "make_train_step", slow_make)
    cfg = load_config(None, tiny_overrides(tmp_path, **{"train.steps": 4}))
    summary = loop.run(cfg, stream=io.StringIO())
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    rows = [r for r in rows if "time/step_s" in r]
    assert len(rows) == 4
    wall = summary["train_loop_s"]
    stages = sum(r[f"time/{s}_s"] for r in rows
                 for s in ("rollout", "verify", "update", "eval", "checkpoint"))
    assert stages == pytest.approx(wall, rel=0.05)
    assert sum(r["time/step_s"] for r in rows) == pytest.approx(wall, rel=0.05)
    for r in rows:
        assert r["time/verify_s"] >= VERIFY_S and r["time/update_s"] >= UPDATE_S
        assert r["perf/update_mfu"] > 0 and r["perf/mfu"] > 0
