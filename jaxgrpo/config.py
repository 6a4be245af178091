"""Typed experiment configuration: frozen dataclasses per subsystem, YAML, dotted overrides.

1. ``load_config(path, overrides)`` reads a YAML file (or, with ``path=None``, starts from the
   built-in demo, ``ExperimentConfig()``, mirrored in ``configs/demo.yaml``), applies dotted
   overrides such as ``optim.lr=1e-6`` (values parsed as YAML), and builds the nested frozen
   dataclasses, checking every key and type on the way.
2. Each dataclass validates its own fields in ``__post_init__``; ``ExperimentConfig`` checks the
   cross-subsystem rules (G > 1 for group-relative estimators, minibatches dividing P, ...).
3. ``validate(cfg, num_devices=..., check_paths=...)`` adds what needs the machine: the model
   directory exists, the run's output paths are local or of a known URI scheme, and the global
   batch divides over the data-parallel mesh axes.

The **global batch** is ``P = tasks.prompts_per_step`` prompts; each prompt's G completions stay
together on one device (the group axis is never sharded, so group statistics need no
collective). Hence P, and each minibatch's ``P / loss.minibatches`` prompts, must be divisible
by the data-parallel size ``mesh.data * mesh.fsdp``, and ``loss.micro_batches`` must divide each
device's ``P * G / (loss.minibatches * mesh.data * mesh.fsdp)`` rows of a minibatch.

Every error is a :class:`ConfigError` (a ``ValueError``) whose message is one line naming the
dotted key and what to fix; ``format_error`` gives the line the CLI prints. This module never
imports jax, so ``--help`` and validation are instant.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import importlib.util
import math
import os
import types
import typing
from typing import Any

import yaml

from jaxgrpo.core import modes  # plain Python: the registries, no jax

__all__ = [
    "AlgoConfig", "CheckpointConfig", "CompileConfig", "ConfigError", "DistributedConfig", "DynamicSamplingConfig",
    "ExperimentConfig", "LoggingConfig", "LossConfig", "MeshConfig", "ModelConfigSpec",
    "MTGRPOConfig",
    "OptimConfig", "OverlongConfig", "RolloutConfig", "SFTConfig", "TaskSpec", "TasksConfig",
    "TrainConfig", "InputError", "config_from_dict", "config_to_dict", "flatten_config",
    "format_error",
    "load_config", "save_config", "split_cli_args", "validate",
]


class InputError(ValueError):
    """Bad input from the user (a file the config names, a run directory, a command-line flag),
    as opposed to a bug: the message is one line that names the thing and what to fix, and the
    command line prints it without a traceback."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class ConfigError(InputError):
    """A bad configuration; the message is one line that names the key and what to fix."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def format_error(exc: BaseException) -> str:
    """The single line the CLI prints for ``exc``: ``jaxgrpo: error: <message>``."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"jaxgrpo: error: {text}"


# ---- modes (one place for every set of choices) ---------------------------------------------


def _registry_enum(name: str, names, doc: str) -> type[enum.StrEnum]:
    """A StrEnum whose members are a registry's names (``"dr_grpo"`` -> ``DR_GRPO``)."""
    cls = enum.StrEnum(name, [(n.upper(), n) for n in names], module=__name__)
    cls.__doc__ = doc
    return cls


class DType(enum.StrEnum):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"


class Attention(enum.StrEnum):
    """Attention of the cache-free forward (``jaxgrpo.model.attention``)."""

    AUTO = "auto"  # splash on TPU where the shapes allow it, else chunked
    PLAIN = "plain"  # full float32 scores [B, H, T, T]
    CHUNKED = "chunked"  # flash-style online softmax in JAX, memory linear in T
    SPLASH = "splash"  # the Pallas TPU kernel


class RolloutEngine(enum.StrEnum):
    """Rollout engine (``jaxgrpo.rollout``)."""

    STATIC = "static"  # one batch of P*G rows over a preallocated cache
    PAGED = "paged"  # paged KV cache, ragged attention, continuous batching (one device)


class Remat(enum.StrEnum):
    """Rematerialisation of the decoder blocks in the backward pass."""

    NONE = "none"
    BLOCK = "block"  # keep each block's input, recompute the block
    DOTS = "dots"  # keep the weight-matmul outputs, recompute the rest


# The algorithm-level modes come from the registries in ``jaxgrpo.core.modes``.
Estimator = _registry_enum("Estimator", modes.ESTIMATORS, "Advantage estimator.")
Scale = _registry_enum("Scale", modes.GROUP_SCALES, "Scale of the group-relative advantage.")
KLEstimator = _registry_enum("KLEstimator", modes.KL_ESTIMATORS, "KL-to-reference estimator.")
Agg = _registry_enum("Agg", modes.AGGREGATIONS, "Aggregation of the per-token loss.")
BlockBaseline = _registry_enum("BlockBaseline", modes.BLOCK_BASELINES,
                               "Per-block baseline of the blockwise estimator.")
Algo = _registry_enum("Algo", modes.ALGORITHMS, "Training algorithm.")
WeightOptimizer = _registry_enum("WeightOptimizer", modes.TASK_WEIGHT_OPTIMIZERS,
                                 "Optimiser of MT-GRPO's task logits.")
Reduce = _registry_enum("Reduce", modes.IMPROVEMENT_REDUCTIONS,
                        "Reduction of I_k over a task's trained sequences.")


