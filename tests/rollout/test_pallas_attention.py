"""Decode attention on every platform: the Pallas TPU kernel's adapter (checked on CPU through
the kernel's own pure-JAX reference, and compiled deviceless for a TPU), the platform choice,
and the engine's decode round traced for a TPU."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ref_ragged_paged_attention

from jaxgrpo.model import ModelConfig, Transformer
from jaxgrpo.rollout import engine as engine_mod
from jaxgrpo.rollout.engine import (
    decode_attention,
    kernel_decode_args,
    kernel_decode_attention,
    paged_decode_attention,
)
from tests.rollout.test_engine import _numpy_paged_reference, _paged_case

# GQA 4 query heads per KV head; lengths 0, 1, partial, full, ragged.
# (The kernel's reference runs eagerly, one compile per op and length: the others are slow.)
CASES = [dict(seed=0),
         pytest.param(dict(seed=3, s=6, h=8, kh=2, dh=16, ps=8, m=4, num_pages=30),
                      marks=pytest.mark.slow),
         pytest.param(dict(seed=4, s=4, h=2, kh=1, dh=8, ps=4, m=6, num_pages=25),
                      marks=pytest.mark.slow)]


@pytest.mark.parametrize("case", CASES)
def test_kernel_reference_through_the_adapter_equals_paged_and_numpy(case):
    q, pool, table, lengths = _paged_case(**case)
    if case.get("s", 5) > 5:
        lengths = np.array([0, 1, 9, 32, 17, 5], np.int32)
    ref = _numpy_paged_reference(q, pool, table, lengths)
    # The kernel's reference slices the queries at cu_q_lens[i] and loops over num_seqs in
    # Python: it runs eagerly only, on the adapter's converted arguments.
    via_kernel_ref = np.asarray(kernel_decode_attention(q, pool, table, lengths,
                                                        kernel=ref_ragged_paged_attention))
    ours = np.asarray(jax.jit(paged_decode_attention)(q, pool, table, lengths))
    np.testing.assert_allclose(via_kernel_ref, ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(ours, via_kernel_ref, atol=1e-5, rtol=0)
    assert (via_kernel_ref[lengths == 0] == 0).all()


def test_kernel_decode_args():
    table = np.arange(12, dtype=np.int32).reshape(3, 4)
    kv_lens, pages, cu_q, num_seqs = jax.jit(kernel_decode_args)(table, np.array([0, 5, 16]))
    np.testing.assert_array_equal(kv_lens, [1, 5, 16])  # the kernel needs kv_len >= q_len
    np.testing.assert_array_equal(pages, table)
    np.testing.assert_array_equal(cu_q, [0, 1, 2, 3])
    np.testing.assert_array_equal(num_seqs, [3])
    assert all(a.dtype == np.int32 for a in (kv_lens, pages, cu_q, num_seqs))


def test_kernel_supports():
    assert engine_mod.kernel_supports(8, 4, 128, np.float32) is None
    assert engine_mod.kernel_supports(14, 2, 128, jax.numpy.bfloat16) is None
    assert "head_dim 64" in engine_mod.kernel_supports(14, 2, 64, jax.numpy.bfloat16)
    assert "does not tile" in engine_mod.kernel_supports(6, 3, 128, np.float32)


def test_decode_attention_picks_the_pure_jax_path_off_tpu():
    q, pool, table, lengths = _paged_case(seed=5)
    ref = _numpy_paged_reference(q, pool, table, lengths)
    for impl in ("auto", "jax"):
        out = jax.jit(lambda *a, impl=impl: decode_attention(*a, impl=impl,
                                                             pages_per_block=2))(q, pool,
                                                                                 table, lengths)
        np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=0)
    assert engine_mod.trace_platform() == "cpu"
    with pytest.raises(ValueError, match="impl must be one of"):
        decode_attention(q, pool, table, lengths, impl="flash")
    with pytest.raises(ValueError, match="PagedOptions.attention must be one of"):
        engine_mod.PagedOptions(attention="flash")


# ---- deviceless TPU compilation --------------------------------------------------------------


@pytest.fixture(scope="module")
def tpu_device():
    from jaxgrpo.train import aot

    try:
        devices = aot.topology_devices("v5p:2x2x1")
    except Exception as exc:  # libtpu missing or unusable
        pytest.skip(f"TPU compilation unavailable: {exc}")
    return devices[0]


def _abstract(shape, dtype, device):
    return jax.ShapeDtypeStruct(shape, dtype,
                                sharding=jax.sharding.SingleDeviceSharding(device))


def test_auto_attention_compiles_the_pallas_kernel_for_tpu(tpu_device):
    s, h, kh, dh, ps, m, pages = 16, 8, 4, 128, 16, 8, 160
    args = (_abstract((s, h, dh), np.float32, tpu_device),
            _abstract((pages, ps, 2 * kh, dh), np.float32, tpu_device),
            _abstract((s, m), np.int32, tpu_device), _abstract((s,), np.int32, tpu_device))
    with jax.default_device(tpu_device):
        assert engine_mod.trace_platform() == "tpu"
        lowered = jax.jit(decode_attention).lower(*args)
        compiled = lowered.compile()
    assert "tpu_custom_call" in lowered.as_text()
    assert "ragged_paged_attention" in compiled.as_text()
    # Shapes the kernel cannot take: "auto" keeps the pure-JAX loop, "pallas" refuses.
    narrow = (_abstract((s, h, 64), np.float32, tpu_device),
              _abstract((pages, ps, 2 * kh, 64), np.float32, tpu_device), *args[2:])
    with jax.default_device(tpu_device):
        assert "tpu_custom_call" not in jax.jit(decode_attention).lower(*narrow).as_text()
        with pytest.raises(ValueError, match="head_dim 64 is not a multiple of 128"):
            jax.jit(lambda *a: decode_attention(*a, impl="pallas")).lower(*narrow)
    # The same interface off TPU has no custom call.
    cpu_text = jax.jit(decode_attention).lower(
        *(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args)).as_text()
    assert "tpu_custom_call" not in cpu_text


def test_kernel_page_block_fits_the_scoped_vmem(tpu_device):
    """A float32 pool of 8 KV heads x 128 and a 128-page table: the kernel's default block of
    128 pages double-buffers 16 MiB of keys and values and does not compile; the adapter's
    capped block does."""
    s, h, kh, dh, ps, m = 256, 32, 8, 128, 16, 128
    args = (_abstract((s, h, dh), np.float32, tpu_device),
            _abstract((s * m + 1, ps, 2 * kh, dh), np.float32, tpu_device),
            _abstract((s, m), np.int32, tpu_device), _abstract((s,), np.int32, tpu_device))
    with jax.default_device(tpu_device):
        compiled = jax.jit(decode_attention).lower(*args).compile()
    assert "ragged_paged_attention" in compiled.as_text()


@pytest.mark.slow
def test_engine_decode_round_compiles_with_the_kernel_for_tpu(tpu_device):
    """The engine's whole round program (tiny model, 8 slots) traced for a TPU uses the
    kernel in every layer and compiles."""
    cfg = ModelConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=128, dtype="bfloat16")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    sl, ps, width, pages = 8, 16, 4, 40

    def ab(x):
        return _abstract(np.shape(x), x.dtype, tpu_device)

    i32 = _abstract((sl,), np.int32, tpu_device)
    pools = [_abstract((pages, ps, 2 * cfg.num_kv_heads, cfg.head_dim), jax.numpy.bfloat16,
                       tpu_device) for _ in range(cfg.num_layers)]
    args = (jax.tree.map(ab, state), pools, _abstract((sl, width), np.int32, tpu_device),
            i32, i32, _abstract((sl,), bool, tpu_device), i32, i32, i32, i32, i32,
            _abstract((2,), jax.numpy.uint32, tpu_device), _abstract((), np.int32, tpu_device),
            _abstract((), np.int32, tpu_device), _abstract((), np.float32, tpu_device),
            _abstract((4,), np.int32, tpu_device), _abstract((), np.float32, tpu_device))
    static = dict(steps=4, max_new_tokens=32, top_k=0, top_p=1.0, greedy=False,
                  pages_per_block=1, attention="auto")
    with jax.default_device(tpu_device):
        lowered = engine_mod._round_jit.lower(graphdef, *args, **static)
        compiled = lowered.compile()
    text = lowered.as_text()
    assert "tpu_custom_call" in text
    assert text.count("call @ragged_paged_attention(") == cfg.num_layers
    assert compiled.memory_analysis() is not None


@pytest.mark.slow
def test_compile_builds_the_paged_round_with_the_kernel_for_a_pod_config(tmp_path):
    """``jaxgrpo compile``'s programs for a pod config with ``rollout.engine: paged`` include the
    paged engine's round on one chip, with the kernel in every layer; the report's figures are
    one chip's."""
    import json

    from jaxgrpo import sharding as shd
    from jaxgrpo.config import load_config
    from jaxgrpo.train import aot
    from tests.train.test_compile import TINY_HF

    try:
        devices = aot.topology_devices("v5p:2x2x2")
    except Exception as exc:  # libtpu missing or unusable
        pytest.skip(f"TPU compilation unavailable: {exc}")
    hf = dict(TINY_HF, hidden_size=256, num_attention_heads=2, num_key_value_heads=2,
              head_dim=128, num_hidden_layers=2)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    cfg = load_config(None, [f"model.hf_config={tmp_path / 'config.json'}", "model.preset=null",
                             "model.dtype=bfloat16", "rollout.engine=paged",
                             "rollout.max_slots=16", "rollout.steps_per_sync=4",
                             "rollout.prompt_buckets=[32]", "rollout.max_new_tokens=32",
                             "rollout.group_size=4", "tasks.prompts_per_step=8",
                             "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"],
                      check_paths=False)
    mesh = shd.make_mesh(cfg.mesh, devices=devices)
    mcfg, _ = aot.model_config(cfg)
    (prog,), _ = aot.build_programs(cfg, mcfg, mesh, aot.task_names(cfg), ("paged_round",))
    assert prog.mesh.size == 1
    with jax.set_mesh(mesh), jax.default_device(devices[0]), jax.set_mesh(prog.mesh):
        lowered = prog.trace().lower()
        compiled = lowered.compile()
    text = lowered.as_text()
    assert "tpu_custom_call" in text
    assert text.count("call @ragged_paged_attention(") == mcfg.num_layers
    rep = aot.analyse(compiled, devices=1, device_info={"bf16_flops": 1e15,
                                                        "hbm_bandwidth": 1e12,
                                                        "hbm_bytes": 1 << 36})
    assert rep["total_bytes_per_chip"] > 0
    # The static engine's configs build no such program.
    static = load_config(None, [f"model.hf_config={tmp_path / 'config.json'}",
                                "model.preset=null", "mesh.data=1", "mesh.fsdp=4",
                                "mesh.tensor=2"], check_paths=False)
    progs, _ = aot.build_programs(static, mcfg, mesh, aot.task_names(static), ("paged_round",))
    assert progs == []
