"""``scripts/tpu_pod_launch.sh --dry-run``: the complete command sequence for the shipped pod
config, printed and not run (a ``gcloud`` on PATH that records any call proves nothing ran)."""

import os
import pathlib
import shlex
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "tpu_pod_launch.sh"
CONFIG = "configs/pod_v5p64_mtgrpo_3task.yaml"
NAME, ZONE = "my-v5p-64", "us-east5-a"


@pytest.fixture
def launcher(tmp_path):
    """``launch(*args) -> (code, [argv of each printed command], stderr)``; fails the test if
    anything called ``gcloud``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "gcloud-calls"
    fake = bin_dir / "gcloud"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\nexit 1\n")
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", TMPDIR=str(tmp_path))
    env.pop("TPU_PROJECT", None)

    def launch(*args, extra_env=None):
        out = subprocess.run(["bash", str(SCRIPT), "--dry-run", *args], cwd=ROOT,
                             env={**env, **(extra_env or {})}, capture_output=True, text=True,
                             timeout=60)
        lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
        assert all(ln.startswith("+ ") for ln in lines), out.stdout
        return out.returncode, [shlex.split(ln[2:]) for ln in lines], out.stderr

    yield launch
    assert not calls.exists(), f"--dry-run ran gcloud: {calls.read_text()}"
    assert not list(tmp_path.glob("*.tar.gz")), "--dry-run wrote the tarball"


def _gcloud(argv, what):
    assert argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", what], argv
    assert argv[argv.index("--zone") + 1] == ZONE
    return argv


def _remote(argv, worker="all"):
    """The remote shell command of an ssh call, checked to be valid bash."""
    _gcloud(argv, "ssh")
    assert argv[5] == NAME and f"--worker={worker}" in argv, argv
    script = argv[argv.index("--command") + 1]
    check = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
    assert check.returncode == 0, (script, check.stderr)
    return script


def test_launch_dry_run_prints_the_whole_sequence_for_the_pod_config(launcher, tmp_path):
    code, cmds, err = launcher("launch", NAME, ZONE, CONFIG, "model.path=/mnt/models/Qwen2.5-3B",
                               "train.workdir=gs://my-bucket/run1")
    assert code == 0, err
    assert [c[0] for c in cmds] == ["tar", "gcloud", "gcloud", "gcloud"], cmds
    tar, scp, setup, start = cmds
    tarball = tar[tar.index("-czf") + 1]
    assert tarball == str(tmp_path / f"jaxgrpo-{NAME}.tar.gz") and tar[-1] == "."
    assert "--exclude=.git" in tar
    _gcloud(scp, "scp")
    assert scp[5:7] == [tarball, f"{NAME}:/tmp/jaxgrpo.tar.gz"] and "--worker=all" in scp

    install = _remote(setup)
    assert "tar -xzf /tmp/jaxgrpo.tar.gz -C ~/jaxgrpo" in install
    # A Python >= 3.11 (uv installs one where the image's is older) and the extras the
    # reasoning-gym tasks of this config, gs:// paths and the TPU need.
    assert "uv venv" in install and "--python '>=3.11'" in install
    assert "-e ~/jaxgrpo'[tasks,gcs,tpu]'" in install
    assert "import sys, jax, jaxgrpo, reasoning_gym" in install

    run = _remote(start)
    words = shlex.split(run.split("setsid nohup ", 1)[1].split(">>", 1)[0])
    train = words[words.index("train") - 1:]
    assert train == ["~/jaxgrpo-venv/bin/jaxgrpo", "train", CONFIG,
                     "model.path=/mnt/models/Qwen2.5-3B", "train.workdir=gs://my-bucket/run1",
                     "--resume", "auto"]
    # Detached, output and pid in files, and a second launch refuses while one runs.
    assert ">>~/jaxgrpo-logs/train.log 2>&1 </dev/null &" in run
    assert "echo $! >~/jaxgrpo-logs/train.pid" in run
    assert "already going" in run and run.index("already going") < run.index("setsid")


def test_launch_without_setup_and_with_a_project(launcher):
    code, cmds, err = launcher("launch", NAME, ZONE, CONFIG, "train.workdir=gs://b/r",
                               extra_env={"JAXGRPO_SETUP": "0", "TPU_PROJECT": "proj"})
    assert code == 0, err
    assert len(cmds) == 1 and "setsid nohup" in _remote(cmds[0])
    assert cmds[0][cmds[0].index("--project") + 1] == "proj"


@pytest.mark.parametrize("args, needle", [
    (["launch", NAME, ZONE, CONFIG], "train.workdir=gs://"),
    (["launch", NAME, ZONE, "configs/nope.yaml", "train.workdir=gs://b/r"], "nope.yaml"),
    (["start", NAME, ZONE], "usage:"),
    (["launch", NAME], "usage:"),
])
def test_launch_refusals_print_nothing_to_run(launcher, args, needle):
    code, cmds, err = launcher(*args)
    assert code == 2 and cmds == [] and needle in err, err


def test_status_logs_and_stop(launcher):
    code, [status], _ = launcher("status", NAME, ZONE)
    assert code == 0 and "kill -0" in _remote(status) and "tail -n 3" in _remote(status)
    code, [logs], _ = launcher("logs", NAME, ZONE, "3", "--follow")
    assert code == 0 and _remote(logs, worker="3") == "tail -n 200 -f ~/jaxgrpo-logs/train.log"
    code, [logs], _ = launcher("logs", NAME, ZONE)
    assert code == 0 and _remote(logs, worker="0") == "tail -n 200  ~/jaxgrpo-logs/train.log"
    code, [stop], _ = launcher("stop", NAME, ZONE)
    assert code == 0 and "kill -TERM $(cat ~/jaxgrpo-logs/train.pid)" in _remote(stop)