class Filter(enum.StrEnum):
    STRICT = "strict"  # drop groups with no correct or all correct completions
    LENIENT = "lenient"  # drop groups whose rewards are all equal
    LENIENT_CODE = "lenient_code"
    NONE = "none"


class TargetMode(enum.StrEnum):
    MULTINOMIAL = "multinomial"  # paper
    SCALED = "scaled"  # released code
    EXACT = "exact"  # largest remainder


class Schedule(enum.StrEnum):
    PAPER = "paper"
    CODE = "code"


class WeightUpdate(enum.StrEnum):
    PER_MINIBATCH = "per_minibatch"
    PER_STEP = "per_step"


class LRSchedule(enum.StrEnum):
    CONSTANT = "constant"
    LINEAR = "linear"
    COSINE = "cosine"


class AxisType(enum.StrEnum):
    EXPLICIT = "explicit"
    AUTO = "auto"


MODEL_PRESETS = ("tiny", "demo")


# ---- field checks -----------------------------------------------------------------------------


def _need(ok: bool, key: str, what: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"'{key}' must be {what}, got {value!r}")


def _positive(key: str, value: float) -> None:
    _need(value > 0, key, "> 0", value)


def _nonneg(key: str, value: float) -> None:
    _need(value >= 0, key, ">= 0", value)


def _prob(key: str, value: float, *, open_low: bool = False) -> None:
    ok = (0 < value <= 1) if open_low else (0 <= value <= 1)
    _need(ok, key, "in (0, 1]" if open_low else "in [0, 1]", value)


# ---- subsystem configs ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Supervised warm start on gold completions before RL (0 steps: off)."""

    steps: int = 0
    lr: float = 1e-3
    batch_size: int = 32

    def __post_init__(self):
        _nonneg("model.sft.steps", self.steps)
        _positive("model.sft.lr", self.lr)
        _positive("model.sft.batch_size", self.batch_size)


@dataclasses.dataclass(frozen=True)
class ModelConfigSpec:
    """The policy: ``preset`` (built-in, e.g. ``"tiny"``) or ``path`` (a local HF directory).

    ``hf_config`` is the path of an HF ``config.json`` alone (the architecture, no weights):
    ``jaxgrpo compile`` reads it when ``path`` is unset or does not exist, so a pod
    configuration can be compiled without the checkpoint; training needs ``path``.
    """

    preset: str | None = None
    path: str | None = None
    hf_config: str | None = None  # an HF config.json (architecture only), for `jaxgrpo compile`
    tokenizer: str | None = None  # a local tokenizer directory; default: the model's
    dtype: DType = DType.FLOAT32  # compute dtype
    param_dtype: DType = DType.FLOAT32
    attention: Attention = Attention.AUTO
    attention_block: int = 512  # query/key block of chunked and splash attention
    remat: Remat = Remat.NONE
    scan_layers: bool = False  # the blocks as one lax.scan: compile time independent of depth
    sft: SFTConfig = dataclasses.field(default_factory=SFTConfig)

    def __post_init__(self):
        if self.preset is not None and self.hf_config is not None:
            raise ConfigError(
                "'model.hf_config' describes an HF architecture and 'model.preset' a built-in "
                f"one: set only one (got preset={self.preset!r}, hf_config={self.hf_config!r})")
        if self.preset is None and self.path is None and self.hf_config is not None:
            return  # an architecture alone: enough to compile, refused by training
        if (self.preset is None) == (self.path is None):
            raise ConfigError(
                "set exactly one of 'model.path' (a local HF checkpoint directory) and "
                f"'model.preset' (one of {', '.join(MODEL_PRESETS)}); got preset={self.preset!r},"
                f" path={self.path!r}"
            )
        if self.preset is not None:
            _need(self.preset in MODEL_PRESETS, "model.preset", f"one of {MODEL_PRESETS}",
                  self.preset)
        _positive("model.attention_block", self.attention_block)


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """Sampling G completions per prompt."""

    group_size: int = 8  # G
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    prompt_buckets: tuple[int, ...] = (64, 128, 256)  # padded prompt lengths, ascending
    eval_samples: int = 8  # k completions per eval prompt (mean@k)
    eval_temperature: float = 1.0
    # Prompts per sampler call (null: a whole round at once). A round of more prompts is rolled
    # out in several calls, which bounds the KV cache (decode memory) at the cost of more calls.
    max_prompts_per_call: int | None = None
    engine: RolloutEngine = RolloutEngine.STATIC
    max_slots: int = 64  # paged engine: sequences decoded at once
    steps_per_sync: int = 32  # paged engine: decode steps per host round trip
    page_size: int = 16  # paged engine: tokens per KV page

    def __post_init__(self):
        _positive("rollout.group_size", self.group_size)
        for key in ("max_slots", "steps_per_sync", "page_size"):
            v = getattr(self, key)
            _need(isinstance(v, int) and not isinstance(v, bool) and v > 0, f"rollout.{key}",
                  "a positive int", v)
        _positive("rollout.max_new_tokens", self.max_new_tokens)
        _nonneg("rollout.temperature", self.temperature)
        _nonneg("rollout.top_k", self.top_k)
        _prob("rollout.top_p", self.top_p, open_low=True)
        b = self.prompt_buckets
        _need(len(b) > 0 and all(x > 0 for x in b) and list(b) == sorted(set(b)),
              "rollout.prompt_buckets", "a non-empty ascending list of positive ints", list(b))
        _positive("rollout.eval_samples", self.eval_samples)
        _nonneg("rollout.eval_temperature", self.eval_temperature)
        if self.max_prompts_per_call is not None:
            _positive("rollout.max_prompts_per_call", self.max_prompts_per_call)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One task of a mixture: registry ``name``, difficulty ``level``, extra ``options``."""

    name: str
    level: int | None = None
    ratio: float | None = None  # all given (summing to 1) or all omitted (uniform)
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def spec(self) -> str:
        """``"name@level"`` (or ``"name"``), the task registry's spec string."""
        return self.name if self.level is None else f"{self.name}@{self.level}"


