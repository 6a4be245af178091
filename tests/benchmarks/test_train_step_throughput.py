"""benchmarks/train_step_throughput.py: its MFU against a given denominator, and the peak."""

import importlib.util
import json
import pathlib
import tempfile

import pytest

from jaxgrpo.model import ModelConfig, build_demo_tokenizer
from jaxgrpo.train import loop

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_mfu_is_taken_against_the_given_peak(monkeypatch):
    bench = _load("train_step_throughput")
    monkeypatch.setattr(bench, "measure_matmul_peak", lambda: 7.0e9)
    out = bench.main(["--preset", "demo", "--rows", "4", "--seq", "8", "--repeats", "1",
                      "--peak-flops", "2e9"])
    assert out["matmul_peak_gflops"] == 2.0 and out["measured_matmul_peak_gflops"] == 7.0
    with tempfile.TemporaryDirectory() as d:
        matmul = ModelConfig.demo(len(build_demo_tokenizer(d))).matmul_params
    flops = out["forward_passes"] * 2.0 * matmul * out["real_tokens"]
    assert out["mfu"] == pytest.approx(flops / out["step_s"] / 2e9, rel=1e-12)
    with pytest.raises(SystemExit, match="--peak-flops must be positive"):
        bench.main(["--preset", "demo", "--rows", "4", "--seq", "8", "--peak-flops", "0"])


def test_matmul_peak_is_the_fastest_call(monkeypatch):
    times = iter([0.0, 4.0, 10.0, 11.0, 20.0, 28.0])  # calls of 4 s, 1 s and 8 s
    monkeypatch.setattr(loop.time, "perf_counter", lambda: next(times))
    assert loop.measure_matmul_peak(n=8, repeats=3) == pytest.approx(2.0 * 8**3 / 1.0)


def test_report_prints_and_writes_the_same_json(tmp_path, capsys):
    report = _load("_report").report
    path = tmp_path / "new" / "out.json"
    report({"a": 1.5}, str(path))
    printed = capsys.readouterr().out
    assert printed == path.read_text() and json.loads(printed) == {"a": 1.5}
    report({"b": 2}, None)  # no path: prints only
    assert json.loads(capsys.readouterr().out) == {"b": 2}
