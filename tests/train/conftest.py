"""A nano model preset for end-to-end trainer tests (seconds, not minutes, per run)."""

import pytest

from jaxgrpo.model import config as model_config

NANO = dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
            head_dim=16)


@pytest.fixture
def nano_model(monkeypatch):
    orig = model_config.ModelConfig.tiny.__func__
    monkeypatch.setattr(
        model_config.ModelConfig, "tiny",
        classmethod(lambda cls, vocab_size, **kw: orig(cls, vocab_size, **{**NANO, **kw})),
    )


def tiny_overrides(workdir, **extra):
    base = {
        "train.workdir": str(workdir),
        "train.steps": 4,
        "train.eval_every": 0,
        "model.sft.steps": 0,
        "tasks.mixture": "demo",
        "tasks.prompts_per_step": 4,
        "tasks.eval_prompts": 2,
        "rollout.group_size": 2,
        "rollout.max_new_tokens": 6,
        "rollout.eval_samples": 2,
        "rollout.prompt_buckets": "[24, 32]",
        "checkpoint.every": 2,
        "checkpoint.asynchronous": False,
        "logging.progress": False,
        "optim.lr": 1e-2,
        "optim.warmup_steps": 0,
        "mesh.devices": 1,  # one of the 8 simulated devices (tests/multidevice runs meshes)
    }
    base.update(extra)  # a key given as None is left out (the config file's value stands)
    return [f"{k}={v}" for k, v in base.items() if v is not None]
