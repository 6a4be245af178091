"""``jaxgrpo train`` with a malformed config: one line on stderr naming the key, exit 2, no
traceback, and nothing compiled or written."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROGRESS = re.compile(r"^\[jaxgrpo\] .* \.\.\. \(\d+:\d\d since start\)$")


def _cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "jaxgrpo.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


CASES = {
    "unknown key": (["optim.lrr=1e-6"], "optim.lrr"),
    "wrong type": (["rollout.group_size=abc"], "rollout.group_size"),
    "ratios": (["tasks.mixture=[{name: reverse, ratio: 0.5}, {name: addition, ratio: 0.3}]"],
               "ratios must sum to 1"),
    "batch vs data axis": (["tasks.prompts_per_step=12", "mesh.data=8"], "prompts_per_step"),
    "G=1": (["rollout.group_size=1"], "rollout.group_size"),
    "missing model path": (["model.path=/nonexistent/model"], "model.path"),
    "missing config file": (["/nonexistent/x.yaml"], "x.yaml"),
    "unknown task": (["tasks.mixture=[{name: nosuchtask}, {name: addition}]"], "nosuchtask"),
}


@pytest.mark.parametrize("case", list(CASES) + ["bad yaml"])
def test_malformed_config_gives_one_line_and_no_traceback(case, tmp_path):
    if case == "bad yaml":
        bad = tmp_path / "bad.yaml"
        bad.write_text("optim:\n  lr: [1e-6\n")
        args, needle = [str(bad)], "bad.yaml"
    else:
        args, needle = CASES[case]
    out = _cli("train", *args, f"train.workdir={tmp_path / 'run'}", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    # (A slow start may print the trainer's timed progress line first: not part of the error.)
    lines = [ln for ln in out.stderr.splitlines() if ln.strip() and not PROGRESS.match(ln)]
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("jaxgrpo: error:") and needle in lines[0], lines[0]
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()


def test_top_level_help_lists_the_commands(tmp_path):
    out = _cli("--help", cwd=tmp_path)
    assert out.returncode == 0
    for cmd in ("train", "sft", "eval", "tasks", "score"):
        assert cmd in out.stdout
