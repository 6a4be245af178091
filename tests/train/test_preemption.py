"""SIGTERM at a random point of a real run (the ``jaxgrpo train`` command in a subprocess) saves
a checkpoint and exits 0; ``--resume auto`` then finishes the run, and the result is the
uninterrupted run's, bit for bit: the exported parameters, the samplers' state, every metric."""

import json
import os
import pathlib
import random
import signal
import socket
import subprocess
import sys
import time

import pytest

from jaxgrpo.checkpoint import Checkpointer
from tests.train.conftest import tiny_overrides

ENTRY = pathlib.Path(__file__).with_name("cli_entry.py")
STEPS = 16
UNTIMED = ("time", "time/", "perf/")


def _overrides(workdir, **extra):
    return tiny_overrides(workdir, **{"train.steps": STEPS, "checkpoint.every": 0,
                                      "optim.lr": 3e-2, **extra})


def _env(cache, devices=None):
    env = dict(os.environ, PYTHONPATH=str(ENTRY.parents[2]), JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    if devices:
        env["JAXGRPO_TEST_CPU_DEVICES"] = str(devices)
    return env


def _start(args, env, cwd):
    """The command in a subprocess, its output in files (a full pipe would block one process
    of a pair mid-collective)."""
    logs = pathlib.Path(cwd) / "logs"
    logs.mkdir(exist_ok=True)
    n = len(list(logs.iterdir()))
    out, err = (open(logs / f"{n:02d}.{s}", "w+") for s in ("out", "err"))
    p = subprocess.Popen([sys.executable, str(ENTRY), "train", *args], cwd=cwd, env=env,
                         stdout=out, stderr=err, text=True)
    p.logs = (out, err)
    return p


def _finish(procs, timeout=600):
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = []
    for p in procs:
        texts = []
        for f in p.logs:
            f.seek(0)
            texts.append(f.read())
            f.close()
        results.append((p.returncode, *texts))
    return results


def _rows(workdir):
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _terminate_at_a_random_step(procs, workdir, rng, victims):
    """Waits until ``k`` steps are logged (``k`` random, early enough to leave steps to run),
    sleeps a random fraction of a step, then sends SIGTERM to ``victims``."""
    k = rng.randint(1, STEPS // 2 - 1)
    deadline = time.monotonic() + 600
    while len(_rows(workdir)) < k:
        assert all(p.poll() is None for p in procs), "the run ended before SIGTERM was sent"
        assert time.monotonic() < deadline, "no training step was logged in time"
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.3))
    for p in victims:
        p.send_signal(signal.SIGTERM)
    return k


def _saved_steps(workdir):
    return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir()
                  if p.name.isdigit())


def _checkpoint_meta(workdir, step):
    """The meta of checkpoint ``step`` of the run in ``workdir``, restored as a resume does:
    into the abstract train state of the run's saved config."""
    import tempfile

    import jax
    import yaml

    from jaxgrpo.config import config_from_dict
    from jaxgrpo.train import loop
    from jaxgrpo.train.policy import build_policy
    from jaxgrpo.train.state import split_model

    cfg = config_from_dict(yaml.safe_load((pathlib.Path(workdir) / "config.yaml").read_text()))
    with tempfile.TemporaryDirectory() as tmp:
        model, _ = build_policy(cfg.model, seed=cfg.train.seed, workdir=pathlib.Path(tmp))
    _, params = split_model(model)
    abstract = jax.eval_shape(lambda: loop.initial_state(cfg, params))
    with Checkpointer(pathlib.Path(workdir) / "checkpoints", create=False) as ck:
        return ck.restore(step, abstract_state=abstract)[1]


def _assert_same_run(cut, full):
    """Bitwise: the final parameters (HF export), sampler state in the last checkpoint, and
    every untimed metric of every step."""
    a = (pathlib.Path(cut) / "final_model" / "model.safetensors").read_bytes()
    b = (pathlib.Path(full) / "final_model" / "model.safetensors").read_bytes()
    assert a == b, "the resumed run's parameters differ from the uninterrupted run's"
    ma, mb = _checkpoint_meta(cut, STEPS), _checkpoint_meta(full, STEPS)
    for key in ("task_sampler", "batch_sampler"):
        assert ma[key] == mb[key], key
    ra, rb = _rows(cut), _rows(full)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == [*range(1, STEPS + 1), STEPS]
    for x, y in zip(ra, rb, strict=True):
        assert {k: v for k, v in x.items() if not k.startswith(UNTIMED)} == {
            k: v for k, v in y.items() if not k.startswith(UNTIMED)}, x["step"]
    assert any(r.get("grad/global_norm", 0) > 0 for r in rb), "nothing was learned"


