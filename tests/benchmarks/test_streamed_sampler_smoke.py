"""benchmarks/streamed_sampler.py: a short run gives exact counts and the streamed figures."""

import importlib.util
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_short_run(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("streamed_sampler",
                                                  ROOT / "benchmarks" / "streamed_sampler.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    path = tmp_path / "out" / "streamed.json"
    out = bench.main(["--steps", "6", "--seeds", "1", "--batch", "8", "--presets", "mt_grpo",
                      "dapo", "--min-outstanding", "0", "-1", "--out", str(path)])
    assert json.loads(path.read_text()) == json.loads(capsys.readouterr().out) == out
    mt = out["presets"]["mt_grpo"]
    assert set(mt["streamed"]) == {"min_outstanding=0", "min_outstanding=4"}
    for s in [mt["rounds"], *mt["streamed"].values()]:
        assert s["hit_cap_frac"] == 0.0 and s["exact_counts_frac"] == 1.0
        assert s["prompts_per_step"] == pytest.approx(s["finished_per_step"]
                                                      + s["cancelled_per_step"], rel=1e-12)
    assert round(6 * mt["rounds"]["prompts_per_step"]) % 24 == 0  # whole rounds of 3B
    for s in mt["streamed"].values():
        assert s["prompts_over_rounds"] < 1.0
