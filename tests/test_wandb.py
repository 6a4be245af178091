"""The optional Weights & Biases writer: offline runs (when wandb is installed), and a one-line
config error before anything runs when it is enabled but not installed."""

import importlib.util
import io
import os
import pathlib
import subprocess
import sys

import pytest

from jaxgrpo import metrics as M
from jaxgrpo.config import ConfigError, load_config
from tests.train.conftest import tiny_overrides

ROOT = pathlib.Path(__file__).resolve().parents[1]
HAVE_WANDB = importlib.util.find_spec("wandb") is not None
needs_wandb = pytest.mark.skipif(not HAVE_WANDB, reason="wandb is not installed (optional: "
                                 "pip install wandb to run the offline-mode tests)")


def _offline_runs(directory):
    return sorted(pathlib.Path(directory).glob("wandb/offline-run-*/run-*.wandb"))


@needs_wandb
def test_offline_writer_logs_scalars_and_hparams(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    w = M.WandbWriter(project="jaxgrpo-test", name="unit", mode="offline", dir=tmp_path,
                      tags=("test",))
    w.write_hparams({"optim.lr": 1e-3, "algo.name": "grpo"})
    w.write_scalars(1, {"loss/total": 0.5, "reward/mean": 0.25})
    w.write_scalars(2, {"loss/total": 0.125})
    assert w._run.config["optim.lr"] == 1e-3 and w._run.config["algo.name"] == "grpo"
    w.close()
    [log] = _offline_runs(tmp_path)  # wandb's record log (protobuf), read back as bytes
    data = log.read_bytes()
    for key in (b"loss/total", b"reward/mean", b"0.125", b"optim.lr"):
        assert key in data, key


@needs_wandb
@pytest.mark.slow  # one short training run
def test_training_run_logs_to_an_offline_wandb_run(tmp_path, monkeypatch):
    from jaxgrpo.train import loop

    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(None, tiny_overrides(tmp_path / "run", **{
        "train.steps": 2, "logging.wandb.enabled": True, "logging.wandb.mode": "offline",
        "logging.wandb.dir": str(tmp_path / "wb")}))
    loop.run(cfg, stream=io.StringIO())
    [log] = _offline_runs(tmp_path / "wb")
    data = log.read_bytes()
    for key in (b"loss/total", b"reward/mean", b"perf/mfu", b"eval/", b"optim.lr"):
        assert key in data, key


def test_enabled_without_wandb_is_a_one_line_config_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install wandb") as e:
        load_config(None, ["logging.wandb.enabled=true"])
    assert "\n" not in str(e.value)
    load_config(None, ["logging.wandb.enabled=false"])  # never required
    with pytest.raises(ConfigError, match="logging.wandb.mode"):
        load_config(None, ["logging.wandb.mode=cloud"])


@pytest.mark.skipif(HAVE_WANDB, reason="wandb is installed here: the refusal needs it absent")
def test_cli_refuses_before_anything_is_written(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "jaxgrpo.cli", "train",
                          f"train.workdir={tmp_path / 'run'}", "logging.wandb.enabled=true"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "pip install wandb" in lines[0], out.stderr
    assert not (tmp_path / "run").exists()
