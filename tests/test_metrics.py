"""Metric writers, the non-finite guard, the progress bar and the per-task/MFU helpers."""

import io
import json
import math
import struct

import jax.numpy as jnp
import numpy as np
import pytest

from jaxgrpo import metrics as M


def test_jsonl_round_trip_with_numpy_jax_and_nonfinite(tmp_path):
    path = tmp_path / "logs" / "metrics.jsonl"
    w = M.JsonlWriter(path)
    assert isinstance(w, M.MetricWriter)
    w.write_scalars(1, {"loss/policy": np.float32(0.5), "task/add/accuracy": jnp.array(0.25),
                        "grad/global_norm": 3})
    w.write_scalars(2, {"loss/policy": float("nan"), "grad/global_norm": float("inf")})
    w.write_hparams({"optim.lr": 1e-6, "loss.estimator": "grpo"})
    w.close()
    recs = M.read_jsonl(path)
    assert [r["step"] for r in recs] == [1, 2]
    assert recs[0]["loss/policy"] == 0.5 and recs[0]["task/add/accuracy"] == 0.25
    assert recs[0]["grad/global_norm"] == 3.0 and isinstance(recs[0]["time"], float)
    assert math.isnan(recs[1]["loss/policy"]) and recs[1]["grad/global_norm"] == math.inf
    assert json.loads((tmp_path / "logs" / "hparams.json").read_text())["optim.lr"] == 1e-6
    with pytest.raises(ValueError, match="closed"):
        w.write_scalars(3, {"x": 1.0})


def test_jsonl_rejects_non_scalars_naming_the_key(tmp_path):
    w = M.JsonlWriter(tmp_path / "m.jsonl")
    with pytest.raises(ValueError, match="metric 'adv' must be a scalar"):
        w.write_scalars(0, {"adv": np.zeros(3)})
    w.close()


def test_jsonl_resume_drops_steps_after_the_checkpoint(tmp_path):
    path = tmp_path / "m.jsonl"
    w = M.JsonlWriter(path)
    for s in range(1, 6):
        w.write_scalars(s, {"x": float(s)})
    w.close()
    w = M.JsonlWriter(path, resume_step=3)
    w.write_scalars(4, {"x": 40.0})
    w.close()
    assert [(r["step"], r["x"]) for r in M.read_jsonl(path)] == [(1, 1), (2, 2), (3, 3), (4, 40)]