@dataclasses.dataclass(frozen=True)
class TasksConfig:
    """The task mixture and the prompts per step P (the global batch, in prompts)."""

    # A named mixture ("demo"), a list of tasks ({name, level, ratio, options} or "name@level"),
    # or a mapping {"name@level": ratio}.
    mixture: str | tuple[TaskSpec, ...] = "demo"
    prompts_per_step: int = 16  # P
    seed: int = 0
    eval_prompts: int = 64  # per task
    # Address-space limit of each verifier worker process, in MB (0 = no limit): a verifier
    # allocating past it scores 0 with a counted "out of memory" error.
    verifier_memory_mb: int = 4096

    def __post_init__(self):
        _positive("tasks.prompts_per_step", self.prompts_per_step)
        _nonneg("tasks.verifier_memory_mb", self.verifier_memory_mb)
        _nonneg("tasks.seed", self.seed)
        _nonneg("tasks.eval_prompts", self.eval_prompts)
        if isinstance(self.mixture, str):
            _need(self.mixture.strip() != "", "tasks.mixture", "a mixture name or a list of "
                  "tasks", self.mixture)
            return
        _need(len(self.mixture) > 0, "tasks.mixture", "a non-empty list of tasks", [])
        specs = [t.spec for t in self.mixture]
        dup = sorted({s for s in specs if specs.count(s) > 1})
        _need(not dup, "tasks.mixture", "a list of distinct tasks (repeated: "
              f"{', '.join(dup)})", specs)
        ratios = [t.ratio for t in self.mixture]
        if all(r is None for r in ratios):
            return
        _need(all(r is not None for r in ratios), "tasks.mixture", "all with a ratio or all "
              "without (uniform)", ratios)
        for i, r in enumerate(ratios):
            _nonneg(f"tasks.mixture[{i}].ratio", r)
        if not math.isclose(sum(ratios), 1.0, rel_tol=0, abs_tol=1e-6):
            raise ConfigError(f"'tasks.mixture' ratios must sum to 1, got {ratios} (sum "
                              f"{sum(ratios):.6g}); rescale them")

    def ratios(self) -> dict[str, float] | None:
        """``{spec: ratio}`` for a list mixture (uniform when omitted); None for a named one."""
        if isinstance(self.mixture, str):
            return None
        k = len(self.mixture)
        return {t.spec: (1.0 / k if t.ratio is None else t.ratio) for t in self.mixture}


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Advantage estimator and clipped policy loss (names follow ``jaxgrpo.core``)."""

    estimator: Estimator = Estimator.GRPO
    scale: Scale | None = None  # None: the estimator's own (grpo: group; others: none)
    std_ddof: int = 0
    eps: float = 1e-6
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None  # e.g. 3.0; must be > 1
    kl_coef: float = 0.0
    kl_estimator: KLEstimator = KLEstimator.K3
    kl_ratio_correction: bool = False
    agg: Agg = Agg.TOKEN_MEAN
    epochs: int = 1  # mu: passes over each rollout batch
    minibatches: int = 1  # policy updates per epoch
    micro_batches: int = 1  # gradient-accumulation chunks per minibatch (memory only; exact)
    # old policy = the trainer's log-probs at the start of the step (false: the sampler's); no
    # extra forward pass when it is the loss pass (1 epoch, 1 minibatch, not MT-GRPO)
    recompute_old_logp: bool = True
    entropy_coef: float = 0.0
    adaptive_entropy: bool = False  # Skywork-OR1 controller, as BAE uses it
    target_entropy: float = 0.2
    entropy_delta: float = 5e-4
    entropy_coef_max: float = 0.005
    block_baselines: tuple[BlockBaseline, ...] = (BlockBaseline.GROUP_MEAN, BlockBaseline.OCB)
    block_std_normalize: bool = False

    def __post_init__(self):
        _need(self.std_ddof in (0, 1), "loss.std_ddof", "0 or 1", self.std_ddof)
        _positive("loss.eps", self.eps)
        for k in ("clip_low", "clip_high", "kl_coef", "entropy_coef", "target_entropy",
                  "entropy_delta", "entropy_coef_max"):
            _nonneg(f"loss.{k}", getattr(self, k))
        _need(self.clip_low < 1, "loss.clip_low", "< 1", self.clip_low)
        if self.dual_clip is not None:
            _need(self.dual_clip > 1, "loss.dual_clip", "> 1 (or null: off)", self.dual_clip)
        _positive("loss.epochs", self.epochs)
        _positive("loss.minibatches", self.minibatches)
        _positive("loss.micro_batches", self.micro_batches)
        if self.estimator == Estimator.BLOCKWISE:
            _need(len(self.block_baselines) > 0, "loss.block_baselines",
                  "a non-empty list (one baseline per block)", [])

    @property
    def resolved_scale(self) -> Scale:
        """``scale``, or the estimator's default (``jaxgrpo.core.modes.ESTIMATORS``)."""
        if self.scale is not None:
            return self.scale
        return Scale(modes.ESTIMATORS[self.estimator].scale)

    def is_group_relative(self) -> bool:
        """True when the advantage compares completions of one prompt (needs G > 1)."""
        if modes.ESTIMATORS[self.estimator].baseline is not None:
            return True
        return any(modes.BLOCK_BASELINES[b].group_relative for b in self.block_baselines)


