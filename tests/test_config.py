"""Config: YAML + dotted overrides into frozen dataclasses, one-line errors naming the key."""

import dataclasses
import pathlib
import re
import subprocess
import sys

import pytest
import yaml

from jaxgrpo import config as C
from jaxgrpo.config import ConfigError, load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def _error(*overrides, path=None, **kw) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides), **kw)
    msg = str(info.value)
    assert "\n" not in msg and "Traceback" not in msg
    assert C.format_error(info.value) == f"jaxgrpo: error: {msg}"
    return msg


def _write(tmp_path, text: str) -> pathlib.Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_demo_yaml_mirrors_the_builtin_demo():
    assert load_config(None) == C.ExperimentConfig()
    assert load_config(ROOT / "configs" / "demo.yaml") == C.ExperimentConfig()
    # Every key is explicit in demo.yaml, so a change to a default is caught here too.
    raw = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    assert raw == C.config_to_dict(C.ExperimentConfig())


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_opens_with_a_run_comment(path):
    cfg = load_config(path, check_paths=False)
    assert isinstance(cfg, C.ExperimentConfig)
    head = path.read_text().splitlines()
    assert head[0].startswith("#")
    comment = " ".join(line for line in head if line.startswith("#"))
    assert "jaxgrpo train" in comment and "Hardware" in comment and "Expected" in comment


def test_shipped_configs_cover_the_required_set():
    names = {p.name for p in CONFIGS}
    assert {"demo.yaml", "grpo_single_task.yaml", "dapo_single_task.yaml",
            "qwen2p5_grpo.yaml"} <= names


def test_overrides_parse_as_yaml_and_set_nested_keys():
    cfg = load_config(None, ["optim.lr=1e-6", "rollout.group_size=16", "loss.dual_clip=3",
                             "algo.sampling.enabled=true", "loss.estimator=dr_grpo",
                             "rollout.prompt_buckets=[16, 64]",
                             "tasks.mixture=[{name: addition, level: 1, ratio: 0.25},"
                             " {name: reverse, ratio: 0.75}]"])
    assert cfg.optim.lr == 1e-6 and isinstance(cfg.optim.lr, float)
    assert cfg.rollout.group_size == 16
    assert cfg.loss.dual_clip == 3.0
    assert cfg.algo.sampling.enabled is True
    assert cfg.loss.estimator is C.Estimator.DR_GRPO
    assert cfg.loss.resolved_scale is C.Scale.NONE
    assert cfg.rollout.prompt_buckets == (16, 64)
    assert cfg.tasks.ratios() == {"addition@1": 0.25, "reverse": 0.75}
    # The demo's other values are untouched.
    assert cfg.train == C.ExperimentConfig().train


def test_override_wins_over_yaml_and_yaml_over_defaults(tmp_path):
    p = _write(tmp_path, "optim:\n  lr: 2.0e-5\n  b2: 0.99\ntrain:\n  steps: 7\n")
    cfg = load_config(p, ["optim.lr=3e-5"])
    assert (cfg.optim.lr, cfg.optim.b2, cfg.train.steps) == (3e-5, 0.99, 7)
    assert cfg.optim.b1 == C.OptimConfig().b1


