"""The MT-GRPO experiment's smoke mode runs end to end and writes a complete, finite report."""

import json
import math
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_mtgrpo_experiment_smoke(tmp_path):
    arms = ["grpo", "mtgrpo_l0.2", "grpo_rps"]
    cmd = [sys.executable, str(ROOT / "benchmarks" / "mtgrpo_experiment.py"), "--smoke",
           "--out", str(tmp_path), "--arms", *arms]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert list(res["aggregate"]) == arms
    for run in res["runs"]:
        assert [p["step"] for p in run["curve"]] == [0, 2, 3]  # before RL, eval step 2, final
        for p in run["curve"]:
            assert set(p["accuracy"]) == {"reverse@1", "addition@1", "countdown@2"}
            assert all(0.0 <= v <= 1.0 for v in p["accuracy"].values())
        assert run["rounds_per_step"] >= 1
    for arm, agg in res["aggregate"].items():
        for key in ("worst_mean", "avg_mean", "rounds_per_step", "generated_per_step"):
            assert math.isfinite(agg[key]), (arm, key)
        assert agg["worst_mean"] <= agg["avg_mean"]
    uniform = res["aggregate"]["grpo_rps"]["weight_mean"]
    assert all(abs(w - 1 / 3) < 1e-9 for w in uniform.values())
    table = (tmp_path / "table.md").read_text()
    assert all(f"| {arm} |" in table for arm in arms)
    assert (tmp_path / "worst_task.png").stat().st_size > 0
    assert (tmp_path / "example_mtgrpo_l0.2_seed0.jsonl").exists()
    assert "worst-task acc" in proc.stdout