@dataclasses.dataclass(frozen=True)
class DynamicSamplingConfig:
    """DAPO dynamic sampling / MT-GRPO ratio-preserving sampler rounds (MT-GRPO,
    arXiv 2602.05547, §5, Alg. 2)."""

    enabled: bool = False
    oversample: float = 3.0  # M_os
    max_rounds: int = 10  # generation rounds per step, the first included (code's N_rs)
    filter: Filter = Filter.STRICT
    # Stream finished groups into the batch sampler (rollout.engine=paged): prompts are fed
    # while decoding runs and the step's generation stops once every per-task count is met;
    # prompts still in flight then are dropped. The budget stays max_rounds rounds of prompts.
    stream: bool = False

    def __post_init__(self):
        _need(self.oversample >= 1, "algo.sampling.oversample", ">= 1", self.oversample)
        _positive("algo.sampling.max_rounds", self.max_rounds)
        _need(isinstance(self.stream, bool), "algo.sampling.stream", "true or false",
              self.stream)


@dataclasses.dataclass(frozen=True)
class OverlongConfig:
    """DAPO soft overlong punishment: linear penalty over the last ``buffer`` tokens."""

    buffer: int = 0  # tokens; 0: off
    penalty: float = 1.0

    def __post_init__(self):
        _nonneg("algo.overlong.buffer", self.buffer)
        _nonneg("algo.overlong.penalty", self.penalty)


@dataclasses.dataclass(frozen=True)
class MTGRPOConfig:
    """MT-GRPO task-weight update (IWU) and ratio-preserving sampler (MT-GRPO,
    arXiv 2602.05547: Alg. 1-2, §5, App. E)."""

    lam: float = 0.2
    adapt_weights: bool = True  # False: z stays uniform (the GRPO+RPS ablation, paper App. D.2)
    weight_lr: float = 0.025
    weight_optimizer: WeightOptimizer = WeightOptimizer.ADAM_L2
    weight_decay: float = 1e-5
    update: WeightUpdate = WeightUpdate.PER_MINIBATCH
    improvement_clip: float = 0.1  # c
    improvement_reduce: Reduce = Reduce.SUM  # over the task's trained sequences of a minibatch
    acc_ema: float = 0.5  # EMA decay of J_k
    rho_ema: float = 0.9  # EMA decay of the filtered ratio
    max_inflation: float = 5.0  # M_acc; 1 turns acceptance-aware sampling off
    preserve_ratios: bool = True
    preserve_from_step: int = 0  # first step (counted from 1) that preserves; 0, 1: the first
    target_mode: TargetMode = TargetMode.MULTINOMIAL
    schedule: Schedule = Schedule.PAPER

    def __post_init__(self):
        _nonneg("algo.mt_grpo.lam", self.lam)
        _positive("algo.mt_grpo.weight_lr", self.weight_lr)
        _nonneg("algo.mt_grpo.weight_decay", self.weight_decay)
        _positive("algo.mt_grpo.improvement_clip", self.improvement_clip)
        for k in ("acc_ema", "rho_ema"):
            v = getattr(self, k)
            _need(0 <= v < 1, f"algo.mt_grpo.{k}", "in [0, 1)", v)
        _need(self.max_inflation >= 1, "algo.mt_grpo.max_inflation", ">= 1", self.max_inflation)
        _nonneg("algo.mt_grpo.preserve_from_step", self.preserve_from_step)


