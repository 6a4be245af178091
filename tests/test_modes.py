"""One registry per mode (jaxgrpo.core.modes): the config, the core and the loop all use it."""

import subprocess
import sys

import numpy as np
import pytest

from jaxgrpo import config as C
from jaxgrpo.core import advantages, losses, modes, weighting
from jaxgrpo.data import PRESETS
from jaxgrpo.evaluation import fidelity
from jaxgrpo.train import loop, task_weights


@pytest.mark.parametrize("enum_cls,registry", [
    (C.Estimator, modes.ESTIMATORS), (C.Scale, modes.GROUP_SCALES),
    (C.KLEstimator, modes.KL_ESTIMATORS), (C.Agg, modes.AGGREGATIONS),
    (C.BlockBaseline, modes.BLOCK_BASELINES), (C.Algo, modes.ALGORITHMS),
    (C.WeightOptimizer, modes.TASK_WEIGHT_OPTIMIZERS),
    (C.Reduce, modes.IMPROVEMENT_REDUCTIONS),
])
def test_config_enums_are_the_registries(enum_cls, registry):
    assert [m.value for m in enum_cls] == list(registry)


def test_the_core_uses_the_registry_objects():
    assert losses.AGG_MODES is modes.AGGREGATIONS
    assert losses.KL_ESTIMATORS is modes.KL_ESTIMATORS
    assert advantages.GROUP_BASELINES is modes.GROUP_BASELINES
    assert advantages.GROUP_SCALES is modes.GROUP_SCALES
    assert advantages.BLOCK_BASELINES == tuple(modes.BLOCK_BASELINES)
    assert weighting.REDUCTIONS is modes.IMPROVEMENT_REDUCTIONS
    assert task_weights.TASK_WEIGHT_OPTIMIZERS is modes.TASK_WEIGHT_OPTIMIZERS
    assert fidelity.BASELINES == tuple(modes.BLOCK_BASELINES)


def test_registries_load_without_jax():
    code = "import sys, jaxgrpo.core.modes, jaxgrpo.config; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_every_registered_mode_runs_in_the_core():
    rng = np.random.default_rng(0)
    logp = rng.normal(size=(4, 3)).astype(np.float32) - 2.0
    adv = rng.normal(size=4).astype(np.float32)
    mask = np.ones((4, 3), bool)
    for kl in modes.KL_ESTIMATORS:
        loss, _ = losses.policy_loss(logp, logp, adv, mask, ref_logp=logp - 0.1, kl_coef=0.1,
                                     kl_estimator=kl)
        assert np.isfinite(float(loss)), kl
    for agg in modes.AGGREGATIONS:
        tw = np.ones((4, 3), np.float32) if agg == "block_mean" else None
        loss, _ = losses.policy_loss(logp, logp, adv, mask, agg=agg, token_weights=tw)
        assert np.isfinite(float(loss)), agg
    rewards = rng.random((3, 4)).astype(np.float32)
    for name, spec in modes.ESTIMATORS.items():
        if spec.baseline is not None:
            adv = advantages.group_relative(rewards, np.ones((3, 4), bool),
                                            baseline=spec.baseline, scale=spec.scale)
            assert np.all(np.isfinite(np.asarray(adv))), name


def test_algorithms_name_sampler_presets_and_the_loop_reads_their_entries(tmp_path):
    for name, spec in modes.ALGORITHMS.items():
        assert spec.sampler in PRESETS, name
        assert spec.with_sampling is None or spec.with_sampling in modes.ALGORITHMS
    grpo = C.load_config(None, [f"train.workdir={tmp_path}"])
    assert loop.algorithm(grpo) is modes.ALGORITHMS["grpo"]
    dyn = C.load_config(None, [f"train.workdir={tmp_path}", "algo.sampling.enabled=true"])
    assert loop.algorithm(dyn) is modes.ALGORITHMS["dapo"]
    assert loop.make_batch_sampler(dyn, ["a", "b"], 0).max_rounds == dyn.algo.sampling.max_rounds


def test_a_function_table_must_name_exactly_the_registered_modes():
    modes.check_table("KL estimator", {"k1": 0, "k2": 0, "k3": 0}, modes.KL_ESTIMATORS)
    with pytest.raises(RuntimeError, match="k4"):
        modes.check_table("KL estimator", {"k1": 0, "k2": 0, "k3": 0},
                          (*modes.KL_ESTIMATORS, "k4"))


def test_sgd_task_weight_optimiser_is_selectable_from_the_config(tmp_path):
    cfg = C.load_config(None, [f"train.workdir={tmp_path}", "algo.mt_grpo.weight_optimizer=sgd"])
    assert str(cfg.algo.mt_grpo.weight_optimizer) == "sgd"
