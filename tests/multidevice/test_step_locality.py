"""The sharded train step does each device's share of the work once: per-device FLOPs about
1/8 of the one-device step, and no activation-sized all-gather or all-to-all in its HLO.

The step is compiled (not run) with 2 minibatches x 2 micro-batches, the per-epoch shuffle and
the MT-GRPO improvement signal on, on 8 simulated CPU devices and, when libtpu is importable, on
a deviceless ``v5p:2x2x2`` TPU topology.
"""

import contextlib
import functools
import os
import re

import jax
import numpy as np
import pytest
from flax import nnx

from jaxgrpo import sharding as shd
from jaxgrpo.model.config import ModelConfig
from jaxgrpo.model.transformer import Transformer
from jaxgrpo.train import batch as batch_lib
from jaxgrpo.train.state import init_train_state, split_model
from jaxgrpo.train.step import StepConfig, make_train_step
from tests.multidevice import _common as C

pytestmark = pytest.mark.multidevice

# N = P*G = 96 rows (8 devices x 2 minibatches x 2 micro-batches x 3), T = 16 positions. Row
# counts (96, 48, 24, 12, ...) differ from every weight dimension (64, 32, 16, 4, 2).
P, G, TP, TC = 48, 2, 4, 12
N, T = P * G, TP + TC
NUM_MB, MICRO = 2, 2
CFG = StepConfig(num_minibatches=NUM_MB, microbatches=MICRO, shuffle=True, num_tasks=2,
                 logprob_chunk=48)
FLOPS_SLACK = 1.15


def _host_batch():
    rng = np.random.default_rng(0)
    ptok = rng.integers(1, C.VOCAB, (P, TP)).astype(np.int32)
    ctok = rng.integers(1, C.VOCAB, (P, G, TC)).astype(np.int32)
    cmask = np.arange(TC)[None, None, :] < rng.integers(1, TC + 1, (P, G))[..., None]
    return batch_lib.assemble(ptok, np.ones((P, TP), bool), ctok, cmask,
                              rng.normal(size=(P, G)).astype(np.float32),
                              old_logp=np.zeros((P, G, TC)), task_ids=np.arange(P) % 2)


def _compile(mesh, mesh_context=True):
    """``(compiled train step for mesh, largest parameter size)``; abstract inputs placed by
    jaxgrpo.sharding."""
    model = Transformer(ModelConfig.tiny(C.VOCAB, hidden_size=32, intermediate_size=64,
                                         num_layers=2, num_heads=2, num_kv_heads=1,
                                         head_dim=16), rngs=nnx.Rngs(0))
    parts, params = split_model(model)
    tx = C.make_tx()
    state = init_train_state(params, tx, 0, with_ref=False)
    batch = _host_batch()
    st_sh = shd.state_shardings(state, mesh, shd.TRAIN_RULES, tx)
    b_sh = jax.tree.map(lambda x: shd.batch_sharding(mesh, x.ndim), batch)
    step = make_train_step(parts, tx, CFG, state_sharding=st_sh, batch_sharding=b_sh)
    # The loop compiles under jax.set_mesh, where the model also pins its activations' rows;
    # without it only the step's own in/out shardings place the rows.
    with jax.set_mesh(mesh) if mesh_context else contextlib.nullcontext():
        compiled = step.lower(shd.abstract_like(state, st_sh),
                              shd.abstract_like(batch, b_sh)).compile()
    return compiled, max(int(x.size) for x in jax.tree.leaves(params))


_OP = re.compile(r"=\s*(\(?[^=]*?\)?)\s+(all-gather|all-to-all)(?:-start)?\(")
_SHAPE = re.compile(r"[a-z]+[0-9]*\[([0-9,]*)\]")
_DIMS = re.compile(r"dimensions=\{([0-9,]*)\}")


def _gathers(hlo: str) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
    """``(op, result shape, gathered / split dimensions)`` of every all-gather and all-to-all
    in optimised HLO text (one entry per result of a tuple-shaped op)."""
    out = []
    for line in hlo.splitlines():
        m = _OP.search(line)
        if m is None:
            continue
        d = _DIMS.search(line[m.end():])
        dims = tuple(int(x) for x in d.group(1).split(",") if x) if d else ()
        for shape in _SHAPE.findall(m.group(1)):
            out.append((m.group(2), tuple(int(x) for x in shape.split(",") if x), dims))
    return out