@dataclasses.dataclass(frozen=True)
class AlgoConfig:
    """Which algorithm: plain GRPO, DAPO (dynamic sampling), or MT-GRPO."""

    name: Algo = Algo.GRPO
    sampling: DynamicSamplingConfig = dataclasses.field(default_factory=DynamicSamplingConfig)
    overlong: OverlongConfig = dataclasses.field(default_factory=OverlongConfig)
    mt_grpo: MTGRPOConfig = dataclasses.field(default_factory=MTGRPOConfig)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW for the policy."""

    lr: float = 1e-6
    warmup_steps: int = 0
    schedule: LRSchedule = LRSchedule.CONSTANT  # after warm-up
    min_lr_ratio: float = 0.0  # final lr / lr for linear and cosine decay
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float | None = 1.0  # global gradient norm; null: off

    def __post_init__(self):
        _positive("optim.lr", self.lr)
        _nonneg("optim.warmup_steps", self.warmup_steps)
        _prob("optim.min_lr_ratio", self.min_lr_ratio)
        _nonneg("optim.weight_decay", self.weight_decay)
        for k in ("b1", "b2"):
            _need(0 <= getattr(self, k) < 1, f"optim.{k}", "in [0, 1)", getattr(self, k))
        _positive("optim.eps", self.eps)
        if self.clip_norm is not None:
            _positive("optim.clip_norm", self.clip_norm)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh ``("data", "fsdp", "tensor")``; -1 means "all remaining devices".

    ``axis_types`` is ``auto``: the shardings of the parameters, optimiser state and batch are
    pinned (jit in/out shardings) and XLA propagates them through the step's scans, reshapes and
    row permutations. ``explicit`` mesh axes would make every one of those ops carry sharding
    types by hand; the train step refuses them with an error saying so.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    axis_types: AxisType = AxisType.AUTO
    devices: int = -1  # how many devices the mesh spans: -1 all; n: the first n (one process)

    def __post_init__(self):
        for k in ("data", "fsdp", "tensor"):
            v = getattr(self, k)
            _need(v == -1 or v > 0, f"mesh.{k}", "a positive int or -1 (the rest)", v)
        _need(self.devices == -1 or self.devices > 0, "mesh.devices",
              "a positive int or -1 (every device)", self.devices)
        fills = [k for k in ("data", "fsdp", "tensor") if getattr(self, k) == -1]
        if len(fills) > 1:
            raise ConfigError(f"at most one mesh axis may be -1, got {', '.join(fills)}: set "
                              "all but one to explicit sizes")

    def num_devices(self, available: int) -> int:
        """The devices the mesh spans out of ``available``; ConfigError if too few."""
        if self.devices == -1:
            return available
        if self.devices > available:
            raise ConfigError(f"'mesh.devices' ({self.devices}) exceeds the {available} "
                              "available devices")
        return self.devices

    def shape(self, num_devices: int) -> dict[str, int]:
        """Axis sizes with -1 resolved for ``num_devices`` devices (those the mesh spans, see
        :meth:`num_devices`); ConfigError if they do not fit."""
        fixed = math.prod(v for v in (self.data, self.fsdp, self.tensor) if v != -1)
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        if -1 in sizes.values():
            if num_devices % fixed:
                raise ConfigError(f"mesh axes {sizes} do not fit {num_devices} devices: the "
                                  f"explicit sizes ({fixed}) must divide the device count")
            sizes = {k: (num_devices // fixed if v == -1 else v) for k, v in sizes.items()}
        elif fixed != num_devices:
            raise ConfigError(f"mesh {sizes} needs {fixed} devices but {num_devices} are "
                              "available; set one axis to -1")
        return sizes


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-host runs (``jax.distributed.initialize``); all unset: the standard environment.

    With every field unset a single process starts as usual, unless the environment names a
    cluster (``JAX_COORDINATOR_ADDRESS`` with ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``, or a
    Cloud TPU pod / SLURM, which JAX detects): then ``jax.distributed.initialize()`` reads it.
    Setting ``coordinator_address`` (``host:port`` of process 0) needs the other two as well.
    """

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    initialization_timeout: int = 300  # seconds to wait for every process to join

    def __post_init__(self):
        given = [self.coordinator_address is not None, self.num_processes is not None,
                 self.process_id is not None]
        if any(given) and not all(given):
            raise ConfigError("distributed.coordinator_address, distributed.num_processes and "
                              "distributed.process_id must be set together (or none of them, "
                              "to use the environment)")
        if self.num_processes is not None:
            _positive("distributed.num_processes", self.num_processes)
            _need(0 <= self.process_id < self.num_processes, "distributed.process_id",
                  f"in [0, num_processes={self.num_processes})", self.process_id)
        _positive("distributed.initialization_timeout", self.initialization_timeout)

    @property
    def configured(self) -> bool:
        return self.coordinator_address is not None


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    dir: str | None = None  # default: <train.workdir>/checkpoints; local or gs://...
    every: int = 100  # steps; 0: only at the end
    keep: int = 3
    asynchronous: bool = True

    def __post_init__(self):
        _nonneg("checkpoint.every", self.every)
        _positive("checkpoint.keep", self.keep)


WANDB_MODES = ("online", "offline")


@dataclasses.dataclass(frozen=True)
class WandbConfig:
    """Optional Weights & Biases logging (needs ``pip install wandb``; never required)."""

    enabled: bool = False
    project: str = "jaxgrpo"
    entity: str | None = None  # default: the logged-in user's
    name: str | None = None  # run name; default: the last part of train.workdir
    mode: str = "online"  # "offline": files under dir, `wandb sync` uploads them later
    dir: str | None = None  # local directory for wandb's files; default: wandb's
    tags: tuple[str, ...] = ()

    def __post_init__(self):
        _need(self.mode in WANDB_MODES, "logging.wandb.mode", f"one of {WANDB_MODES}", self.mode)


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    dir: str | None = None  # TensorBoard event files; default: <train.workdir>/tensorboard
    tensorboard: bool = False
    progress: bool = True
    wandb: WandbConfig = dataclasses.field(default_factory=WandbConfig)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 200
    seed: int = 0
    eval_every: int = 50  # 0: no periodic eval
    workdir: str = "runs/demo"  # local or a URI (gs://bucket/run)
    max_nonfinite_steps: int = 3  # consecutive skipped updates before the run stops

    def __post_init__(self):
        _positive("train.steps", self.steps)
        _nonneg("train.seed", self.seed)
        _nonneg("train.eval_every", self.eval_every)
        _positive("train.max_nonfinite_steps", self.max_nonfinite_steps)


