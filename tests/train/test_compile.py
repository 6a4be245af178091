"""``jaxgrpo compile``: deviceless TPU compilation through the real CLI, the chip table, the
collective parser and the trainer's ``perf/mfu`` denominator."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import types

import pytest

from jaxgrpo import hardware

ROOT = pathlib.Path(__file__).resolve().parents[2]

TINY_HF = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64,
    "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
    "num_hidden_layers": 1, "vocab_size": 512, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
    "tie_word_embeddings": True, "hidden_act": "silu", "max_position_embeddings": 4096,
    "use_sliding_window": False,
}
# N = 8 prompts x G = 4 = 32 rows of T = 16 + 16 tokens; 2 minibatches; mesh 1 x 4 x 2 = 8 chips.
TINY_YAML = """
model: {{hf_config: {hf}, dtype: bfloat16, param_dtype: float32}}
rollout: {{group_size: 4, max_new_tokens: 16, prompt_buckets: [16]}}
tasks: {{mixture: [{{name: countdown}}, {{name: parity}}], prompts_per_step: 8}}
loss: {{minibatches: 2}}
algo: {{name: mt_grpo}}
mesh: {{data: 1, fsdp: 4, tensor: 2}}
compile: {{mean_prompt_tokens: 10, mean_response_tokens: 8, rounds_per_step: 1.5}}
"""


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    d = tmp_path_factory.mktemp("compile")
    (d / "config.json").write_text(json.dumps(TINY_HF))
    cfg = d / "tiny.yaml"
    cfg.write_text(TINY_YAML.format(hf=d / "config.json"))
    return cfg


def _cli(*args, env_extra=None, timeout=900):
    extra = dict(env_extra or {})
    first = extra.pop("PYTHONPATH", None)  # searched before the repository
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (first, str(ROOT)) if p)
    out = subprocess.run([sys.executable, "-m", "jaxgrpo.cli", *map(str, args)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=timeout)
    errors = [line for line in out.stderr.splitlines() if line.startswith("jaxgrpo: error:")]
    return out, errors


# ---- chip table and perf/mfu ----------------------------------------------------------------


def test_chip_table_per_device_shares():
    v5p = hardware.chip_for_device_kind("TPU v5")
    assert v5p is hardware.CHIPS["v5p"] and hardware.chip_for_device_kind("TPU v5p") is v5p
    assert hardware.chip_for_device_kind("TPU v5 lite") is hardware.CHIPS["v5e"]
    assert hardware.chip_for_device_kind("TPU v6 lite") is hardware.CHIPS["v6e"]
    assert hardware.chip_for_device_kind("cpu") is None
    mega = hardware.per_device(v5p, 2)  # megacore: one device is the whole chip
    assert mega == {"bf16_flops": 4.59e14, "hbm_bytes": 103_000_000_000,
                    "hbm_bandwidth": 2.46e12}
    split = hardware.per_device(v5p, 1)  # one device per TensorCore: half of everything
    assert split["bf16_flops"] == pytest.approx(4.59e14 / 2)
    assert split["hbm_bytes"] == 103_000_000_000 // 2
    assert hardware.per_device(hardware.CHIPS["v6e"], 1)["bf16_flops"] == 9.20e14


def test_peak_flops_uses_the_chip_table_on_tpu_and_measures_on_cpu(monkeypatch):
    from jaxgrpo.train import loop

    monkeypatch.setattr(loop, "measure_matmul_peak", lambda: 123.0)
    fake = [types.SimpleNamespace(device_kind="TPU v5 lite", num_cores=1, platform="tpu")] * 4
    peak, source = loop.peak_flops("bfloat16", fake)
    assert peak == pytest.approx(4 * 1.97e14)
    assert "v5e" in source and "bf16" in source and "tpu_info" in source
    fake_v5p = [types.SimpleNamespace(device_kind="TPU v5", num_cores=2, platform="tpu")] * 2
    assert loop.peak_flops("float32", fake_v5p)[0] == pytest.approx(2 * 4.59e14)
    cpu = [types.SimpleNamespace(device_kind="cpu", num_cores=1, platform="cpu")] * 8
    peak, source = loop.peak_flops("bfloat16", cpu)
    assert peak == 123.0 and "measured" in source


# ---- collective parser ------------------------------------------------------------------------




def test_parse_collectives_counts_and_sizes():
    from jaxgrpo.train.aot import parse_collectives

    hlo = "\n".join([
        "  %all-gather.1 = bf16[32,256]{1,0:T(8,128)(2,1)} all-gather(%p0), dimensions={0}",
        "  %all-reduce.2 = f32[128]{0:T(128)} all-reduce(%x), to_apply=%add",
        "  %ar.3 = (f32[4]{0}, s32[2]{0}) all-reduce(%a, %b), to_apply=%add",
        "  %collective-permute-start = (bf16[24,16]{1,0}, bf16[24,16]{1,0}, u32[], u32[]) "
        "collective-permute-start(%y)",
        "  %collective-permute-done = bf16[24,16]{1,0} collective-permute-done(%cps)",
        "  %ag-start = (bf16[8]{0}, bf16[64]{0}) all-gather-start(%z), dimensions={0}",
        "  %fusion.9 = f32[128,256]{1,0} fusion(%all-gather.1), kind=kOutput",
        "  ROOT %rs = f32[16,8]{1,0} reduce-scatter(%w), dimensions={0}",
    ])
    out = parse_collectives(hlo)
    assert out == {
        "all-gather": {"count": 2, "bytes": 32 * 256 * 2 + 64 * 2},
        "all-reduce": {"count": 2, "bytes": 128 * 4 + 4 * 4 + 2 * 4},
        "collective-permute": {"count": 1, "bytes": 24 * 16 * 2},
        "reduce-scatter": {"count": 1, "bytes": 16 * 8 * 4},
    }


# ---- the CLI ------------------------------------------------------------------------------------


def test_compile_tiny_config_for_v5p_2x2x2(tiny_config, tmp_path):
    report = tmp_path / "report.json"
    out, errors = _cli("compile", tiny_config, "--topology", "v5p:2x2x2", "--json", report)
    assert out.returncode == 0, out.stderr[-3000:]
    assert errors == []
    assert "train_step: tracing and lowering" in out.stderr  # progress lines
    rep = json.loads(report.read_text())
    for key in ("topology", "chips", "hbm_bytes_per_chip", "programs", "param_dtypes",
                "opt_state_dtypes", "step_estimate", "assumptions", "compile_wall_s"):
        assert key in rep, key
    assert rep["topology"] == "v5p:2x2x2" and rep["chips"] == 8
    assert rep["hbm_bytes_per_chip"] == 103_000_000_000
    assert set(rep["programs"]) == {"train_step", "reshard", "prefill", "decode", "generate"}
    assert rep["param_dtypes"] == ["float32"] and rep["model"]["dtype"] == "bfloat16"
    assert set(rep["opt_state_dtypes"]) <= {"float32", "int32"}
    assert rep["assumptions"] == {"mean_prompt_tokens": 10, "mean_response_tokens": 8,
                                  "rounds_per_step": 1.5, "decode_steps_per_round": 16}
    for name, p in rep["programs"].items():
        for key in ("total_bytes_per_chip", "flops_per_chip", "global_flops",
                    "bytes_accessed_per_chip", "collectives", "roofline_s"):
            assert key in p, (name, key)
        assert p["fits"] and 0 < p["total_bytes_per_chip"] < rep["hbm_bytes_per_chip"]
        assert p["flops_per_chip"] >= p["xla_flops_per_chip"]
        assert rep["compile_wall_s"][name] > 0
    # fsdp=4 splits the weights: the train step gathers them and reduces the gradients.
    coll = rep["programs"]["train_step"]["collectives"]
    assert coll["all-gather"]["count"] > 0 and coll["all-reduce"]["count"] > 0
    assert rep["programs"]["reshard"]["collectives"]["all-gather"]["bytes"] > 0
    # The per-chip matmul FLOPs (loops counted by trip count) are at most 1.15 x an eighth of
    # the unpartitioned program's, where a program replicated over the 8 chips gives 8x (XLA may
    # also merge identical passes, e.g. the old-log-prob forward and MT-GRPO's first one, so a
    # little under 1 is expected).
    ts = rep["programs"]["train_step"]
    assert ts["loops_of_unknown_trip_count"] == 0
    assert 0.8 < ts["flops_per_chip_over_share"] <= 1.15, ts["flops_per_chip_over_share"]
    # ... and they are the step's work: within a factor 2 of the model FLOPs (old-log-prob
    # forward 2N, forward and backward 6N, MT-GRPO's two extra forwards 4N per token), where a
    # loop counted once (XLA's raw figure) would give about 1/2 or less.
    n_tok = 32 * 31
    model = 12 * rep["model"]["matmul_params"] * n_tok
    ratio = ts["flops_per_chip"] * 8 / model
    assert 0.6 < ratio < 2.0, ratio
    est = rep["step_estimate"]
    assert est["seconds"] > 0 and 0 < est["mfu"] < 1
    # generated tokens = rounds * prompts per round * G * mean response
    assert est["generated_tokens"] == pytest.approx(
        1.5 * rep["shapes"]["prompts_per_round"] * 4 * 8)
    assert "step estimate" in out.stdout and "train_step" in out.stdout


def test_compile_reports_a_program_that_does_not_fit(tiny_config):
    out, errors = _cli("compile", tiny_config, "--topology", "v5p:2x2x2", "--programs",
                       "prefill", "--hbm-bytes", "1000")
    assert out.returncode == 1, out.stderr[-3000:]
    assert len(errors) == 1 and "does not fit" in errors[0] and "prefill" in errors[0]
    assert "headroom -" in out.stdout  # the table shows the (negative) headroom


def test_compile_without_libtpu_says_how_to_install(tiny_config, tmp_path):
    fake = tmp_path / "nolibtpu" / "libtpu"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('simulated: libtpu is missing')\n")
    out, errors = _cli("compile", tiny_config, "--topology", "v5p:2x2x2",
                       env_extra={"PYTHONPATH": str(fake.parent)})
    assert out.returncode == 2
    assert errors == ["jaxgrpo: error: libtpu is not installed: install it with "
                      "pip install 'jaxgrpo[tpu]'"]


@pytest.mark.parametrize("args, needle", [
    (["--topology", "v9z:2x2"], "'v9z:2x2' is not a TPU topology"),
    (["--topology", "v5p"], "give a TPU topology such as"),
    (["mesh.tensor=4", "--topology", "v5p:2x2x2"], "does not fit v5p:2x2x2 (8 devices)"),
    (["--topology", "v5p:2x2x2", "--programs", "train,decode"], "--programs: unknown"),
    ([], "no topology"),
])
def test_compile_bad_input_is_one_line_before_any_compile(tiny_config, args, needle):
    out, errors = _cli("compile", tiny_config, *args)
    assert out.returncode == 2, out.stderr[-3000:]
    assert len(errors) == 1 and needle in errors[0], errors
    assert "lowering" not in out.stderr


def test_train_refuses_an_architecture_without_weights(tiny_config):
    out, errors = _cli("train", tiny_config)
    assert out.returncode == 2
    assert len(errors) == 1 and "'model.hf_config'" in errors[0] and "model.path" in errors[0]


@pytest.mark.slow
def test_pod_config_layer_reduced_compiles_extrapolate_to_the_committed_full_one(tmp_path):
    """The pod config (Qwen2.5-3B shapes, 32 chips) compiled with 1 and 2 decoder layers: the
    rollout programs (layers unrolled) grow linearly, and 1 + 35 per-layer increments give the
    committed full 36-layer compile's FLOPs and argument bytes (weights and KV cache;
    benchmarks/results/compile, made by benchmarks/compile_configs.py) to within 2 %. (Temporary
    memory is not linear in depth: XLA reuses buffers across layers.)"""
    full = json.loads((ROOT / "benchmarks/results/compile/pod_v5p64_mtgrpo_3task.json")
                      .read_text())
    reps = []
    for layers in (1, 2):
        report = tmp_path / f"pod{layers}.json"
        out, errors = _cli("compile", "configs/pod_v5p64_mtgrpo_3task.yaml", "--layers",
                           str(layers), "--programs", "prefill,decode", "--json", report)
        assert out.returncode == 0 and errors == [], out.stderr[-3000:]
        reps.append(json.loads(report.read_text()))
    one, two = reps
    assert one["topology"] == full["topology"] == "v5p:2x4x4" and one["chips"] == 32
    assert one["model"]["full_num_layers"] == full["model"]["num_layers"] == 36
    for prog in ("prefill", "decode"):
        for key in ("flops_per_chip", "argument_bytes"):
            get = lambda rep, k=key, g=prog: (rep["programs"][g][k] if k == "flops_per_chip"  # noqa: E731
                                              else rep["programs"][g]["memory"][k])
            predicted = get(one) + 35 * (get(two) - get(one))
            assert predicted == pytest.approx(get(full), rel=0.02), (prog, key)


# ---- config --------------------------------------------------------------------------------------


def test_hf_config_and_compile_section_are_validated(tmp_path):
    from jaxgrpo.config import ConfigError, load_config

    cfg = load_config(None, [f"model.hf_config={tmp_path / 'config.json'}"], check_paths=False)
    assert cfg.model.preset is None and cfg.model.hf_config == str(tmp_path / "config.json")
    with pytest.raises(ConfigError, match="'model.hf_config' .* without weights"):
        load_config(None, [f"model.hf_config={tmp_path / 'config.json'}"])
    with pytest.raises(ConfigError, match="set only one"):
        load_config(None, ["model.preset=tiny", "model.hf_config=x.json"], check_paths=False)
    with pytest.raises(ConfigError, match="'compile.mean_response_tokens' .* must not exceed"):
        load_config(None, ["compile.mean_response_tokens=11"], check_paths=False)
    with pytest.raises(ConfigError, match="'compile.rounds_per_step' must be >= 1"):
        load_config(None, ["compile.rounds_per_step=0.5"], check_paths=False)
    with pytest.raises(ConfigError, match="'compile.topology' must be a TPU topology"):
        load_config(None, ["compile.topology=v5p"], check_paths=False)
    # A config with both: training uses path, compile reads hf_config when path is absent.
    cfg = load_config(None, ["model.path=/nonexistent/model", "model.hf_config=c.json"],
                      check_paths=False)
    assert cfg.model.path == "/nonexistent/model" and cfg.model.hf_config == "c.json"


def test_compile_reads_hf_config_when_path_is_absent(tmp_path, monkeypatch):
    from jaxgrpo.config import load_config
    from jaxgrpo.train.aot import model_config

    (tmp_path / "config.json").write_text(json.dumps(TINY_HF))
    cfg = load_config(None, [f"model.hf_config={tmp_path / 'config.json'}",
                             "model.path=/nonexistent/model", "model.dtype=bfloat16"],
                      check_paths=False)
    mcfg, source = model_config(cfg)
    assert source == str(tmp_path / "config.json")
    assert (mcfg.hidden_size, mcfg.num_layers, mcfg.dtype, mcfg.param_dtype) == (
        64, 1, "bfloat16", "float32")
    shipped = load_config(ROOT / "configs/pod_v5p64_llama3p1_8b.yaml", check_paths=False)
    monkeypatch.chdir(ROOT)  # the shipped hf_config paths are relative to the repository
    mcfg, _ = model_config(shipped)
    assert (mcfg.num_layers, mcfg.num_kv_heads, mcfg.rope_type) == (32, 8, "llama3")
    assert mcfg.num_params == pytest.approx(8.03e9, rel=1e-3)


def test_train_step_runs_splash_attention_on_tpu_when_t_is_a_block_multiple(tmp_path):
    """The step's forward covers all ``T = Tp + Tc`` positions (a block multiple), not ``T - 1``:
    traced for a TPU, its attention is the splash kernel, with no fallback to the chunked one."""
    import warnings

    import jax

    from jaxgrpo import sharding as shd
    from jaxgrpo.config import load_config
    from jaxgrpo.train import aot

    try:
        devices = aot.topology_devices("v5p:2x2x2")
    except Exception as exc:  # libtpu missing or unusable
        pytest.skip(f"TPU compilation unavailable: {exc}")
    hf = dict(TINY_HF, hidden_size=256, num_attention_heads=2, num_key_value_heads=2,
              head_dim=128)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    cfg = load_config(None, [f"model.hf_config={tmp_path / 'config.json'}", "model.preset=null",
                             "model.attention=splash", "model.attention_block=128",
                             "rollout.prompt_buckets=[64]", "rollout.max_new_tokens=64",
                             "rollout.group_size=4", "tasks.prompts_per_step=8",
                             "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"],
                      check_paths=False)
    mesh = shd.make_mesh(cfg.mesh, devices=devices)
    mcfg, _ = aot.model_config(cfg)
    (prog,), _ = aot.build_programs(cfg, mcfg, mesh, aot.task_names(cfg), ("train_step",))
    with warnings.catch_warnings(), jax.set_mesh(mesh), jax.default_device(devices[0]):
        warnings.simplefilter("error")  # a fallback to 'chunked' warns
        text = prog.trace().lower().as_text()
    assert "tpu_custom_call" in text
