"""End-to-end trainer runs on a nano model: exact resume, every algorithm, the run's files."""

import io
import json
import zlib

import jax
import numpy as np
import pytest

from jaxgrpo.config import load_config
from jaxgrpo.tasks import Score
from jaxgrpo.train import loop
from tests.train.conftest import tiny_overrides


def _run(workdir, **kw):
    extra = {k: v for k, v in kw.items() if "." in k}
    opts = {k: v for k, v in kw.items() if "." not in k}
    cfg = load_config(None, tiny_overrides(workdir, **extra))
    return loop.run(cfg, stream=io.StringIO(), **opts)


def _assert_same_params(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
# GRPO (the default) resumes bit for bit in tests/train/test_preemption.py, through the command.
@pytest.mark.parametrize("algo", ["dapo", "mt_grpo"])
def test_interrupted_and_resumed_run_is_bitwise_identical(nano_model, tmp_path, monkeypatch,
                                                           algo):
    extra = {"algo.name": algo}
    if algo == "dapo":
        extra.update({"algo.sampling.max_rounds": 2, "loss.clip_high": 0.28})
    if algo == "mt_grpo":  # several rounds and updates per step, weights that move
        extra.update({"algo.sampling.max_rounds": 3, "loss.minibatches": 2,
                      "algo.mt_grpo.weight_lr": 0.5})
        rates = {"reverse@1": 0.8, "addition@1": 0.5, "countdown@2": 0.2}

        def fake_score_many(task, records, completions, **kw):
            # A per-task success rate, decided by the completion's text and prompt alone, so
            # that the interrupted run scores what the uninterrupted one does.
            flips = [zlib.crc32(f"{r}|{c}".encode()) / 2**32
                     for r, c in zip(records, completions, strict=True)]
            return [Score(reward=float(u < rates[task.spec]), correct=bool(u < rates[task.spec]),
                          format_ok=True, error=None) for u in flips]

        monkeypatch.setattr(loop, "score_many", fake_score_many)
    full = _run(tmp_path / "full", **extra)
    _run(tmp_path / "cut", stop_after=2, **extra)
    resumed = _run(tmp_path / "cut", resume=True, **extra)
    _assert_same_params(full["params"], resumed["params"])
    for key in ("task_sampler_state", "batch_sampler_state", "task_weights_state"):
        assert full[key] == resumed[key], key
    if algo == "mt_grpo":
        assert resumed["task_weights_state"]["logits"] != [0.0, 0.0, 0.0]
    steps = [r["step"] for r in map(json.loads, open(tmp_path / "cut" / "metrics.jsonl"))]
    assert steps[:4] == [1, 2, 3, 4]


@pytest.mark.slow
def test_mt_grpo_run_moves_task_weights_and_logs_per_task_metrics(nano_model, tmp_path,
                                                                   monkeypatch):
    # A stand-in verifier with a different success rate per task, so that groups have signal.
    rates = {"reverse@1": 0.8, "addition@1": 0.5, "countdown@2": 0.2}
    rng = np.random.default_rng(0)

    def fake_score_many(task, records, completions, **kw):
        p = rates[task.spec] if hasattr(task, "spec") else 0.5
        return [Score(reward=float(ok), correct=bool(ok), format_ok=True, error=None)
                for ok in rng.random(len(completions)) < p]

    monkeypatch.setattr(loop, "score_many", fake_score_many)
    out = _run(tmp_path, **{"algo.name": "mt_grpo", "algo.sampling.max_rounds": 2,
                            "algo.mt_grpo.weight_lr": 0.5})
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    weights = [[r[k] for k in r if k.endswith("/weight")] for r in rows if "rps/rounds" in r]
    assert all(abs(sum(w) - 1) < 1e-6 for w in weights)
    assert any(max(w) - min(w) > 1e-4 for w in weights), "task weights never moved"
    assert len(out["accuracy_after"]) == len(weights[0])
    imp = [[r[k] for k in r if k.endswith("/improvement")] for r in rows if "rps/rounds" in r]
    assert all(len(i) == 3 and all(abs(x) <= np.float32(0.1) for x in i) for i in imp), imp
    assert any(x != 0 for i in imp for x in i), "I_k never logged a change"


@pytest.mark.parametrize("ablation", ["grpo_rps", "grpo_iwu"])
def test_mt_grpo_ablations(nano_model, tmp_path, monkeypatch, ablation):
    """GRPO+RPS keeps z uniform but preserves per-task counts after filtering; GRPO+IWU adapts
    z but draws one unfiltered round, so nothing is preserved or resampled (the paper's App. D.2 ablation)."""
    rates = {"reverse@1": 0.9, "addition@1": 0.5, "countdown@2": 0.2}
    rng = np.random.default_rng(1)

    def fake_score_many(task, records, completions, **kw):
        return [Score(reward=float(ok), correct=bool(ok), format_ok=True, error=None)
                for ok in rng.random(len(completions)) < rates[task.spec]]

    monkeypatch.setattr(loop, "score_many", fake_score_many)
    extra = {"algo.name": "mt_grpo", "algo.mt_grpo.weight_lr": 0.5}
    if ablation == "grpo_rps":
        extra.update({"algo.mt_grpo.adapt_weights": False, "algo.sampling.max_rounds": 4})
    else:
        extra.update({"algo.sampling.filter": "none", "algo.sampling.oversample": 1.0,
                      "algo.sampling.max_rounds": 1, "algo.mt_grpo.preserve_ratios": False,
                      "algo.mt_grpo.max_inflation": 1.0})
    _run(tmp_path, **extra)
    rows = [r for r in map(json.loads, open(tmp_path / "metrics.jsonl")) if "rps/rounds" in r]
    names = sorted(rates)
    weights = np.array([[r[f"task/{n}/weight"] for n in names] for r in rows])
    if ablation == "grpo_rps":
        np.testing.assert_allclose(weights, 1 / 3, rtol=0, atol=1e-12)
        assert any(not r["rps/hit_cap"] for r in rows)
        for r in rows:
            if not r["rps/hit_cap"]:
                for n in names:
                    assert r[f"task/{n}/realised_count"] == r[f"task/{n}/target_count"], (n, r)
    else:
        assert np.ptp(weights, axis=1).max() > 1e-4, "task weights never moved"
        assert all(r["rps/rounds"] == 1 for r in rows)
        assert all(r["rps/generated"] == r["rps/batch_size"] for r in rows)


def test_fresh_run_refuses_a_directory_with_checkpoints(nano_model, tmp_path):
    _run(tmp_path, **{"train.steps": 2})
    with pytest.raises(ValueError, match="--resume"):
        _run(tmp_path, **{"train.steps": 2})


def test_run_writes_config_metrics_and_checkpoints(nano_model, tmp_path):
    out = _run(tmp_path, **{"train.steps": 2, "logging.tensorboard": True})
    assert any((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "config.yaml").exists()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    keys = set().union(*rows)
    for k in ("loss/total", "grad/global_norm", "loss/clip_frac_high", "reward/mean",
              "logp/sampler_trainer_gap", "time/step_s", "perf/mfu", "perf/tokens_per_s",
              "perf/peak_flops"):
        assert k in keys, k
    # On CPU the MFU denominator is the measured matmul rate, and the run says so.
    hparams = json.loads((tmp_path / "hparams.json").read_text())
    assert "measured" in hparams["perf/peak_flops_source"]
    assert any(k.startswith("task/") and k.endswith("/zero_adv_frac") for k in keys)
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [2]
    assert set(out["accuracy_before"]) == set(out["accuracy_after"])


def test_explicit_mesh_axes_are_refused_before_anything_runs(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path / "run", **{"mesh.axis_types": "explicit"}))
    with pytest.raises(ValueError, match="mesh.axis_types=auto"):
        loop.run(cfg, stream=io.StringIO())
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_run_on_gs_uris_writes_everything_there_and_resumes(nano_model, fake_gcs, capsys):
    """train.workdir, checkpoint.dir and logging.dir as gs:// URIs (served offline from
    ``fake_gcs``): config, metrics, TensorBoard, tokenizer, the SFT export and the checkpoints
    all land in the bucket, nothing at a local ``gs:/...`` path (the fixture checks the working
    directory), and ``--resume`` and ``jaxgrpo eval --run`` read them back."""
    import pathlib

    from jaxgrpo import cli
    from tests.test_metrics import _tb_scalars

    run = "gs://bucket/runs/a"
    uris = {"checkpoint.dir": f"{run}/checkpoints", "logging.dir": "gs://bucket/tb/a",
            "logging.tensorboard": True}
    _run(run, stop_after=2, **{**uris, "model.sft.steps": 2, "model.sft.batch_size": 2})
    bucket = pathlib.Path(fake_gcs) / "bucket"
    ck = bucket / "runs" / "a" / "checkpoints"
    assert sorted(p.name for p in ck.iterdir() if p.name.isdigit()) == ["2"]
    for f in ("config.yaml", "metrics.jsonl", "hparams.json", "tokenizer/tokenizer.json",
              "sft_model/config.json", "sft_model/model.safetensors",
              "sft_model/tokenizer.json"):
        assert (bucket / "runs" / "a" / f).is_file(), f
    assert load_config(str(bucket / "runs" / "a" / "config.yaml")).train.workdir == run
    out = _run(run, resume=True, **{**uris, "model.sft.steps": 2, "model.sft.batch_size": 2})
    assert out["workdir"] == run
    assert sorted(p.name for p in ck.iterdir() if p.name.isdigit()) == ["2", "4"]
    steps = [r["step"] for r in map(json.loads, open(bucket / "runs" / "a" / "metrics.jsonl"))]
    assert steps == [1, 2, 3, 4, 4]  # the four steps, then the final evaluation
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (bucket / "runs" / "a" / "final_model" / f).is_file(), f
    assert {s for _, s, _ in _tb_scalars(bucket / "tb" / "a")} >= {1, 2, 3, 4}
    capsys.readouterr()
    args = ["eval", *tiny_overrides(run), "--run", run]
    assert cli.main(args) == 0
    assert "mean" in capsys.readouterr().out
    assert cli.main(["export", "--run", run, "--step", "2", "--out", "gs://bucket/export"]) == 0
    assert (bucket / "export" / "model.safetensors").is_file()