def test_model_path_override_replaces_the_preset(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    cfg = load_config(None, [f"model.path={tmp_path / 'm'}"])
    assert cfg.model.preset is None and cfg.model.path == str(tmp_path / "m")


def test_config_is_frozen():
    cfg = load_config(None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0


def test_dict_and_yaml_round_trip(tmp_path):
    cfg = load_config(None, ["loss.estimator=blockwise", "loss.block_baselines=[none, ocb]",
                             "tasks.mixture=[{name: sort, level: 2, options: {n: 5}}]",
                             "algo.name=mt_grpo", "tasks.mixture=[{name: a}, {name: b}]"])
    assert C.config_from_dict(C.config_to_dict(cfg)) == cfg
    C.save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(tmp_path / "run" / "config.yaml") == cfg
    flat = C.flatten_config(cfg)
    assert flat["optim.lr"] == cfg.optim.lr and flat["loss.estimator"] == "blockwise"


def test_unknown_key_suggests_the_closest_name(tmp_path):
    assert _error("optim.lrr=1e-6") == "unknown key 'optim.lrr'; did you mean 'optim.lr'?"
    p = _write(tmp_path, "rollout:\n  group_sise: 4\n")
    assert "unknown key 'rollout.group_sise'; did you mean 'rollout.group_size'?" == _error(path=p)
    assert "unknown key 'optimiser'" in _error("optimiser.lr=1")
    msg = _error("algo.mt_grpo.lamda=0.3")
    assert "'algo.mt_grpo.lamda'" in msg and "'algo.mt_grpo.lam'" in msg
    msg = _error("tasks.mixture=[{name: a, ratoi: 1.0}]")
    assert "'tasks.mixture[0].ratoi'" in msg and "'tasks.mixture[0].ratio'" in msg


@pytest.mark.parametrize("override, needle", [
    ("rollout.group_size=abc", "'rollout.group_size' must be an int, got 'abc'"),
    ("rollout.group_size=2.5", "'rollout.group_size' must be an int, got 2.5"),
    ("optim.lr=fast", "'optim.lr' must be a number, got 'fast'"),
    ("algo.sampling.enabled=maybe", "'algo.sampling.enabled' must be a bool"),
    ("loss.estimator=ppo", "'loss.estimator' must be one of 'grpo', 'dr_grpo', 'rloo'"),
    ("rollout.prompt_buckets=64", "'rollout.prompt_buckets' must be a list"),
    ("optim=3", "'optim' must be a mapping"),
    ("optim.lr=-1", "'optim.lr' must be > 0, got -1.0"),
    ("mesh.data=-1", None),
])
def test_wrong_type_or_value_names_the_key(override, needle):
    if needle is None:
        load_config(None, [override])
        return
    assert needle in _error(override)


def test_ratios_must_sum_to_one():
    msg = _error("tasks.mixture=[{name: a, ratio: 0.5}, {name: b, ratio: 0.4}]")
    assert "'tasks.mixture' ratios must sum to 1" in msg and "0.9" in msg
    assert "all with a ratio or all without" in _error(
        "tasks.mixture=[{name: a, ratio: 1.0}, {name: b}]")
    assert "'tasks.mixture[1].ratio' must be >= 0" in _error(
        "tasks.mixture=[{name: a, ratio: 1.5}, {name: b, ratio: -0.5}]")
    assert "repeated: a@1" in _error("tasks.mixture=[{name: a, level: 1}, {name: a, level: 1}]")


def test_batch_must_divide_over_the_data_parallel_axes():
    msg = _error("tasks.prompts_per_step=12", num_devices=8)
    assert "'tasks.prompts_per_step' (12)" in msg and "data-parallel size" in msg and "8" in msg
    load_config(None, ["tasks.prompts_per_step=12"], num_devices=4)
    load_config(None, ["tasks.prompts_per_step=12"])  # device count unknown: not checked
    # fsdp counts as data parallel; tensor does not.
    msg = _error("tasks.prompts_per_step=6", "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=-1")
    assert "= 4" in msg
    load_config(None, ["tasks.prompts_per_step=6", "mesh.data=2", "mesh.tensor=4"],
                num_devices=8)
    # each minibatch must divide too
    assert "each minibatch" in _error("tasks.prompts_per_step=16", "loss.minibatches=4",
                                      num_devices=8)
    assert "'loss.minibatches' (3) must divide" in _error("loss.minibatches=3")
    assert "do not fit 8 devices" in _error("mesh.fsdp=3", num_devices=8)
    assert "at most one mesh axis may be -1" in _error("mesh.fsdp=-1")


def test_micro_batches_divide_each_devices_minibatch_rows():
    assert "'loss.micro_batches' must be > 0" in _error("loss.micro_batches=0")
    assert "'loss.micro_batches' must be an int" in _error("loss.micro_batches=1.5")
    base = ["tasks.prompts_per_step=16", "rollout.group_size=4", "loss.minibatches=2"]
    # 16*4/2 = 32 rows per minibatch; over 8 devices 4 rows each.
    assert load_config(None, base + ["loss.micro_batches=4"], num_devices=8).loss.micro_batches == 4
    msg = _error(*base, "loss.micro_batches=8", num_devices=8)
    assert "'loss.micro_batches' (8) must divide each device's rows" in msg and "= 4)" in msg
    load_config(None, base + ["loss.micro_batches=8"], num_devices=4)  # 8 rows each
    assert "'loss.micro_batches' (3) must divide the rows of a minibatch" in _error(
        *base, "loss.micro_batches=3")


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_group_size_one_with_a_group_relative_estimator(estimator):
    msg = _error("rollout.group_size=1", f"loss.estimator={estimator}")
    assert "'rollout.group_size' must be >= 2" in msg and estimator in msg


def test_group_size_one_is_fine_without_a_group_baseline():
    cfg = load_config(None, ["rollout.group_size=1", "loss.estimator=blockwise",
                             "loss.block_baselines=[batch_mean, none]"])
    assert cfg.rollout.group_size == 1
    assert "group_size" in _error("rollout.group_size=1", "loss.estimator=blockwise",
                                  "loss.block_baselines=[none, ocb]")


def test_missing_model(tmp_path):
    msg = _error(f"model.path={tmp_path / 'nope'}")
    assert "'model.path'" in msg and "does not exist" in msg
    (tmp_path / "empty").mkdir()
    assert "has no config.json" in _error(f"model.path={tmp_path / 'empty'}")
    assert "set exactly one of 'model.path'" in _error("model.preset=null")
    assert "'model.preset' must be one of" in _error("model.preset=huge")
    # check_paths=False skips the filesystem (e.g. a resolved config read on another machine)
    load_config(None, [f"model.path={tmp_path / 'nope'}"], check_paths=False)


def test_missing_file_and_bad_yaml(tmp_path):
    assert _error(path=tmp_path / "none.yaml") == (
        f"config file '{tmp_path / 'none.yaml'}' does not exist")
    p = _write(tmp_path, "optim:\n  lr: 1e-6\n   b1: 0.9\n")
    msg = _error(path=p)
    assert msg.startswith(f"could not parse '{p}' line 3") and "mapping values" in msg
    p = _write(tmp_path, "rollout: [1, 2\n")
    assert "could not parse" in _error(path=p) and "line" in _error(path=p)
    p = _write(tmp_path, "- 1\n- 2\n")
    assert "must hold a mapping" in _error(path=p)
    assert "could not parse the value of override" in _error("optim.lr=[1,")
    assert "must look like section.key=value" in _error("optim.lr")
    assert "'rollout.group_size' is not a section" in _error("rollout.group_size.x=1")


def test_empty_yaml_is_all_defaults(tmp_path):
    assert load_config(_write(tmp_path, "# nothing\n")) == C.ExperimentConfig()


def test_cli_style_message_without_traceback(tmp_path):
    code = ("import sys\nfrom jaxgrpo import config\ntry:\n"
            "    config.load_config(None, ['optim.lrr=1'])\n"
            "except config.ConfigError as e:\n"
            "    print(config.format_error(e), file=sys.stderr); sys.exit(2)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr == "jaxgrpo: error: unknown key 'optim.lrr'; did you mean 'optim.lr'?\n"


def test_config_module_does_not_import_jax():
    code = ("import sys, jaxgrpo.config as c\nc.load_config(None, [])\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('jax', 'jaxlib', 'flax', 'orbax', 'numpy')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_mt_grpo_and_dapo_settings_are_expressible():
    cfg = load_config(None, [
        "algo.name=mt_grpo", "algo.sampling.enabled=true", "algo.sampling.max_rounds=2",
        "algo.sampling.filter=lenient", "algo.mt_grpo.lam=0.3", "algo.mt_grpo.weight_decay=1e-4",
        "algo.mt_grpo.improvement_clip=0.2", "algo.mt_grpo.weight_optimizer=adamw",
        "algo.mt_grpo.update=per_step", "algo.mt_grpo.improvement_reduce=mean",
        "algo.mt_grpo.preserve_from_step=10", "algo.mt_grpo.target_mode=scaled",
        "loss.clip_high=0.28", "loss.adaptive_entropy=true", "loss.entropy_delta=5e-4",
        "algo.overlong.buffer=64"])
    m = cfg.algo.mt_grpo
    assert (m.lam, m.weight_decay, m.improvement_clip) == (0.3, 1e-4, 0.2)
    assert m.weight_optimizer is C.WeightOptimizer.ADAMW and m.update is C.WeightUpdate.PER_STEP
    assert "at least 2 tasks for mt_grpo" in _error(
        "algo.name=mt_grpo", "tasks.mixture=[{name: a}]")
    assert "'algo.mt_grpo.acc_ema' must be in [0, 1)" in _error("algo.mt_grpo.acc_ema=1")


def test_split_cli_args():
    assert C.split_cli_args([]) == (None, [])
    assert C.split_cli_args(["optim.lr=1e-6"]) == (None, ["optim.lr=1e-6"])
    assert C.split_cli_args(["c.yaml", "a.b=1", "c=2"]) == ("c.yaml", ["a.b=1", "c=2"])
    with pytest.raises(ConfigError, match="got 'd.yaml'"):
        C.split_cli_args(["c.yaml", "d.yaml"])


def test_mixture_spec_strings_and_mapping_form():
    a = load_config(None, ["tasks.mixture={reverse@1: 0.25, addition@2: 0.75}"])
    b = load_config(None, ["tasks.mixture=[{name: reverse, level: 1, ratio: 0.25},"
                           " {name: addition, level: 2, ratio: 0.75}]"])
    assert a == b and a.tasks.ratios() == {"reverse@1": 0.25, "addition@2": 0.75}
    c = load_config(None, ["tasks.mixture=[reverse@1, sort]"])
    assert c.tasks.ratios() == {"reverse@1": 0.5, "sort": 0.5}
    assert "'tasks.mixture[0]' must be a task spec" in _error("tasks.mixture=[reverse@x]")
    assert "ratios must sum to 1" in _error("tasks.mixture={reverse@1: 0.5, sort: 0.6}")


@pytest.mark.parametrize("name, tasks, b, g, mb_prompts, lam, rounds", [
    ("mtgrpo_3task_qwen2p5_3b.yaml", 3, 32, 72, 8, 0.2, 10),
    ("mtgrpo_9task_qwen2p5_3b.yaml", 9, 256, 8, 64, 1.2, 2),
])
def test_mt_grpo_paper_configs_carry_the_paper_settings(name, tasks, b, g, mb_prompts, lam, rounds):
    cfg = load_config(ROOT / "configs" / name, check_paths=False)
    assert cfg.algo.name is C.Algo.MT_GRPO
    assert len(cfg.tasks.mixture) == tasks
    assert {t.name for t in cfg.tasks.mixture} == {"rg_countdown", "rg_zebra", "rg_arc1d"}
    assert all(t.options == {"format_bonus": 0.1} for t in cfg.tasks.mixture)
    assert cfg.tasks.prompts_per_step == b and cfg.rollout.group_size == g
    assert cfg.tasks.prompts_per_step // cfg.loss.minibatches == mb_prompts
    assert cfg.algo.mt_grpo.lam == lam and cfg.algo.sampling.max_rounds == rounds
    assert (cfg.loss.clip_low, cfg.loss.clip_high, cfg.loss.kl_coef) == (0.2, 0.28, 0.0)
    assert (cfg.optim.lr, cfg.train.steps, cfg.algo.mt_grpo.weight_lr) == (1e-6, 720, 0.025)
    assert (cfg.algo.sampling.oversample, cfg.algo.mt_grpo.max_inflation) == (3.0, 5.0)


def test_verifier_memory_limit_reaches_the_scorer():
    from jaxgrpo.train import loop

    cfg = load_config(None, ["tasks.verifier_memory_mb=256"])
    assert loop._scorer(cfg).keywords == {"memory_mb": 256}
    assert loop._scorer(C.ExperimentConfig()).keywords == {"memory_mb": 4096}
    with pytest.raises(ConfigError, match="tasks.verifier_memory_mb"):
        load_config(None, ["tasks.verifier_memory_mb=-1"])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_is_measured_or_says_why_it_is_a_template(path):
    """A CPU preset's header quotes what it measured and the command that measured it; any other
    config says it does not run on a CPU. Every results file a header names is committed."""
    head = [line for line in path.read_text().splitlines() if line.startswith("#")]
    comment = " ".join(line.lstrip("# ") for line in head)
    template = re.search(r"not runnable on (a|the 2-core) CPU", comment, re.IGNORECASE)
    measured = "as measured" in comment and ("preset_run.py" in comment or "time make demo"
                                             in comment or "bae_experiment.py" in comment)
    assert template or measured, f"{path.name}: neither measured nor marked a template"
    assert template or "not yet measured" not in comment
    for ref in re.findall(r"benchmarks/results/[\w./-]+", comment):
        assert (ROOT / ref.rstrip(".")).exists(), f"{path.name} names {ref}, not committed"