def test_read_jsonl_tolerates_a_torn_last_line_only(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"step": 1, "x": 1}\n{"step": 2, "x"')
    assert M.read_jsonl(p) == [{"step": 1, "x": 1}]
    p.write_text('{"step": 1\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 1"):
        M.read_jsonl(p)


def test_tensorboard_and_multi_writer(tmp_path):
    tb = M.TensorBoardWriter(tmp_path / "tb")
    js = M.JsonlWriter(tmp_path / "m.jsonl")
    w = M.MultiWriter([tb, js])
    w.write_hparams({"a": 1})
    w.write_scalars(7, {"loss/policy": 1.5})
    w.flush()
    w.close()
    assert M.read_jsonl(tmp_path / "m.jsonl")[0]["loss/policy"] == 1.5
    assert _tb_scalars(tmp_path / "tb") == [("loss/policy", 7, 1.5)]


def _tb_scalars(logdir):
    """(tag, step, value) of every scalar in the event files: TFRecord framing, Event protos."""
    from tensorboardX.proto import event_pb2

    out = []
    files = sorted(logdir.glob("events.out.tfevents.*"))
    assert files, f"no event file in {logdir}"
    for f in files:
        data = f.read_bytes()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            ev = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            out += [(v.tag, ev.step, v.simple_value) for v in ev.summary.value
                    if v.HasField("simple_value")]
    return out


def test_guard_skips_counts_and_stops_after_max_consecutive():
    g = M.NonFiniteGuard(3)
    assert g.check(1, {"loss/total": 0.1, "grad/global_norm": 1.0})
    # non-finite metrics outside the checked namespaces do not count
    assert g.check(2, {"loss/total": 0.1, "task/add/accuracy": float("nan")})
    assert not g.check(3, {"loss/total": float("nan"), "grad/global_norm": 1.0})
    assert not g.check(4, {"loss": 0.1, "grad/global_norm": float("inf")})
    assert g.metrics() == {"nonfinite/consecutive": 2.0, "nonfinite/skipped_total": 2.0}
    assert g.check(5, {"loss/total": 0.2})  # a good step resets the run
    assert g.consecutive == 0 and g.total == 2
    assert not g.check(6, {"loss/total": np.float32("nan")})
    assert not g.check(7, {"loss/total": float("nan")})
    with pytest.raises(M.NonFiniteError) as info:
        g.check(8, {"loss/total": float("nan"), "grad/global_norm": float("inf"),
                    "loss/kl": 0.0})
    msg = str(info.value)
    assert "step 8" in msg and "grad/global_norm=inf" in msg and "loss/total=nan" in msg
    assert "loss/kl" not in msg and "3 consecutive" in msg and "checkpoint is intact" in msg
    assert g.total == 5


def test_guard_state_round_trip_and_bad_args():
    g = M.NonFiniteGuard(2)
    g.check(1, {"loss": float("nan")})
    h = M.NonFiniteGuard(2)
    h.set_state(json.loads(json.dumps(g.get_state())))
    with pytest.raises(M.NonFiniteError, match="step 2"):
        h.check(2, {"loss": float("nan")})
    with pytest.raises(ValueError, match="max_consecutive"):
        M.NonFiniteGuard(0)
    with pytest.raises(ValueError, match="keys"):
        M.NonFiniteGuard(2, keys="loss")


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_progress_bar_not_a_tty_prints_every_n_steps_with_rate_and_eta():
    out, clock = io.StringIO(), _Clock()
    bar = M.ProgressBar(100, every=25, stream=out, clock=clock, keys=("loss/policy", "absent"))
    for step in range(1, 101):
        clock.t = step * 0.5
        bar.update(step, {"loss/policy": 1.0 / step})
    lines = out.getvalue().splitlines()
    assert len(lines) == 4
    assert lines[0] == "step 25/100 25% | 2.00 step/s | ETA 0:38 | loss/policy 0.04"
    assert lines[-1].startswith("step 100/100 100% | 2.00 step/s | ETA 0:00")
    assert "\r" not in out.getvalue()


def test_progress_bar_resumed_rate_and_tty_redraw():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out, clock = Tty(), _Clock()
    bar = M.ProgressBar(4000, initial=1000, stream=out, clock=clock, min_interval=1.0)
    clock.t = 10.0
    bar.update(1010)
    clock.t = 10.5  # within min_interval: not redrawn
    bar.update(1011)
    assert out.getvalue().count("\r") == 1
    assert "1.00 step/s" in out.getvalue() and "ETA 49:50" in out.getvalue()
    clock.t = 20.0
    bar.update(4000)
    assert out.getvalue().endswith("\n") and out.getvalue().count("\r") == 2
    with pytest.raises(ValueError, match="total"):
        M.ProgressBar(0)


def _per_task_reference(names, r, c, n, v):
    out = {}
    for t in dict.fromkeys(names):
        rs, cs, ls, zs, prompts = [], [], [], [], 0
        for p in range(len(names)):
            if names[p] != t:
                continue
            prompts += 1
            vals = [r[p][g] for g in range(len(r[p])) if v[p][g]]
            zs.append(1.0 if len(set(vals)) <= 1 else 0.0)
            for g in range(len(r[p])):
                if v[p][g]:
                    rs.append(r[p][g])
                    cs.append(float(c[p][g]))
                    ls.append(n[p][g])
        out[f"task/{t}/prompts"] = prompts
        out[f"task/{t}/reward_mean"] = sum(rs) / len(rs)
        out[f"task/{t}/accuracy"] = sum(cs) / len(cs)
        out[f"task/{t}/zero_adv_frac"] = sum(zs) / len(zs)
        out[f"task/{t}/length_mean"] = sum(ls) / len(ls)
        out[f"task/{t}/length_max"] = max(ls)
    return out


def test_per_task_metrics_against_a_loop_reference():
    rng = np.random.default_rng(0)
    names = ["add", "rev", "add", "cd", "rev", "add"]
    r = rng.choice([0.0, 0.1, 1.0], size=(6, 4))
    r[0] = 1.0  # all equal: a zero-advantage group
    r[3] = [0.0, 1.0, 0.0, 0.0]
    c = r >= 1.0
    n = rng.integers(1, 30, size=(6, 4))
    v = rng.random((6, 4)) > 0.2
    v[3] = [True, False, True, True]  # only the valid rewards decide zero advantage
    got = M.per_task_metrics(names, r, c, n, v)
    want = _per_task_reference(names, r, c, n, v)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-12, err_msg=k)
    assert got["task/cd/zero_adv_frac"] == 1.0
    with pytest.raises(ValueError, match="lengths_PxG must have shape"):
        M.per_task_metrics(names, r, c, n[:, :2])
    with pytest.raises(ValueError, match="task_names must have P=6"):
        M.per_task_metrics(names[:5], r, c, n)


def test_jsonl_on_a_uri_is_staged_and_uploaded_on_flush_and_close(fake_gcs):
    import pathlib

    uri = "gs://bucket/run/metrics.jsonl"
    remote = pathlib.Path(fake_gcs) / "bucket" / "run" / "metrics.jsonl"
    w = M.JsonlWriter(uri, sync_every_s=1e9)
    assert w.path == uri and remote.read_text() == ""
    w.write_hparams({"optim.lr": 1e-6})
    w.write_scalars(1, {"loss/policy": 0.5})
    assert remote.read_text() == ""  # not yet due
    w.flush()
    assert [r["step"] for r in M.read_jsonl(uri)] == [1]
    w.write_scalars(2, {"loss/policy": 0.25})
    w.write_scalars(3, {"loss/policy": 0.125})
    w.close()
    assert [r["step"] for r in M.read_jsonl(uri)] == [1, 2, 3]
    assert json.loads((remote.parent / "hparams.json").read_text())["optim.lr"] == 1e-6
    # A resumed run at step 2 drops step 3 (written after that checkpoint) and appends.
    w = M.JsonlWriter(uri, resume_step=2, sync_every_s=0)
    assert [r["step"] for r in M.read_jsonl(uri)] == [1, 2]
    w.write_scalars(3, {"loss/policy": 1.0})  # due at once: uploaded by the write
    assert [(r["step"], r["loss/policy"]) for r in M.read_jsonl(uri)][-1] == (3, 1.0)
    w.close()


def test_tensorboard_on_a_uri_uploads_the_event_file(fake_gcs):
    import pathlib

    uri = "gs://bucket/run/tb"
    tb = M.TensorBoardWriter(uri, sync_every_s=1e9)
    assert tb.logdir == uri
    tb.write_hparams({"a": 1})
    tb.write_scalars(7, {"loss/policy": 1.5})
    remote = pathlib.Path(fake_gcs) / "bucket" / "run" / "tb"
    assert not remote.exists()  # not yet due
    tb.flush()  # uploads what tensorboardX has written so far (it writes from a queue)
    assert len(list(remote.glob("events.out.tfevents.*"))) == 1
    tb.write_scalars(8, {"loss/policy": 2.5})
    tb.close()  # everything queued is written, then uploaded
    assert _tb_scalars(remote) == [("loss/policy", 7, 1.5), ("loss/policy", 8, 2.5)]


def test_heartbeat_speaks_after_each_silence_and_passes_writes_through():
    out, clock = io.StringIO(), _Clock()
    with M.Heartbeat(out, every_s=10.0, clock=clock, phase="compiling the train step") as hb:
        clock.t = 9.0
        hb.tick()
        assert out.getvalue() == ""
        clock.t = 10.0  # ten seconds of silence (the thread or this call prints it, once)
        hb.tick()
        hb.tick()
        assert out.getvalue() == "[jaxgrpo] compiling the train step ... (0:10 since start)\n"
        clock.t = 15.0
        print("step 1/200", file=hb)  # any write restarts the silence
        clock.t = 24.0
        hb.tick()
        assert out.getvalue().splitlines()[-1] == "step 1/200"
        hb.phase = "RL step 2/200: rollouts"
        clock.t = 25.0
        hb.tick()
        assert out.getvalue().splitlines()[-1] == (
            "[jaxgrpo] RL step 2/200: rollouts ... (0:25 since start)")
        assert not hb.isatty()
    assert not hb._thread.is_alive()
    M.set_phase(out, "ignored")  # a plain stream: nothing happens
    with pytest.raises(ValueError, match="every_s"):
        M.Heartbeat(out, every_s=0)
    # The first line may come sooner than the rest (`jaxgrpo train` speaks after 2 s).
    out, clock = io.StringIO(), _Clock()
    with M.Heartbeat(out, every_s=10.0, first_s=2.0, clock=clock, phase="importing") as hb:
        clock.t = 1.9
        hb.tick()
        assert out.getvalue() == ""
        clock.t = 2.0
        hb.tick()
        assert out.getvalue() == "[jaxgrpo] importing ... (0:02 since start)\n"
        clock.t = 11.9
        hb.tick()
        assert out.getvalue().count("\n") == 1
        clock.t = 12.0
        hb.tick()
        assert out.getvalue().count("\n") == 2