@dataclasses.dataclass(frozen=True)
class CompileConfig:
    """Assumptions of ``jaxgrpo compile``'s whole-step estimate (they change no program).

    The compiled programs have the config's static shapes; the estimate of one RL step then
    needs what only a run knows. Defaults are the worst case the shapes allow.

    Attributes:
        topology: TPU topology to compile for, e.g. ``"v5p:2x4x4"`` (``--topology`` overrides).
        mean_prompt_tokens: mean prompt length (default: the largest prompt bucket).
        mean_response_tokens: mean completion length (default: ``rollout.max_new_tokens``).
        rounds_per_step: mean sampler rounds per RL step (DAPO / MT-GRPO resample; GRPO: 1).
        decode_steps_per_round: decode steps of one round; the static sampler runs until its
            longest row ends (default: ``rollout.max_new_tokens``).
    """

    topology: str | None = None
    mean_prompt_tokens: int | None = None
    mean_response_tokens: int | None = None
    rounds_per_step: float = 1.0
    decode_steps_per_round: int | None = None

    def __post_init__(self):
        if self.topology is not None:
            _need(isinstance(self.topology, str) and ":" in self.topology, "compile.topology",
                  "a TPU topology name such as 'v5p:2x4x4'", self.topology)
        for k in ("mean_prompt_tokens", "mean_response_tokens", "decode_steps_per_round"):
            v = getattr(self, k)
            if v is not None:
                _positive(f"compile.{k}", v)
        _need(self.rounds_per_step >= 1, "compile.rounds_per_step", ">= 1", self.rounds_per_step)


# The built-in demo (measured on a shared 2-core CPU: see configs/demo.yaml). A ~0.4M-parameter
# model, prompts of at most 24 tokens and completions of at most 10 keep one GRPO step near a
# second on a CPU; the SFT warm start gives every task a nonzero success rate before RL.
def _demo_model() -> ModelConfigSpec:
    return ModelConfigSpec(preset="demo", sft=SFTConfig(steps=800, lr=3e-3, batch_size=128))


def _demo_rollout() -> RolloutConfig:
    return RolloutConfig(group_size=8, max_new_tokens=10, prompt_buckets=(24,))


def _demo_tasks() -> TasksConfig:
    return TasksConfig(mixture="cpu-demo", eval_prompts=128)


def _demo_optim() -> OptimConfig:
    return OptimConfig(lr=5e-4, warmup_steps=10, weight_decay=0.0)


def _demo_checkpoint() -> CheckpointConfig:
    return CheckpointConfig(every=0)  # the loop still saves once at the end


def _demo_train() -> TrainConfig:
    return TrainConfig(steps=400, eval_every=0)


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """The whole run. ``ExperimentConfig()`` is the built-in CPU demo (``configs/demo.yaml``)."""

    model: ModelConfigSpec = dataclasses.field(default_factory=_demo_model)
    rollout: RolloutConfig = dataclasses.field(default_factory=_demo_rollout)
    tasks: TasksConfig = dataclasses.field(default_factory=_demo_tasks)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    algo: AlgoConfig = dataclasses.field(default_factory=AlgoConfig)
    optim: OptimConfig = dataclasses.field(default_factory=_demo_optim)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=_demo_checkpoint)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    train: TrainConfig = dataclasses.field(default_factory=_demo_train)
    compile: CompileConfig = dataclasses.field(default_factory=CompileConfig)

    def __post_init__(self):
        g = self.rollout.group_size
        if g < 2 and self.loss.is_group_relative():
            raise ConfigError(f"'rollout.group_size' must be >= 2 for the group-relative "
                              f"estimator '{self.loss.estimator}', got {g}")
        p, mb = self.tasks.prompts_per_step, self.loss.minibatches
        if p % mb:
            raise ConfigError(f"'loss.minibatches' ({mb}) must divide "
                              f"'tasks.prompts_per_step' ({p})")
        rows, mu = p * g // mb, self.loss.micro_batches
        if rows % mu:
            raise ConfigError(f"'loss.micro_batches' ({mu}) must divide the rows of a minibatch "
                              f"(prompts_per_step*group_size/minibatches = {rows})")
        need = modes.ALGORITHMS[self.algo.name].min_tasks
        if need > 1 and isinstance(self.tasks.mixture, tuple):
            _need(len(self.tasks.mixture) >= need, "tasks.mixture", f"at least {need} tasks "
                  f"for {self.algo.name}", [t.spec for t in self.tasks.mixture])
        cc, rc = self.compile, self.rollout
        if self.algo.sampling.stream and rc.engine != "paged":
            raise ConfigError("'algo.sampling.stream' needs the paged engine: set "
                              "rollout.engine=paged (or algo.sampling.stream=false)")
        for k, top, what in (("mean_prompt_tokens", max(rc.prompt_buckets),
                              "the largest of 'rollout.prompt_buckets'"),
                             ("mean_response_tokens", rc.max_new_tokens,
                              "'rollout.max_new_tokens'"),
                             ("decode_steps_per_round", rc.max_new_tokens,
                              "'rollout.max_new_tokens'")):
            v = getattr(cc, k)
            if v is not None and v > top:
                raise ConfigError(f"'compile.{k}' ({v}) must not exceed {what} ({top})")

    def data_parallel_size(self, num_devices: int | None = None) -> int | None:
        """``data * fsdp`` (None when an axis is -1 and ``num_devices`` is unknown)."""
        m = self.mesh
        if num_devices is None:
            return None if -1 in (m.data, m.fsdp) else m.data * m.fsdp
        s = m.shape(m.num_devices(num_devices))
        return s["data"] * s["fsdp"]


