"""The Tunix side-by-side of benchmarks/rollout_throughput.py: its argument checks and the JSON
line protocol between the benchmark and benchmarks/tunix_worker.py, with fake workers (no Tunix
needed)."""

import importlib.util
import io
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
ENV = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return _load("rollout_throughput")


@pytest.fixture(scope="module")
def worker_mod():
    return _load("tunix_worker")


def _fake_worker(tmp_path, body):
    """A worker script that speaks the protocol through tunix_worker.serve."""
    script = tmp_path / "fake_worker.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT / "benchmarks")!r})
        import tunix_worker
        print("library noise on stdout")
        print("noise on stderr", file=sys.stderr)
    """) + textwrap.dedent(body))
    return [sys.executable, str(script)]


def test_prefixes_agree(bench, worker_mod):
    assert bench.TUNIX_PREFIX == worker_mod.PREFIX


def test_serve_answers_rounds_and_exits(worker_mod):
    inp = io.StringIO('{"cmd": "round", "seed": 3}\n\n{"cmd": "round", "seed": 4}\n'
                      '{"cmd": "exit"}\n{"cmd": "round", "seed": 5}\n')
    out = io.StringIO()
    seeds = []
    code = worker_mod.serve(lambda: {"params": 7}, lambda s: seeds.append(s) or {"core_s": s},
                            inp, out)
    lines = out.getvalue().splitlines()
    assert code == 0 and seeds == [3, 4]  # nothing after exit
    assert all(line.startswith(worker_mod.PREFIX) for line in lines)
    msgs = [json.loads(line[len(worker_mod.PREFIX):]) for line in lines]
    assert msgs == [{"ready": True, "params": 7}, {"round": 3, "core_s": 3},
                    {"round": 4, "core_s": 4}]


@pytest.mark.parametrize("bad", ['{"cmd": "round"}', "not json", '{"cmd": "fly"}', "[1]"])
def test_serve_refuses_a_bad_request(worker_mod, bad):
    out = io.StringIO()
    code = worker_mod.serve(dict, lambda s: {}, io.StringIO(bad + "\n"), out)
    last = json.loads(out.getvalue().splitlines()[-1][len(worker_mod.PREFIX):])
    assert code == 1 and "bad request" in last["error"]


def test_word_tokenizer_round_trips(worker_mod):
    tok = worker_mod.WordTokenizer(pad_id=0, eos_id=-1)
    assert tok.encode(tok.decode([5, 8191, 2])) == [5, 8191, 2]
    assert (tok.bos_id(), tok.eos_id(), tok.pad_id()) == (None, -1, 0)


def test_client_skips_noise_and_exchanges_rounds(bench, tmp_path):
    cmd = _fake_worker(tmp_path, """
        rounds = []
        code = tunix_worker.serve(lambda: {"params": 11},
                                  lambda s: {"core_s": 0.5 * s, "call_s": s})
        sys.exit(code)
    """)
    w = bench.TunixWorker(cmd)
    assert w.read() == {"ready": True, "params": 11}
    assert w.request({"cmd": "round", "seed": 2}) == {"round": 2, "core_s": 1.0, "call_s": 2}
    assert w.close() == 0


def test_client_reports_a_worker_that_dies_with_its_stderr(bench, tmp_path):
    cmd = _fake_worker(tmp_path, """
        def boom(seed):
            raise RuntimeError("decode stopped early")
        tunix_worker.serve(lambda: {}, boom)
    """)
    w = bench.TunixWorker(cmd)
    w.read()
    with pytest.raises(bench.WorkerError, match=r"exit 1(.|\n)*decode stopped early"):
        w.request({"cmd": "round", "seed": 1})
    assert w.close() == 1


def test_client_raises_on_a_refused_request(bench, tmp_path):
    w = bench.TunixWorker(_fake_worker(tmp_path, "tunix_worker.serve(dict, lambda s: {})"))
    w.read()
    with pytest.raises(bench.WorkerError, match="refused a request: bad request"):
        w.request({"cmd": "round", "seed": "x"})
    w.close()


def test_tunix_python_needs_an_executable_python(bench, tmp_path):
    with pytest.raises(ValueError, match=r"no executable .*bin/python .*google-tunix==0.1.7"):
        bench.tunix_python(tmp_path)
    (tmp_path / "bin").mkdir()
    py = tmp_path / "bin" / "python"
    py.write_text("#!/bin/sh\n")
    with pytest.raises(ValueError, match="no executable"):
        bench.tunix_python(tmp_path)  # not executable
    os.chmod(py, 0o755)
    assert bench.tunix_python(tmp_path) == str(py)


@pytest.mark.parametrize("extra, message", [
    (["--tunix-venv", "/nonexistent"], "--tunix-venv /nonexistent: no executable"),
    (["--tunix-venv", "/nonexistent", "--engines"], "separate benchmarks"),
    (["--tunix-venv", "/nonexistent", "--tunix-batch", "0"], "--tunix-batch must be >= 1"),
    (["--tunix-venv", "/nonexistent", "--new-tokens", "0"], "--new-tokens must be >= 1"),
])
def test_bad_arguments_fail_in_one_line_before_any_work(tmp_path, extra, message):
    out = tmp_path / "o.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "rollout_throughput.py"),
                           *extra, "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          env=ENV, timeout=120)
    assert proc.returncode != 0 and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not out.exists()


@pytest.mark.slow
def test_side_by_side_json_from_a_fake_worker(bench, tmp_path):
    """The whole option on tiny shapes: our two engines run for real, the worker is a fake whose
    fixed times give known Tunix tokens/s; it sees the exported model and the prompts."""
    cmd = _fake_worker(tmp_path, """
        import argparse, json, numpy as np
        ap = argparse.ArgumentParser()
        for a in ("--model-dir", "--prompts", "--ref-logits", "--new-tokens"):
            ap.add_argument(a)
        a = ap.parse_args()
        prompts, ref = np.load(a.prompts), np.load(a.ref_logits)
        cfg = json.load(open(a.model_dir + "/config.json"))
        assert ref.shape == (min(4, len(prompts)), cfg["vocab_size"]), ref.shape
        assert (prompts >= 2).all()
        sys.exit(tunix_worker.serve(
            lambda: {"params": 29_377_024, "logits_max_abs_diff": 0.0, "batch": len(prompts)},
            lambda s: {"core_s": 2.0, "call_s": 4.0}))
    """)
    args = bench.argparse.Namespace(tunix_batch=2, prompt=8, new_tokens=3, repeats=2,
                                    steps_per_sync=4)
    out = bench.tunix_main(args, sys.executable, worker_cmd=cmd)
    assert out["tunix"]["batch"] == 2 and len(out["rounds"]) == 2
    assert [r["order"] for r in out["rounds"]] == [["static", "paged", "tunix"],
                                                   ["paged", "tunix", "static"]]
    assert out["tokens_per_s"]["tunix_core"] == pytest.approx(2 * 3 / 2.0)
    assert out["tokens_per_s"]["tunix_call"] == pytest.approx(2 * 3 / 4.0)
    for ours in ("static", "paged"):
        assert out["ratios"][f"{ours}_over_tunix_core"] == pytest.approx(
            out["tokens_per_s"][ours] / 3.0)
    assert out["best_over_tunix_core"] == max(out["ratios"]["static_over_tunix_core"],
                                              out["ratios"]["paged_over_tunix_core"])
