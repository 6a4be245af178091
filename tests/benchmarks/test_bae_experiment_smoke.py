"""``benchmarks/bae_experiment.py --smoke`` runs every stage and writes a complete result."""

import importlib.util
import json
import math
import pathlib
import sys

import pytest

from jaxgrpo.model import config as model_config

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("bae_experiment",
                                                  ROOT / "benchmarks" / "bae_experiment.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def nano_demo(monkeypatch):
    """The demo preset at nano size (1 layer, width 32): the smoke checks plumbing, not learning."""
    from tests.train.conftest import NANO

    orig = model_config.ModelConfig.demo.__func__
    monkeypatch.setattr(
        model_config.ModelConfig, "demo",
        classmethod(lambda cls, vocab_size, **kw: orig(cls, vocab_size, **{**NANO, **kw})),
    )


@pytest.mark.slow
def test_smoke_run_writes_every_arm_and_metric(nano_demo, tmp_path, capsys):
    mod = _load()
    assert mod.main(["--smoke", "--seeds", "0", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    md = (tmp_path / "results.md").read_text()
    assert set(res["pooled"]) == {"sft", "rlcr", "bae_group_mean", "bae_ocb"}
    for arm, rep in res["pooled"].items():
        for m in ("accuracy", "ece", "brier", "mean_conf", "no_conf"):
            assert math.isfinite(rep[m]), (arm, m)
            assert math.isfinite(rep.get(f"{m}_se", 0.0)), (arm, m)
        assert f"| {arm} |" in md
        sc = rep["scaling"]
        assert sc["k"] == [1, res["settings"]["eval_k"]] == [1, 2]
        for m in ("pass@1", "pass@k", "majority", "max_conf", "weighted_majority"):
            assert len(sc[m]) == 2 and all(0.0 <= v <= 1.0 for v in sc[m]), (arm, m)
        assert sc["pass@k"][0] == pytest.approx(sc["pass@1"][0])
        assert sc["pass@k"][1] >= sc["pass@k"][0]
        assert f"| {arm} | 2 | " in md
    for arm in ("rlcr", "bae_group_mean", "bae_ocb"):
        assert set(res["per_seed"][arm]) == {"0"}
        assert len(res["curves"][f"{arm}_s0"]["accuracy/batch"]) == res["settings"]["rl_steps"]
    fid = res["fidelity"]
    assert set(fid["table"]) == {"correct", "incorrect", "all"}
    assert fid["table"]["all"]["n"] == round(fid["valid_frac"] * fid["prompts"] * fid["G"])
    assert "| ocb |" in md and "MC noise floor" in md
    assert "| bae_ocb |" in capsys.readouterr().out
