"""Ahead-of-time ("deviceless") compilation of a training step's programs for a TPU topology.

``jaxgrpo compile CONFIG --topology v5p:2x4x4`` runs on any machine with libtpu installed (no TPU
needed): the topology's devices come from ``jax.experimental.topologies.get_topology_desc``,
the mesh is ``cfg.mesh`` over them (:func:`jaxgrpo.sharding.make_mesh`), and every input is a
``jax.ShapeDtypeStruct`` carrying its sharding, so nothing is materialised. The programs are the
trainer's own (built with the same constructors as :mod:`jaxgrpo.train.loop`):

- ``train_step``: the jitted, donated step (:func:`jaxgrpo.train.step.make_train_step`) on a
  batch of ``N = P*G`` rows of ``T = max(prompt_buckets) + max_new_tokens`` tokens; for
  ``algo.name: mt_grpo`` the improvement passes (one forward before and one after each
  minibatch update) are inside it.
- ``reshard``: the parameters moved from the training to the rollout layout (only when they
  differ, i.e. ``fsdp > 1``).
- ``prefill``: one sampler round's prompts ``[R, Tp]`` (``R`` = prompts per round, padded to the
  data-parallel size; ``Tp`` = the largest bucket) into a fresh KV cache.
- ``decode``: one decode step (``forward_cached`` of one token + sampling) of ``R*G`` rows over
  the whole ``Tp + max_new_tokens`` KV cache, the cache donated.
- ``generate``: the whole sampler program (prefill, cache repeat, decode ``while_loop``); its
  memory is the real rollout peak.
- ``paged_round`` (only with ``rollout.engine: paged``): one round of the paged engine
  (``rollout.steps_per_sync`` decode steps of ``rollout.max_slots`` slots over its page pools,
  :mod:`jaxgrpo.rollout.engine`), on ONE chip of the topology, as that engine runs on one
  device; traced for a TPU, its decode attention is the Pallas ragged paged attention kernel
  when the head width is a multiple of 128. The step estimate does not use it.

For each program :func:`analyse` reads ``memory_analysis`` (per device: arguments, outputs,
temporaries, code; ``total = argument + output - alias + temp + code``), ``cost_analysis``
(FLOPs and bytes accessed per device) and the collectives in the optimised HLO, and gives a
roofline time ``max(FLOPs / peak, bytes / HBM bandwidth)`` per device (:mod:`jaxgrpo.hardware`).
:func:`step_estimate` turns them into one RL step's time and MFU under the ``compile`` section's
stated assumptions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from jaxgrpo import hardware
from jaxgrpo import sharding as shd
from jaxgrpo.config import Estimator, ExperimentConfig, InputError
from jaxgrpo.core import modes
from jaxgrpo.model import ModelConfig, Transformer
from jaxgrpo.rollout import sampler as sampler_lib
from jaxgrpo.train import batch as batch_lib
from jaxgrpo.train import loop
from jaxgrpo.train.flops import hlo_matmul_flops, jaxpr_matmul_flops
from jaxgrpo.train.state import ModelParts
from jaxgrpo.train.step import make_train_step

PROGRAMS = ("train_step", "reshard", "prefill", "decode", "generate", "paged_round")
LIBTPU_HINT = "libtpu is not installed: install it with pip install 'jaxgrpo[tpu]'"


class CompileError(InputError):
    """Bad input to ``jaxgrpo compile`` (one line), raised before anything compiles."""


class LibTPUMissing(RuntimeError):
    """libtpu (the TPU compiler) cannot be imported."""


# ---- topology and model -------------------------------------------------------------------------


def topology_devices(name: str) -> list:
    """The devices of TPU topology ``name`` (e.g. ``"v5p:2x4x4"``), without any TPU.

    Raises:
        LibTPUMissing: libtpu cannot be imported.
        CompileError: an unknown or malformed topology name.
    """
    try:
        import libtpu  # noqa: F401  (the compiler behind get_topology_desc)
    except ImportError:
        raise LibTPUMissing(LIBTPU_HINT) from None
    if not isinstance(name, str) or ":" not in name:
        raise CompileError(f"--topology {name!r}: give a TPU topology such as 'v5p:2x4x4' "
                           "(generation:chips along each axis)")
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=name)
    except Exception as e:  # the runtime raises JaxRuntimeError (INVALID_ARGUMENT) here
        text = " ".join(str(e).split("=== Source Location Trace")[0].split())
        if "INVALID_ARGUMENT" in text:
            raise CompileError(f"--topology {name!r} is not a TPU topology libtpu knows "
                               f"({text})") from None
        raise CompileError(f"libtpu could not describe topology {name!r}: {text}") from None
    return list(topo.devices)


def model_config(cfg: ExperimentConfig) -> tuple[ModelConfig, str]:
    """``(ModelConfig, where it came from)``: ``model.hf_config`` when ``model.path`` is unset or
    has no config.json, else the path's config.json, else the preset. Only config.json is read;
    compute and parameter dtypes come from ``model.dtype`` / ``model.param_dtype``, attention,
    rematerialisation and layer scan from the ``model`` section, as in training."""
    import os

    from jaxgrpo.train.policy import model_overrides

    spec = cfg.model
    dt = dict(dtype=str(spec.dtype), param_dtype=str(spec.param_dtype), **model_overrides(spec))
    if spec.preset is not None:
        from jaxgrpo.model import build_demo_tokenizer

        with tempfile.TemporaryDirectory() as tmp:
            vocab = len(build_demo_tokenizer(os.path.join(tmp, "tokenizer")))
        make = ModelConfig.tiny if spec.preset == "tiny" else ModelConfig.demo
        return make(vocab, **dt), f"preset {spec.preset}"
    path_json = (os.path.join(os.path.expanduser(spec.path), "config.json")
                 if spec.path is not None else None)
    if path_json is not None and os.path.isfile(path_json):
        source = path_json
    elif spec.hf_config is not None:
        source = os.path.expanduser(spec.hf_config)
        if not os.path.isfile(source):
            raise CompileError(f"'model.hf_config' {spec.hf_config!r} does not exist: give the "
                               "path of an HF config.json")
    else:
        raise CompileError(f"'model.path' {spec.path!r} has no config.json and 'model.hf_config' "
                           "is unset: give either (compile reads only the architecture)")
    import transformers

    from jaxgrpo.model.hf import config_from_hf

    try:
        hf = transformers.AutoConfig.from_pretrained(source)
        mcfg = config_from_hf(hf, dtype=dt["dtype"])
    except (OSError, ValueError, KeyError) as e:
        raise CompileError(f"{source}: {' '.join(str(e).split())}") from None
    return dataclasses.replace(mcfg, **dt), source


def abstract_model(mcfg: ModelConfig):
    """``(graphdef, params, rest)`` of ``Transformer(mcfg)`` as ``nnx.split(.., nnx.Param, ...)``
    gives them, every leaf a ``jax.ShapeDtypeStruct`` (nothing allocated)."""
    with jax.set_mesh(None):  # outside a mesh: logical names are not mesh axes
        return nnx.split(nnx.eval_shape(lambda: Transformer(mcfg, rngs=nnx.Rngs(0))),
                         nnx.Param, ...)


def task_names(cfg: ExperimentConfig) -> list[str]:
    """The mixture's task names (as :func:`jaxgrpo.train.loop.resolve_tasks` orders them),
    without building the tasks."""
    from jaxgrpo.tasks import MIXTURES

    mix = cfg.tasks.mixture
    if isinstance(mix, str):
        if mix not in MIXTURES:
            raise CompileError(f"unknown mixture {mix!r}; known: {', '.join(MIXTURES)}")
        return list(dict(MIXTURES[mix]))
    return list(dict.fromkeys(t.spec for t in mix))


def kv_cache_sharding(rows: int, num_kv_heads: int, slots: int, mesh) -> NamedSharding:
    """The sampler's KV cache ``[rows, Hkv, S, Dh]`` sharding (``jaxgrpo.sharding.kv_cache_spec``,
    the rule the sampler pins its cache to)."""
    return NamedSharding(mesh, shd.kv_cache_spec(rows, num_kv_heads, slots, mesh))


# ---- analysis -----------------------------------------------------------------------------------

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2,
                "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8,
                "c128": 16}
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "ragged-all-to-all",
                "collective-permute", "collective-broadcast")
_OP_RE = re.compile(r"=\s*(?P<type>\(.*?\)|\S+)\s+(?P<op>" + "|".join(
    sorted(_COLLECTIVES, key=len, reverse=True)) + r")(?P<start>-start)?\(")
_ARRAY_RE = re.compile(r"\b(?P<dt>[a-z]+\d*(?:e\d+m\d+\w*)?)\[(?P<dims>[\d,]*)\]")


def _array_bytes(type_text: str) -> list[float]:
    out = []
    for m in _ARRAY_RE.finditer(type_text):
        dt = m.group("dt")
        size = _DTYPE_BYTES.get(dt, 1 if dt.startswith("f8") else 4)
        dims = [int(d) for d in m.group("dims").split(",") if d]
        out.append(size * math.prod(dims))
    return out


def parse_collectives(hlo_text: str) -> dict[str, dict[str, float]]:
    """``{kind: {"count", "bytes"}}`` over the collectives of an optimised HLO module.

    ``count`` is static (an op inside a loop body counts once); ``bytes`` is the size of each
    op's result (for an async ``-start`` op: its output buffer, the largest array of the
    tuple, or the sum of the outputs for an all-reduce). ``-done`` halves are not counted.
    """
    out: dict[str, dict[str, float]] = {}
    for line in hlo_text.splitlines():
        m = _OP_RE.search(line)
        if m is None:
            continue
        sizes = _array_bytes(m.group("type"))
        if m.group("start") and m.group("op") != "all-reduce":
            nbytes = max(sizes, default=0.0)
        else:
            nbytes = sum(sizes)
        slot = out.setdefault(m.group("op"), {"count": 0, "bytes": 0.0})
        slot["count"] += 1
        slot["bytes"] += nbytes
    return out


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per device program
        cost = cost[0] if cost else {}
    return dict(cost or {})


def analyse(compiled, *, devices: int, device_info: dict,
            global_matmul_flops: float | None = None) -> dict:
    """Per-device memory, FLOPs, bytes, collectives and roofline time of a compiled program.

    XLA's ``cost_analysis`` counts the body of a loop once. ``flops_per_chip`` is therefore the
    larger of XLA's figure and the program's matmul FLOPs with every loop body counted by its
    trip count (:func:`jaxgrpo.train.flops.hlo_matmul_flops`); XLA's bytes accessed are scaled
    by the same factor (an approximation: the loops' bytes in proportion to their FLOPs).
    ``global_flops`` is the matmul FLOPs of the unpartitioned program (its jaxpr, global shapes,
    :func:`~jaxgrpo.train.flops.jaxpr_matmul_flops`), so ``flops_per_chip / (global_flops /
    devices)`` near 1 says no device repeats another's work. XLA's raw figures are kept
    (``xla_*``).
    """
    mem = compiled.memory_analysis()
    get = lambda k: int(getattr(mem, k, 0) or 0)
    memory = {
        "argument_bytes": get("argument_size_in_bytes"),
        "output_bytes": get("output_size_in_bytes"),
        "alias_bytes": get("alias_size_in_bytes"),
        "temp_bytes": get("temp_size_in_bytes"),
        "generated_code_bytes": get("generated_code_size_in_bytes"),
    }
    total = (memory["argument_bytes"] + memory["output_bytes"] - memory["alias_bytes"]
             + memory["temp_bytes"] + memory["generated_code_bytes"])
    cost = _cost(compiled)
    xla_flops = float(cost.get("flops", 0.0))
    xla_bytes = float(cost.get("bytes accessed", 0.0))
    hlo_flops, unknown_loops = hlo_matmul_flops(compiled.as_text())
    flops = max(xla_flops, hlo_flops)
    loop_factor = flops / xla_flops if xla_flops > 0 else 1.0
    nbytes = xla_bytes * loop_factor
    roof = max(flops / device_info["bf16_flops"], nbytes / device_info["hbm_bandwidth"])
    return {
        "memory": memory,
        "total_bytes_per_chip": total,
        "headroom_bytes_per_chip": device_info["hbm_bytes"] - total,
        "fits": total <= device_info["hbm_bytes"],
        "flops_per_chip": flops,
        "xla_flops_per_chip": xla_flops,
        "xla_bytes_accessed_per_chip": xla_bytes,
        "matmul_flops_per_chip": hlo_flops,
        "loops_of_unknown_trip_count": unknown_loops,
        "loop_factor": loop_factor,
        "global_flops": global_matmul_flops if global_matmul_flops is not None else flops * devices,
        "flops_per_chip_over_share": (hlo_flops / (global_matmul_flops / devices)
                                      if global_matmul_flops else None),
        "bytes_accessed_per_chip": nbytes,
        "collectives": parse_collectives(compiled.as_text()),
        "roofline_s": roof,
        "bound": "compute" if flops / device_info["bf16_flops"] >= nbytes /
        device_info["hbm_bandwidth"] else "memory",
    }


_OOM_RE = re.compile(r"(?:Used|used)\s+([\d.]+)([KMGT]?)\s+of\s+([\d.]+)([KMGT]?)\s+hbm", re.I)


def _oom_line(err: Exception) -> str | None:
    """The XLA compiler's "ran out of HBM" message, condensed (None: another error)."""
    text = " ".join(str(err).split())
    if "RESOURCE_EXHAUSTED" not in text and "out of memory" not in text.lower():
        return None
    m = _OOM_RE.search(text)
    if m:
        return f"XLA: used {m.group(1)}{m.group(2)} of {m.group(3)}{m.group(4)} hbm"
    return "XLA: " + text[:300]


# ---- programs -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Program:
    name: str
    note: str
    trace: object  # () -> jax.stages.Traced
    mesh: object = None  # traced and lowered under this mesh instead of the pod's (one chip)


def rows_per_round(cfg: ExperimentConfig, names, dp: int) -> int:
    """Prompts in one sampler round: the batch sampler's round size, padded to ``dp``."""
    r = loop.make_batch_sampler(cfg, names, cfg.tasks.seed).round_size
    return -(-r // dp) * dp


def prompts_per_call(cfg: ExperimentConfig, names, dp: int) -> tuple[int, int]:
    """``(prompts per sampler call, calls per round)``: a round is rolled out
    ``rollout.max_prompts_per_call`` prompts at a time when that is set."""
    r = rows_per_round(cfg, names, dp)
    mp = cfg.rollout.max_prompts_per_call
    if mp is None or mp >= r:
        return r, 1
    return mp, -(-r // mp)


def build_programs(cfg: ExperimentConfig, mcfg: ModelConfig, mesh, names,
                   only=PROGRAMS) -> tuple[list[Program], dict]:
    """The programs of one RL step on ``mesh``, abstract inputs only; and the abstract state
    (for its dtypes) and shapes used."""
    rc, lc = cfg.rollout, cfg.loss
    graphdef, params, rest = abstract_model(mcfg)
    if jax.tree.leaves(rest):
        raise CompileError("the model has non-parameter variables; compile supports "
                           "parameter-only models")
    parts = ModelParts(graphdef, rest)
    tx = loop.optimizer(cfg)
    abstract_state = jax.eval_shape(lambda p: loop.initial_state(cfg, p, tx), params)
    state_sh = shd.state_shardings(abstract_state, mesh, shd.TRAIN_RULES, tx)
    state_in = shd.abstract_like(abstract_state, state_sh)
    blockwise = lc.estimator == Estimator.BLOCKWISE
    batch_sh = loop.train_batch_shardings(mesh, blockwise=blockwise)
    step_cfg = loop.step_config(cfg, len(names))

    p, g = cfg.tasks.prompts_per_step, rc.group_size
    tp, tn = max(rc.prompt_buckets), rc.max_new_tokens
    n, t = p * g, tp + tn
    sds = jax.ShapeDtypeStruct
    f32 = jnp.float32
    batch = batch_lib.TrainBatch(
        tokens=sds((n, t), jnp.int32, sharding=batch_sh.tokens),
        attn_mask=sds((n, t), jnp.bool_, sharding=batch_sh.attn_mask),
        loss_mask=sds((n, t - 1), jnp.bool_, sharding=batch_sh.loss_mask),
        advantages=sds((n, t - 1) if blockwise else (n,), f32, sharding=batch_sh.advantages),
        old_logp=sds((n, t - 1), f32, sharding=batch_sh.old_logp),
        token_weights=sds((n, t - 1), f32, sharding=batch_sh.token_weights),
        sequence_weights=sds((n,), f32, sharding=batch_sh.sequence_weights),
        task_ids=sds((n,), jnp.int32, sharding=batch_sh.task_ids),
    )
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    r, calls = prompts_per_call(cfg, names, dp)  # prompts per sampler call
    nr, s = r * g, tp + tn
    train_psh = shd.param_shardings(params, mesh, shd.TRAIN_RULES)
    roll_psh = loop.rollout_param_shardings(params, mesh)
    roll_params = shd.abstract_like(params, roll_psh if roll_psh is not None else train_psh)
    rows2 = shd.batch_sharding(mesh, 2)
    rows1 = shd.batch_sharding(mesh, 1)
    rep = shd.replicated(mesh)
    cache_sh = kv_cache_sharding(nr, mcfg.num_kv_heads, s, mesh)  # after the repeat to G rows
    prompt_cache_sh = kv_cache_sharding(r, mcfg.num_kv_heads, s, mesh)
    greedy = rc.temperature == 0
    sample = functools.partial(sampler_lib._sample, greedy=greedy,
                               temperature=rc.temperature or 1.0, top_k=rc.top_k, top_p=rc.top_p)
    key_in = sds((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=rep)
    algo_note = (" with MT-GRPO's improvement passes (a forward before and after each update)"
                 if modes.ALGORITHMS[cfg.algo.name].task_weights else "")
    progs = []

    if "train_step" in only:
        train_step = make_train_step(parts, tx, step_cfg, state_sharding=state_sh,
                                     batch_sharding=batch_sh)
        progs.append(Program(
            "train_step",
            f"N={n} rows x T={t}, {lc.epochs} epoch(s) x {lc.minibatches} minibatches x "
            f"{step_cfg.microbatches} micro-batch(es){algo_note}",
            lambda: train_step.trace(state_in, batch)))

    if "reshard" in only and roll_psh is not None:
        move = jax.jit(lambda x: x, out_shardings=shd.match_structure(roll_psh, params))
        train_params = shd.abstract_like(params, train_psh)
        progs.append(Program("reshard", "params, training layout -> rollout layout",
                             lambda: move.trace(train_params)))

    def merged(prm):
        return nnx.merge(graphdef, prm, rest)

    if "prefill" in only:
        def prefill(prm, tokens, mask):
            model = merged(prm)
            positions = jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)
            key_valid = jnp.concatenate([mask, jnp.zeros((r, tn), bool)], axis=1)
            hidden, cache = model.forward_cached(tokens, positions, model.init_cache(r, s),
                                                 jnp.int32(0), key_valid)
            return model.logits(hidden[:, -1]), cache

        cache_out = [(prompt_cache_sh, prompt_cache_sh)] * mcfg.num_layers
        pre = jax.jit(prefill, out_shardings=(rows2, cache_out))
        progs.append(Program(
            "prefill", f"{r} prompts x Tp={tp} into a cache of S={s} slots",
            lambda: pre.trace(roll_params, sds((r, tp), jnp.int32, sharding=rows2),
                              sds((r, tp), jnp.bool_, sharding=rows2))))

    if "decode" in only:
        def decode(prm, cache, key_valid, prev, positions, slot, key):
            model = merged(prm)
            hidden, cache = model.forward_cached(prev[:, None], positions[:, None], cache, slot,
                                                 key_valid)
            tok, lp = sample(model.logits(hidden[:, 0]), key)
            return tok, lp, cache

        cache_in = [(sds((nr, mcfg.num_kv_heads, s, mcfg.head_dim), jnp.dtype(mcfg.dtype),
                         sharding=cache_sh),) * 2 for _ in range(mcfg.num_layers)]
        dec = jax.jit(decode, donate_argnums=(1,),
                      out_shardings=(rows1, rows1, [(cache_sh, cache_sh)] * mcfg.num_layers))
        progs.append(Program(
            "decode", f"one token for {nr} rows ({r} prompts x G={g}) over S={s} cache slots",
            lambda: dec.trace(roll_params, cache_in, sds((nr, s), jnp.bool_, sharding=rows2),
                              sds((nr,), jnp.int32, sharding=rows1),
                              sds((nr,), jnp.int32, sharding=rows1),
                              sds((), jnp.int32, sharding=rep), key_in)))

    if "generate" in only:
        full_graphdef = nnx.graphdef(merged(params))
        state = nnx.merge_state(roll_params, rest)
        eos = sds((4,), jnp.int32, sharding=rep)
        progs.append(Program(
            "generate", f"the whole sampler: {r} prompts x G={g}, up to {tn} new tokens (its "
            "FLOPs and bytes count the decode loop's body once: memory is the figure here)",
            lambda: sampler_lib._generate_jit.trace(
                full_graphdef, state, sds((r, tp), jnp.int32, sharding=rows2),
                sds((r, tp), jnp.bool_, sharding=rows2), key_in, sds((), jnp.float32,
                                                                     sharding=rep), eos,
                num_samples=g, max_new_tokens=tn, top_k=int(rc.top_k), top_p=float(rc.top_p),
                stop_sequences=(), greedy=greedy, pad_id=0)))

    if "paged_round" in only and rc.engine == "paged":
        from jaxgrpo.rollout import engine as engine_lib

        opts = loop.paged_options(rc, None)
        # One chip, in a one-device mesh of the same axes (traced under it, not the pod's).
        one_mesh = jax.sharding.Mesh(mesh.devices.flat[:1].reshape((1,) * mesh.devices.ndim),
                                     mesh.axis_names)
        one = NamedSharding(one_mesh, jax.sharding.PartitionSpec())
        sl, ps = opts.max_slots, opts.page_size
        pages = engine_lib.pool_pages(opts, num_samples=g, prompt_bucket=tp, max_new_tokens=tn)
        width = -(-(tp + tn) // ps)
        on_one = lambda x: sds(x.shape, x.dtype, sharding=one)
        state1 = jax.tree.map(on_one, nnx.merge_state(params, rest))
        pool_dt = jnp.bfloat16 if mcfg.dtype == "bfloat16" else jnp.float32
        pools = [sds((pages, ps, 2 * mcfg.num_kv_heads, mcfg.head_dim), pool_dt, sharding=one)
                 for _ in range(mcfg.num_layers)]
        i32 = sds((sl,), jnp.int32, sharding=one)
        scalar = lambda dt: sds((), dt, sharding=one)
        round_args = (state1, pools, sds((sl, width), jnp.int32, sharding=one), i32, i32,
                      sds((sl,), jnp.bool_, sharding=one), i32, i32, i32, i32, i32,
                      on_one(key_in), scalar(jnp.int32), scalar(jnp.int32),
                      scalar(jnp.float32), sds((4,), jnp.int32, sharding=one),
                      scalar(jnp.float32))
        round_static = dict(steps=opts.steps_per_sync, max_new_tokens=tn, top_k=int(rc.top_k),
                            top_p=float(rc.top_p), greedy=greedy,
                            pages_per_block=opts.pages_per_block, attention=opts.attention)
        full_graphdef = nnx.graphdef(merged(params))
        progs.append(Program(
            "paged_round", f"one paged-engine round on ONE chip: {rc.steps_per_sync} steps of "
            f"{sl} slots over {pages} pages of {ps} tokens per layer",
            lambda: engine_lib._round_jit.trace(full_graphdef, *round_args, **round_static),
            mesh=one_mesh))

    shapes = {"train_rows": n, "train_tokens_per_row": t, "prompts_per_call": r,
              "calls_per_round": calls, "prompts_per_round": rows_per_round(cfg, names, dp),
              "rollout_rows": nr, "cache_slots": s, "prompt_bucket": tp}
    return progs, {"state": abstract_state, "shapes": shapes}


def _dtype_names(tree) -> list[str]:
    return sorted({jnp.dtype(x.dtype).name for x in jax.tree.leaves(tree)})


# ---- the whole step -----------------------------------------------------------------------------


def assumptions(cfg: ExperimentConfig) -> dict:
    """The ``compile`` section with its defaults resolved (the estimate's stated inputs)."""
    cc, rc = cfg.compile, cfg.rollout
    return {
        "mean_prompt_tokens": cc.mean_prompt_tokens or max(rc.prompt_buckets),
        "mean_response_tokens": cc.mean_response_tokens or rc.max_new_tokens,
        "rounds_per_step": float(cc.rounds_per_step),
        "decode_steps_per_round": cc.decode_steps_per_round or rc.max_new_tokens,
    }


def step_estimate(programs: dict, assume: dict, shapes: dict, *, matmul_params: int,
                  group_size: int, prompts_per_step: int, mt_grpo: bool, chips: int,
                  peak_per_chip: float) -> dict | None:
    """One RL step's time and MFU from the compiled programs' rooflines.

    Time: ``rollout = rounds * calls * (prefill + decode_steps * decode)`` (``calls`` sampler
    calls per round, see ``rollout.max_prompts_per_call``), ``step = rollout + reshard +
    train_step``, each program at its roofline (so the time is a lower bound and the MFU an
    upper bound for these programs).

    Model FLOPs count real tokens only, as ``perf/mfu`` does in the trainer, with ``N`` the
    matmul parameters: rollout ``2 N (generated + prompt tokens)`` with ``generated = rounds * R
    * G * mean_response`` and ``prompt = rounds * R * mean_prompt`` (``R`` prompts per round;
    the prompt is prefilled once per prompt); training ``8 N`` per trained token (old-log-prob
    forward, forward and backward) plus ``4 N`` for MT-GRPO's two improvement forwards, over
    ``B * G * (mean_prompt + mean_response)`` tokens. Padding, rematerialisation and attention
    FLOPs are hardware work, not model FLOPs (the compiled figures are reported separately).
    ``MFU = model FLOPs / (step * chips * peak)``. None when a needed program did not compile.
    """
    need = ("train_step", "prefill", "decode")
    if any(programs.get(k, {}).get("roofline_s") is None for k in need):
        return None
    rounds, steps = assume["rounds_per_step"], assume["decode_steps_per_round"]
    calls = shapes.get("calls_per_round", 1)
    r = shapes["prompts_per_round"]
    per_call = programs["prefill"]["roofline_s"] + steps * programs["decode"]["roofline_s"]
    rollout = rounds * calls * per_call
    reshard = programs.get("reshard", {}).get("roofline_s") or 0.0
    train = programs["train_step"]["roofline_s"]
    seconds = rollout + reshard + train
    mean_p, mean_r = assume["mean_prompt_tokens"], assume["mean_response_tokens"]
    generated = rounds * r * group_size * mean_r
    prompt = rounds * r * mean_p
    rollout_flops = 2.0 * matmul_params * (generated + prompt)
    trained_tokens = prompts_per_step * group_size * (mean_p + mean_r)
    train_flops = (8.0 + (4.0 if mt_grpo else 0.0)) * matmul_params * trained_tokens
    model_flops = rollout_flops + train_flops
    return {
        "seconds": seconds, "rollout_s": rollout, "reshard_s": reshard, "train_s": train,
        "sampler_calls_per_round": calls, "decode_steps_per_round": steps,
        "generated_tokens": generated, "trained_tokens": trained_tokens,
        "rollout_model_flops": rollout_flops, "train_model_flops": train_flops,
        "train_step_compiled_flops": programs["train_step"]["global_flops"],
        "model_flops": model_flops,
        "mfu": model_flops / (seconds * chips * peak_per_chip) if seconds > 0 else 0.0,
    }


def run(cfg: ExperimentConfig, topology: str, *, only=PROGRAMS, hbm_bytes: int | None = None,
        layers: int | None = None, stream=sys.stderr) -> dict:
    """Compiles every program of ``cfg``'s RL step for ``topology``; returns the report.

    ``hbm_bytes`` replaces the chip's HBM capacity in the fit check; ``layers`` keeps only the
    first that many decoder layers (a quicker compile; memory and FLOPs then cover those).

    Raises:
        LibTPUMissing, CompileError: before anything compiles.
    """
    t_all = time.perf_counter()
    say = lambda msg: print(f"[jaxgrpo compile] {msg}", file=stream, flush=True)
    devices = topology_devices(topology)
    kind, cores = devices[0].device_kind, getattr(devices[0], "num_cores", None)
    chip = hardware.chip_for_device_kind(kind)
    if chip is None:
        raise CompileError(f"--topology {topology!r}: device kind {kind!r} is not in "
                           f"jaxgrpo.hardware's table ({', '.join(hardware.CHIPS)})")
    info = hardware.per_device(chip, cores)
    if hbm_bytes is not None:
        info["hbm_bytes"] = int(hbm_bytes)
    try:
        mesh = shd.make_mesh(cfg.mesh, devices=devices)
    except ValueError as e:
        sizes = {"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp, "tensor": cfg.mesh.tensor}
        raise CompileError(f"mesh {sizes} does not fit {topology} ({len(devices)} devices): "
                           f"{e}") from None
    from jaxgrpo.config import ConfigError, validate

    try:
        validate(cfg, num_devices=len(devices), check_paths=False)
    except ConfigError as e:
        raise CompileError(str(e)) from None
    mcfg, source = model_config(cfg)
    full_layers = mcfg.num_layers
    if layers is not None:
        if not isinstance(layers, int) or layers < 1:
            raise CompileError(f"--layers must be a positive int, got {layers!r}")
        mcfg = dataclasses.replace(mcfg, num_layers=min(layers, full_layers))
    names = task_names(cfg)
    unknown = [k for k in only if k not in PROGRAMS]
    if unknown:
        raise CompileError(f"--programs: unknown {unknown}; known: {', '.join(PROGRAMS)}")
    say(f"{topology}: {len(devices)} devices ({kind}, {cores} TensorCore(s) each), mesh "
        f"{dict(mesh.shape)}; model from {source}: {mcfg.num_layers} of {full_layers} layers, "
        f"{mcfg.num_params / 1e9:.3g}e9 parameters ({mcfg.param_dtype} storage, {mcfg.dtype} "
        "compute)")
    # Abstract shapes and shardings outside the mesh context (optax builds its state tree
    # eagerly, on the host); tracing and lowering under it, as the trainer runs.
    programs, extra = build_programs(cfg, mcfg, mesh, names, only)
    out = {}
    with jax.set_mesh(mesh):
        for prog in programs:
            say(f"{prog.name}: tracing and lowering ({prog.note})")
            t0 = time.perf_counter()
            try:
                own_mesh = (jax.set_mesh(prog.mesh) if prog.mesh is not None
                            else contextlib.nullcontext())
                with jax.default_device(devices[0]), own_mesh:
                    traced = prog.trace()
                    # The sampler's decode loop stops when every row is done: its jaxpr cannot
                    # know the trip count the HLO bound gives, so it has no global figure.
                    global_flops = (None if prog.name in ("generate", "paged_round")
                                    else jaxpr_matmul_flops(traced.jaxpr))
                    lowered = traced.lower()
                t1 = time.perf_counter()
                say(f"{prog.name}: lowered in {t1 - t0:.1f} s; XLA is compiling it for "
                    f"{topology} (a large model takes minutes)")
                compiled = lowered.compile()
            except Exception as e:  # the TPU compiler refuses programs that exceed HBM
                oom = _oom_line(e)
                failure = oom or "XLA could not compile it: " + (
                    " ".join(str(e).split("=== Source Location Trace")[0].split())[:300]
                    or type(e).__name__)
                out[prog.name] = {"note": prog.note, "fits": False, "error": failure,
                                  "out_of_memory": oom is not None,
                                  "compile_s": time.perf_counter() - t0,
                                  **dict.fromkeys(("total_bytes_per_chip", "flops_per_chip",
                                                   "global_flops", "bytes_accessed_per_chip",
                                                   "roofline_s")), "collectives": {}}
                say(f"{prog.name}: {'does not fit' if oom else 'failed'} ({failure})")
                continue
            rep = analyse(compiled, devices=1 if prog.name == "paged_round" else len(devices),
                          device_info=info,
                          global_matmul_flops=global_flops)
            rep.update(note=prog.note, compile_s=time.perf_counter() - t0,
                       lower_s=t1 - t0, out_of_memory=not rep["fits"])
            out[prog.name] = rep
            say(f"{prog.name}: compiled in {rep['compile_s']:.1f} s")
    assume = assumptions(cfg)
    state = extra["state"]
    chips = len(devices)
    est = step_estimate(out, assume, extra["shapes"], matmul_params=mcfg.matmul_params,
                        group_size=cfg.rollout.group_size,
                        prompts_per_step=cfg.tasks.prompts_per_step,
                        mt_grpo=modes.ALGORITHMS[cfg.algo.name].task_weights, chips=chips,
                        peak_per_chip=info["bf16_flops"])
    return {
        "topology": topology,
        "device_kind": kind,
        "chip": chip.name,
        "chips": chips,
        "mesh": dict(mesh.shape),
        "hbm_bytes_per_chip": info["hbm_bytes"],
        "peak_bf16_flops_per_chip": info["bf16_flops"],
        "hbm_bandwidth_per_chip": info["hbm_bandwidth"],
        "hardware_source": chip.source,
        "model": {"source": source, "num_params": mcfg.num_params,
                  "matmul_params": mcfg.matmul_params, "num_layers": mcfg.num_layers,
                  "full_num_layers": full_layers,
                  "dtype": mcfg.dtype, "param_dtype": mcfg.param_dtype},
        "algo": str(cfg.algo.name),
        "shapes": extra["shapes"],
        "param_dtypes": _dtype_names(state.params),
        "opt_state_dtypes": _dtype_names(state.opt_state),
        "programs": out,
        "assumptions": assume,
        "step_estimate": est,
        "compile_wall_s": {k: v["compile_s"] for k, v in out.items()},
        "total_wall_s": time.perf_counter() - t_all,
    }


# ---- the table ----------------------------------------------------------------------------------


def _gb(x: float) -> str:
    """Bytes in GB, with enough decimals that small programs do not read as zero."""
    gb = x / 1e9
    return f"{gb:.2f}" if abs(gb) >= 0.1 or gb == 0 else f"{gb:.2g}"


def format_report(rep: dict) -> str:
    """The readable table of a :func:`run` report."""
    cap = rep["hbm_bytes_per_chip"]
    lines = [
        f"{rep['topology']}: {rep['chips']} x {rep['device_kind']} ({rep['chip']}: "
        f"{_gb(cap)} GB HBM, {rep['peak_bf16_flops_per_chip'] / 1e12:.0f} TFLOP/s bf16, "
        f"{rep['hbm_bandwidth_per_chip'] / 1e12:.2f} TB/s per chip), mesh {rep['mesh']}",
        f"model: {rep['model']['num_params'] / 1e9:.3g}e9 params, {rep['model']['num_layers']} "
        f"of {rep['model']['full_num_layers']} layers; param dtypes {rep['param_dtypes']}, optimiser state {rep['opt_state_dtypes']}",
        "",
        f"{'program':<11} {'args GB':>8} {'temp GB':>8} {'out GB':>7} {'code GB':>8} "
        f"{'total GB':>9} {'of cap':>7} {'TFLOP/chip':>11} {'GB moved':>9} {'roofline':>10} "
        f"{'compile':>8}",
    ]
    for name, p in rep["programs"].items():
        if "error" in p:
            what = "does not fit" if p["out_of_memory"] else "did not compile"
            lines.append(f"{name:<11} {what}: {p['error']} (after {p['compile_s']:.0f} s)")
            continue
        m = p["memory"]
        lines.append(
            f"{name:<11} {_gb(m['argument_bytes']):>8} {_gb(m['temp_bytes']):>8} "
            f"{_gb(m['output_bytes'] - m['alias_bytes']):>7} {_gb(m['generated_code_bytes']):>8} "
            f"{_gb(p['total_bytes_per_chip']):>9} {p['total_bytes_per_chip'] / cap:>6.0%} "
            f"{p['flops_per_chip'] / 1e12:>11.3f} {_gb(p['bytes_accessed_per_chip']):>9} "
            f"{p['roofline_s'] * 1e3:>8.2f}ms {p['compile_s']:>7.0f}s")
    lines.append("")
    for name, p in rep["programs"].items():
        lines.append(f"{name}: {p['note']}")
        if p.get("collectives"):
            coll = ", ".join(f"{k} x{v['count']} ({_gb(v['bytes'])} GB)"
                             for k, v in sorted(p["collectives"].items()))
            lines.append(f"  collectives (static count in the HLO): {coll}")
        if "error" not in p:
            share = p.get("flops_per_chip_over_share")
            scale = (f"; matmul FLOPs per chip / (global / chips) = {share:.3f}"
                     if share is not None else "")
            if p.get("loop_factor", 1) > 1:
                scale += f"; loops counted by trip count (x{p['loop_factor']:.3g} XLA's)"

            lines.append(f"  headroom {_gb(p['headroom_bytes_per_chip'])} GB per chip; "
                         f"{p['bound']}-bound{scale}")
    a, est = rep["assumptions"], rep["step_estimate"]
    lines += ["", "assumptions (config section 'compile'): " + ", ".join(
        f"{k} {v:g}" for k, v in a.items())]
    if est is None:
        lines.append("step estimate: not available (train_step, prefill and decode must compile)")
    else:
        lines.append(
            f"step estimate (rooflines): {est['seconds']:.1f} s = rollout {est['rollout_s']:.1f}"
            f" ({est['sampler_calls_per_round']} sampler call(s) per round) + reshard "
            f"{est['reshard_s']:.2f} + train {est['train_s']:.1f}; model FLOPs "
            f"{est['model_flops']:.3g} (rollout {est['rollout_model_flops']:.3g}, training "
            f"{est['train_model_flops']:.3g}; the train step compiles to "
            f"{est['train_step_compiled_flops']:.3g} matmul FLOPs); MFU {est['mfu']:.1%}")
    return "\n".join(lines)


def not_fitting(rep: dict) -> list[str]:
    """Names of the programs whose per-chip total exceeds the HBM capacity."""
    return [k for k, p in rep["programs"].items() if not p["fits"]]


__all__ = ["PROGRAMS", "CompileError", "LibTPUMissing", "analyse", "build_programs",
           "format_report", "model_config", "not_fitting", "parse_collectives", "run",
           "step_estimate", "topology_devices"]
