"""The TRL side-by-side benchmark's jaxgrpo half runs and reports one timed GRPO step."""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_trl_side_by_side_jaxgrpo_half(tmp_path):
    out = tmp_path / "sbs.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "trl_side_by_side.py"), "--prompts", "2",
           "--group", "2", "--prompt-len", "8", "--completion-len", "4", "--steps", "1",
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["jaxgrpo"]["params"] == 29_377_024
    assert res["jaxgrpo"]["step_s"] > 0 and len(res["jaxgrpo"]["step_s_all"]) == 1
    assert "trl" not in res  # no --trl-python: jaxgrpo only
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "trl_side_by_side.py"),
                          "--group", "1"], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert bad.returncode != 0 and "--group must be >= 2" in bad.stderr