def _check_preempted(results, workdir):
    for code, _, err in results:
        assert code == 0, err[-3000:]
    lead = results[0][2]  # process 0 logs
    assert "no checkpoint" in lead and "starting a fresh run" in lead, lead[-3000:]
    saved = _saved_steps(workdir)
    assert len(saved) == 1 and 1 <= saved[0] < STEPS, saved
    assert f"stopped after step {saved[0]} (SIGTERM)" in results[0][2], results[0][2][-3000:]
    assert not (pathlib.Path(workdir) / "final_model").exists()
    return saved[0]


@pytest.mark.slow  # three short CLI runs (3.6 min measured on 2 heavily shared cores)
def test_sigterm_saves_and_resume_auto_continues_bit_for_bit(tmp_path):
    rng = random.Random()
    seed = rng.randrange(2**32)
    rng.seed(seed)
    env = _env(tmp_path / "xla-cache")
    full, cut = tmp_path / "full", tmp_path / "cut"
    [(code, _, err)] = _finish([_start(_overrides(full), env, tmp_path)])
    assert code == 0, err[-3000:]

    proc = _start([*_overrides(cut), "--resume", "auto"], env, tmp_path)
    k = _terminate_at_a_random_step([proc], cut, rng, [proc])
    saved = _check_preempted(_finish([proc]), cut)
    assert saved >= k, (seed, k, saved)

    [(code, _, err)] = _finish([_start([*_overrides(cut), "--resume", "auto"], env, tmp_path)])
    assert code == 0, err[-3000:]
    assert f"at step {saved}" in err, err[-3000:]
    _assert_same_run(cut, full)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(workdir, env, cwd, *extra):
    port = _free_port()
    mesh = {"mesh.devices": -1, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
            "distributed.coordinator_address": f"127.0.0.1:{port}",
            "distributed.num_processes": 2}
    return [_start([*_overrides(workdir, **mesh, **{"distributed.process_id": i}), *extra],
                   env, cwd) for i in range(2)]


@pytest.mark.slow  # three two-process runs (12 min measured on 2 heavily shared cores)
@pytest.mark.multidevice
def test_sigterm_on_one_of_two_processes_saves_on_both_and_resumes_bit_for_bit(tmp_path):
    """JAX's preemption sync point: the host that gets SIGTERM tells the other one, and both
    save the same step and exit 0."""
    rng = random.Random()
    seed = rng.randrange(2**32)
    rng.seed(seed)
    env = _env(tmp_path / "xla-cache", devices=4)
    full, cut = tmp_path / "full", tmp_path / "cut"
    for code, _, err in _finish(_two_processes(full, env, tmp_path)):
        assert code == 0, err[-3000:]

    procs = _two_processes(cut, env, tmp_path, "--resume", "auto")
    victim = rng.randrange(2)
    k = _terminate_at_a_random_step(procs, cut, rng, [procs[victim]])
    results = _finish(procs)
    saved = _check_preempted(results, cut)
    assert saved >= k, (seed, k, saved, victim)
    for _, _, err in results:
        assert f"stopped after step {saved} (SIGTERM)" in err, err[-3000:]

    for code, _, err in _finish(_two_processes(cut, env, tmp_path, "--resume", "auto")):
        assert code == 0, err[-3000:]
    _assert_same_run(cut, full)


def test_watch_catches_sigterm_and_restores_the_previous_handler():
    from jaxgrpo.train.preemption import PreemptionWatch

    before = signal.getsignal(signal.SIGTERM)
    with PreemptionWatch() as watch:
        assert not watch.reached(1)
        os.kill(os.getpid(), signal.SIGTERM)  # handled: the test process goes on
        time.sleep(0.01)
        assert watch.reached(2) and watch.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before