def _activation_gathers(hlo: str, row_shards: int, max_param: int) -> list:
    """All-gathers / all-to-alls that move rows between devices: a gathered (or split)
    dimension whose size is a row count beyond one device's share (the batch, a minibatch, a
    micro-batch, k devices' micro-batch rows; also flattened with T or T-1 positions), or a
    result with more elements than the largest parameter (``max_param``: it cannot be a weight
    gathered over ``fsdp``) and no axis of one device's rows; an all-to-all without
    ``dimensions`` (the tuple form) counts every axis. Gathers of other dimensions (a row-local
    activation gathered over ``tensor``, a weight over ``fsdp``) are expected."""
    local = N // (row_shards * NUM_MB * MICRO)  # one device's rows of a micro-batch
    own = {local, local * MICRO}  # ... and of a minibatch
    rows = {N // k for k in (1, NUM_MB, MICRO, NUM_MB * MICRO)} | {
        local * k for k in range(2, row_shards * NUM_MB * MICRO + 1)}
    rows |= {r * t for r in rows | {local} for t in (T, T - 1)}
    return [(op, s) for op, s, dims in _gathers(hlo)
            if any(s[d] in rows for d in (dims or range(len(s))) if d < len(s))
            or (int(np.prod(s)) > max_param and not own & set(s))]


@functools.cache
def _one_device_flops(device):
    compiled, _ = _compile(shd.make_mesh((1, 1, 1), [device], axis_types="auto"))
    return compiled.cost_analysis()["flops"]


def _check(devices, sizes, mesh_context=True):
    mesh = shd.make_mesh(sizes, devices, axis_types="auto")
    compiled, max_param = _compile(mesh, mesh_context)
    ratio = compiled.cost_analysis()["flops"] * 8 / _one_device_flops(devices[0])
    hlo = compiled.as_text()
    assert _gathers(hlo) or sizes[1] == 1, "the parser sees no weight all-gather over fsdp"
    bad = _activation_gathers(hlo, sizes[0] * sizes[1], max_param)
    assert not bad, f"activation all-gathers / all-to-alls on mesh {sizes}: {bad[:5]}"
    assert ratio <= FLOPS_SLACK, f"mesh {sizes}: per-device FLOPs x 8 / one-device = {ratio:.3f}"
    return ratio


@pytest.mark.parametrize("sizes", [(8, 1, 1), (2, 2, 2)])
def test_sharded_step_does_no_replicated_work_cpu(sizes):
    _check(jax.devices(), sizes)


def test_pure_data_parallel_step_is_local_by_its_own_shardings():
    """Without a mesh context (no row constraints inside the model) the step's own layout keeps
    the rows local: replicated work would show as FLOPs (8 devices, one row block each)."""
    _check(jax.devices(), (8, 1, 1), mesh_context=False)


def test_sharded_step_does_no_replicated_work_tpu_topology(monkeypatch):
    # Deviceless compilation only: another process on this host may hold libtpu's lock.
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", os.environ.get("ALLOW_MULTIPLE_LIBTPU_LOAD",
                                                                    "1"))
    try:
        from jax.experimental import topologies

        topo = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x2")
    except Exception as e:  # noqa: BLE001 (no libtpu, or it cannot describe the topology)
        pytest.skip(f"no deviceless TPU compilation here (libtpu not importable: {e})")
    with jax.default_device(jax.devices("cpu")[0]):
        _check(list(topo.devices), (2, 2, 2))


def test_activation_gather_parser_sees_rows():
    """The HLO parser flags a gather of rows and ignores a weight-shaped or row-local one."""
    hlo = ("  %ag = f32[96,16,32]{2,1,0} all-gather(f32[12,16,32]{2,1,0} %p), dimensions={0}\n"
           "  %w = f32[64,32]{1,0} all-gather(f32[64,16]{1,0} %q), dimensions={1}\n"
           "  %t = f32[12,15,32]{2,1,0} all-gather(f32[12,15,16]{2,1,0} %u), dimensions={2}\n"
           "  %s = (f32[48,15]{1,0}, f32[64]{0}) all-gather-start(f32[6,15]{1,0} %r), "
           "channel_id=3, dimensions={0}\n")
    assert _gathers(hlo) == [("all-gather", (96, 16, 32), (0,)), ("all-gather", (64, 32), (1,)),
                             ("all-gather", (12, 15, 32), (2,)),
                             ("all-gather", (48, 15), (0,)), ("all-gather", (64,), (0,))]
    assert _activation_gathers(hlo, 4, 64 * 32) == [("all-gather", (96, 16, 32)),
                                                    ("all-gather", (48, 15))]
    big = "  %b = f32[8,48,32]{2,1,0} all-gather(f32[1,48,32]{2,1,0} %h), dimensions={0}\n"
    assert _activation_gathers(big, 8, 64 * 32) == [("all-gather", (8, 48, 32))]
