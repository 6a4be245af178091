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
            assert set(p["accuracy"]) == {"reverse@2", "countdown@1", "countdown@2"}
            assert all(0.0 <= v <= 1.0 for v in p["accuracy"].values())
        tokens = [p["generated_tokens"] for p in run["curve"]]
        assert tokens[0] == 0 and all(b > a for a, b in zip(tokens, tokens[1:], strict=False))
        assert tokens[-1] == run["generated_tokens"]
        assert run["rounds_per_step"] >= 1
    for arm, agg in res["aggregate"].items():
        for key in ("worst_mean", "avg_mean", "rounds_per_step", "generated_per_step"):
            assert math.isfinite(agg[key]), (arm, key)
        assert agg["worst_mean"] <= agg["avg_mean"]
    uniform = res["aggregate"]["grpo_rps"]["weight_mean"]
    assert all(abs(w - 1 / 3) < 1e-9 for w in uniform.values())
    assert set(res["comparisons"]["worst_diff"]) == {
        "mtgrpo_l0.2 - grpo", "grpo_rps - grpo"}  # no DAPO arm here: GRPO is the only reference
    table = (tmp_path / "table.md").read_text()
    assert all(f"| {arm} |" in table for arm in arms)
    assert (tmp_path / "worst_task.png").stat().st_size > 0
    assert (tmp_path / "example_mtgrpo_l0.2_seed0.jsonl").exists()
    assert "worst-task acc" in proc.stdout


def _load_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("mtgrpo_experiment",
                                                  ROOT / "benchmarks" / "mtgrpo_experiment.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_comparisons_against_hand_computed_values():
    mod = _load_module()

    def run(arm, seed, finals, reach_step):
        curve = [{"step": 0, "accuracy": {"a": 0.0, "b": 0.5}, "generated_tokens": 0.0}]
        for step in (10, 20):
            w = finals if step >= reach_step else 0.0
            curve.append({"step": step, "accuracy": {"a": w, "b": 0.5},
                          "generated_tokens": step * (300.0 if arm == "dapo" else 100.0)})
        return {"arm": arm, "seed": seed, "seconds": 1.0, "tasks": ["a", "b"], "curve": curve,
                "rounds_per_step": 1.0, "generated_per_step": 16.0, "generated_tokens": 2000.0,
                "weight_mean": {"a": 0.5, "b": 0.5}, "realised_share_mean": {"a": 0.5, "b": 0.5}}

    runs = [run("dapo", 0, 0.2, 20), run("dapo", 1, 0.3, 20),
            run("mt", 0, 0.4, 10), run("mt", 1, 0.5, 10)]
    agg = mod.aggregate(runs, ["dapo", "mt"], [0.15])
    assert agg["mt"]["worst_se"] == pytest.approx(0.05)  # std 0.0707 / sqrt 2
    comp = mod.comparisons(agg, [0.15])
    d = comp["worst_diff"]["mt - dapo"]
    assert d["diff"] == pytest.approx(0.2) and d["se"] == pytest.approx(0.05 * 2 ** 0.5)
    ratio = comp["to_threshold_ratio_vs_dapo"]["mt"]
    assert ratio["steps@0.15"] == pytest.approx(10 / 20)
    assert ratio["tokens@0.15"] == pytest.approx(1000 / 6000)


def test_stream_flag_streams_the_filtering_arms_only(tmp_path):
    mod = _load_module()
    args = mod.parse_args(["--stream", "--out", str(tmp_path)])
    for arm in mod.ARMS:
        kv = dict(o.split("=", 1) for o in mod.overrides(args, arm, 0, tmp_path / arm))
        filtering = arm in ("dapo", "mtgrpo_l0.2", "mtgrpo_l1.2", "grpo_rps")
        assert (kv.get("algo.sampling.stream") == "True") == filtering, arm
        assert (kv.get("rollout.engine") == "paged") == filtering, arm
    plain = mod.parse_args(["--out", str(tmp_path)])
    assert "algo.sampling.stream" not in dict(
        o.split("=", 1) for o in mod.overrides(plain, "dapo", 0, tmp_path))
    from jaxgrpo.config import load_config

    cfg = load_config(None, [o for o in mod.overrides(args, "dapo", 0, tmp_path / "d")
                             if not o.startswith("model.path=")])  # (no SFT model here)
    assert cfg.algo.sampling.stream and cfg.rollout.engine == "paged"