def _check_output_paths(cfg: ExperimentConfig) -> None:
    for key, value in (("model.path", cfg.model.path), ("model.tokenizer", cfg.model.tokenizer)):
        if value is not None and "://" in value:
            raise ConfigError(f"'{key}' {value!r} is a URI: give a local directory (copy the "
                              "checkpoint to every worker, or mount the bucket)")
    for key, value in (("train.workdir", cfg.train.workdir), ("checkpoint.dir", cfg.checkpoint.dir),
                       ("logging.dir", cfg.logging.dir)):
        if value is not None and "://" in value:
            from jaxgrpo import paths

            try:
                paths.as_path(value)
            except ValueError as e:
                raise ConfigError(f"'{key}': {e}") from None


def validate(cfg: ExperimentConfig, *, num_devices: int | None = None,
             check_paths: bool = True) -> ExperimentConfig:
    """Machine-dependent checks: model directory, output paths, batch vs data-parallel axes.

    With ``check_paths``: ``model.path`` / ``model.tokenizer`` must be local directories (the
    loaders read local files); ``train.workdir``, ``checkpoint.dir`` and ``logging.dir`` may be
    local or URIs (``gs://bucket/run``) of a scheme ``etils.epath`` knows. Output paths are not
    checked for existence (the run creates them; for a URI that would need the network).
    """
    if check_paths:
        _check_output_paths(cfg)
    if cfg.logging.wandb.enabled and importlib.util.find_spec("wandb") is None:
        raise ConfigError("'logging.wandb.enabled' is true but wandb is not installed: "
                          "pip install wandb, or set logging.wandb.enabled=false")
    if check_paths and cfg.model.path is not None:
        path = os.path.expanduser(cfg.model.path)
        if os.path.isfile(path):
            raise ConfigError(f"'model.path' {cfg.model.path!r} is a file, not a directory: give "
                              f"the directory holding it ({os.path.dirname(path) or '.'!r}, an "
                              "HF checkpoint: config.json + *.safetensors)")
        if not os.path.isdir(path):
            raise ConfigError(f"'model.path' {cfg.model.path!r} does not exist: give a local "
                              "directory holding an HF checkpoint (config.json + *.safetensors)")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError(f"'model.path' {cfg.model.path!r} has no config.json: give a "
                              "local HF checkpoint directory")
    if check_paths and cfg.model.path is None and cfg.model.hf_config is not None:
        raise ConfigError(f"'model.hf_config' ({cfg.model.hf_config!r}) is an architecture "
                          "without weights: set 'model.path' to a local HF checkpoint to run "
                          "(`jaxgrpo compile` needs only hf_config)")
    if check_paths and cfg.model.tokenizer is not None:
        tok = os.path.expanduser(cfg.model.tokenizer)
        if os.path.isfile(tok):
            raise ConfigError(f"'model.tokenizer' {cfg.model.tokenizer!r} is a file, not a "
                              "directory: give the directory holding the tokenizer files")
        if not os.path.isdir(tok):
            raise ConfigError(f"'model.tokenizer' {cfg.model.tokenizer!r} does not exist")
    dp = cfg.data_parallel_size(num_devices)
    if dp is not None:
        p, mb = cfg.tasks.prompts_per_step, cfg.loss.minibatches
        if (p // mb) % dp:
            what = f"'tasks.prompts_per_step' ({p})" if mb == 1 else (
                f"each minibatch ('tasks.prompts_per_step' {p} / 'loss.minibatches' {mb})")
            raise ConfigError(f"{what} must be divisible by the data-parallel size "
                              f"mesh.data*mesh.fsdp = {dp}")
        mp = cfg.rollout.max_prompts_per_call
        if mp is not None and mp % dp:
            raise ConfigError(f"'rollout.max_prompts_per_call' ({mp}) must be a multiple of the "
                              f"data-parallel size mesh.data*mesh.fsdp = {dp}")
        mu = cfg.loss.micro_batches
        rows = p * cfg.rollout.group_size // (mb * dp)  # one device's rows of a minibatch
        if rows % mu:
            raise ConfigError(f"'loss.micro_batches' ({mu}) must divide each device's rows of a "
                              f"minibatch (prompts_per_step*group_size/(minibatches*"
                              f"mesh.data*mesh.fsdp) = {rows})")
    return cfg


# ---- dicts, YAML, overrides ---------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if tp is bool:
        return "a bool (true/false)"
    if tp is int:
        return "an int"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    return str(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        # Pick the option matching the value's shape, so a bad list item is named exactly.
        for a in options:
            if (isinstance(value, list | tuple | dict) and typing.get_origin(a) is tuple) or (
                    isinstance(value, dict) and dataclasses.is_dataclass(a)):
                return _coerce(value, a, key)
        errors = []
        for a in options:
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[-1] if len(options) == 1 else ConfigError(
            f"'{key}' must be " + " or ".join(_type_name(a) for a in options)
            + f", got {value!r}")
    if origin is tuple:
        if typing.get_args(tp)[0] is TaskSpec and isinstance(value, dict):
            # {"reverse@1": 0.5, ...}: the task registry's mixture form
            value = [{**_parse_spec(k, f"{key}.{k}"), "ratio": v} for k, v in value.items()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"'{key}' must be a list, got {value!r}")
        (item_tp, _) = typing.get_args(tp)
        return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is TaskSpec and isinstance(value, str):
        value = _parse_spec(value, key)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            pass
    elif tp is Any:
        return value
    raise ConfigError(f"'{key}' must be {_type_name(tp)}, got {value!r}")


def _parse_spec(spec: Any, key: str) -> dict[str, Any]:
    """``"name@level"`` or ``"name"`` -> ``{"name": ..., "level": ...}``."""
    name, at, level = str(spec).partition("@")
    if not name or (at and not level.isdigit()):
        raise ConfigError(f"'{key}' must be a task spec like 'addition@2' or 'addition', "
                          f"got {spec!r}")
    return {"name": name, "level": int(level)} if at else {"name": name}


def _build(cls: type, data: Any, prefix: str) -> Any:
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"'{prefix or 'config'}' must be a mapping of keys to values, "
                          f"got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    dot = f"{prefix}." if prefix else ""
    for k in data:
        if k not in fields:
            names = [f"{dot}{n}" for n in fields]
            close = difflib.get_close_matches(f"{dot}{k}", names, n=1, cutoff=0.6)
            hint = (f"did you mean '{close[0]}'?" if close
                    else f"valid keys under '{prefix or 'config'}': {', '.join(fields)}")
            raise ConfigError(f"unknown key '{dot}{k}'; {hint}")
    missing = [n for n, f in fields.items() if n not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing key '{dot}{missing[0]}'")
    kwargs = {k: _coerce(v, hints[k], f"{dot}{k}") for k, v in data.items()}
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """Nested dict (as YAML gives) -> ``ExperimentConfig``; omitted keys take their defaults."""
    return _build(ExperimentConfig, {} if data is None else data, "")


def config_to_dict(cfg: Any) -> Any:
    """``ExperimentConfig`` (or any part) -> plain dicts, lists and scalars (YAML/JSON-able)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, enum.Enum):
        return cfg.value
    if isinstance(cfg, list | tuple):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    return cfg


def flatten_config(cfg: ExperimentConfig) -> dict[str, Any]:
    """``{"optim.lr": 1e-6, ...}``: scalars by dotted key (lists as strings), for hparams."""
    out: dict[str, Any] = {}

    def walk(d: Any, prefix: str) -> None:
        if isinstance(d, dict) and d:
            for k, v in d.items():
                walk(v, f"{prefix}.{k}" if prefix else k)
        else:
            out[prefix] = str(d) if isinstance(d, list | dict) else d

    walk(config_to_dict(cfg), "")
    return out


def _read_yaml(path: str) -> dict[str, Any]:
    if "://" in path:  # a run's config.yaml in a bucket (gs://...)
        from jaxgrpo import paths

        uri = paths.as_path(path)
        if not uri.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        text = uri.read_text()
    elif not os.path.isfile(path):
        raise ConfigError(f"config file '{path}' does not exist"
                          + (" (it is a directory)" if os.path.isdir(path) else ""))
    else:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"could not parse '{path}'{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections, "
                          f"got {type(data).__name__}")
    return data


def _apply_override(data: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{item}' must look like section.key=value, "
                          "e.g. optim.lr=1e-6")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"could not parse the value of override '{item}' as YAML") from None
    *parents, leaf = key.split(".")
    node = data
    for i, part in enumerate(parents):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set '{key}': '{'.'.join(parents[:i + 1])}' is not a "
                              "section")
        node = child
    node[leaf] = value


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = (), *,
                num_devices: int | None = None, check_paths: bool = True) -> ExperimentConfig:
    """Load YAML (``None``: the built-in demo), apply ``a.b=value`` overrides, validate.

    Raises:
      ConfigError: one line naming the key (or file, or override) and what to fix.
    """
    data = config_to_dict(ExperimentConfig()) if path is None else _read_yaml(os.fspath(path))
    for item in overrides:
        _apply_override(data, item)
    # The model is a preset or a path: an override naming one replaces the other.
    model = data.get("model")
    if isinstance(model, dict):
        named = {item.partition("=")[0].strip() for item in overrides}
        for mine, others in (("path", ("preset",)), ("hf_config", ("preset",)),
                             ("preset", ("path", "hf_config"))):
            for other in others:
                if f"model.{mine}" in named and f"model.{other}" not in named:
                    if model.get(mine) is not None:
                        model[other] = None
    return validate(config_from_dict(data), num_devices=num_devices, check_paths=check_paths)


def split_cli_args(args: list[str] | tuple[str, ...]) -> tuple[str | None, list[str]]:
    """``["configs/x.yaml", "optim.lr=1e-6"]`` -> ``("configs/x.yaml", ["optim.lr=1e-6"])``.

    The first argument is the config file unless it looks like an override (``key=value``);
    so ``jaxgrpo train optim.lr=1e-6`` overrides the built-in demo. Later arguments must all be
    overrides.
    """
    args = list(args)
    path = None
    if args and "=" not in args[0]:
        path = args.pop(0)
    for a in args:
        if "=" not in a:
            raise ConfigError(f"expected overrides like optim.lr=1e-6 after the config file, "
                              f"got '{a}'")
    return path, args


def save_config(cfg: ExperimentConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (loadable by ``load_config``): a local file atomically,
    or a URI (``gs://bucket/run/config.yaml``) as one object (``jaxgrpo.paths.write_text``)."""
    from jaxgrpo import paths

    text = "# Resolved jaxgrpo config (every key explicit).\n" + yaml.safe_dump(
        config_to_dict(cfg), sort_keys=False, default_flow_style=False)
    paths.write_text(path, text)
