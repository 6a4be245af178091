"""The training loop: the only code that knows the order of the stages.

One RL step:

1. **Batch.** The ratio-preserving sampler asks for prompts per task (GRPO: the fixed ratios,
   one round; DAPO: oversampled rounds until B groups have a learning signal; MT-GRPO: the task
   weights z, with per-task counts preserved after filtering). Each round draws prompts from the
   host task sampler, rolls them out (G completions each, jitted KV-cache sampler) and verifies
   the completions on the host.
2. **Advantages** from the ``[P, G]`` rewards (``jaxgrpo.core.advantages``); for BAE
   (``loss.estimator: blockwise``) from the ``[P, G, K]`` block rewards, placed on each block's
   tokens with ``block_mean`` weights (``jaxgrpo.train.blocks``). With ``loss.adaptive_entropy``
   the entropy coefficient then steps toward ``loss.target_entropy`` after every update.
3. **Update**: one jitted, donated train step (mu epochs x minibatches inside ``lax.scan``).
4. **Book-keeping**: MT-GRPO task weights from the step's improvement signal, metrics (fetched
   after the next step is dispatched), periodic per-task evaluation, checkpoints.

Randomness is a pure function of ``(seed, step)`` (one stream per purpose, all derived in
``jaxgrpo.train.rng``) and every host-side sampler is restored from
the checkpoint, so a resumed run continues bit for bit.

Devices and hosts (``cfg.mesh``, ``cfg.distributed``): the parameters are created in the training
layout (``jaxgrpo.sharding.TRAIN_RULES``), the train state and every step's batch are sharded over
the mesh (rows over ``data*fsdp``, whole groups per device) and the step is jitted with those in/out
shardings. Rollouts use the rollout layout (weights gathered over ``fsdp``; the same arrays when
``fsdp=1``). With several processes every host computes the same global prompt schedule, rolls out
and verifies only its own contiguous block of prompts, and the per-group results are gathered to
every host, so the batch sampler's decisions (DAPO/MT-GRPO filtering, per-task counts) and the
advantages are identical everywhere; each host then feeds its rows of the train batch
(``jax.make_array_from_process_local_data``). Only process 0 writes logs; every process writes
its part of each checkpoint. One device is a 1-device mesh: the same numbers as without a mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from jaxgrpo import metrics as metrics_lib
from jaxgrpo import paths
from jaxgrpo import sharding as shd
from jaxgrpo.checkpoint import Checkpointer, committed_steps
from jaxgrpo.config import (
    Agg,
    Estimator,
    ExperimentConfig,
    InputError,
    flatten_config,
    save_config,
    validate,
)
from jaxgrpo.core import advantages as core_adv
from jaxgrpo.core import modes
from jaxgrpo.data import Group, RatioPreservingSampler, TaskSampler
from jaxgrpo.rollout import generate_functional
from jaxgrpo.rollout.engine import PagedOptions
from jaxgrpo.tasks import MIXTURES, get_task, score_many
from jaxgrpo.tasks.structured import StructuredTask
from jaxgrpo.train import batch as batch_lib
from jaxgrpo.train import blocks as blocks_lib
from jaxgrpo.train import rng as rng_lib
from jaxgrpo.train import rollouts, sft
from jaxgrpo.train.mtgrpo import TaskWeightUpdater
from jaxgrpo.train.optim import make_optimizer
from jaxgrpo.train.policy import build_policy, special_ids
from jaxgrpo.train.preemption import PreemptionWatch
from jaxgrpo.train.state import ModelParts, init_train_state, split_model
from jaxgrpo.train.step import StepConfig, make_train_step
from jaxgrpo.train.timing import StageClock


@dataclasses.dataclass
class Policy:
    """Everything needed to sample from and train the current policy."""

    parts: ModelParts
    graphdef: object
    tokenizer: object
    pad_id: int
    eos_ids: tuple[int, ...]
    matmul_params: int = 0  # for model-FLOP accounting
    mesh: object = None  # the device mesh (None: the default device, no sharding)
    rollout_shardings: object = None  # params in the rollout layout, when it differs
    paged: object = None  # PagedOptions: roll out with the paged engine (one device)

    def generator(self, *, num_samples, max_new_tokens, temperature, top_k, top_p, buckets,
                  local: bool = False):
        """``gen(params, prompt_tokens, prompt_mask, key) -> Rollout`` (host arrays on a mesh).

        On a mesh the prompts are every host's identical global batch, and each host feeds its
        own rows; with ``local=True`` they are this host's rows only (and so is the result).
        """
        def gen(params, prompt_tokens, prompt_mask, key):
            state = nnx.merge_state(params, self.parts.rest)
            kw = dict(
                num_samples=num_samples, max_new_tokens=max_new_tokens,
                temperature=temperature, top_k=top_k, top_p=top_p,
                eos_ids=self.eos_ids, pad_id=self.pad_id, buckets=buckets,
            )
            if self.paged is not None:  # one device, host prompts and results
                return jax.tree.map(np.asarray, generate_functional(
                    self.graphdef, state, np.asarray(prompt_tokens), np.asarray(prompt_mask),
                    key, engine="paged", paged=self.paged, **kw))
            if self.mesh is None:
                return generate_functional(self.graphdef, state, prompt_tokens, prompt_mask,
                                           key, **kw)
            return _mesh_generate(self.graphdef, state, prompt_tokens, prompt_mask, key,
                                  self.mesh, local=local, **kw)
        return gen

    def session(self, params, key, *, num_samples, max_new_tokens, temperature, top_k, top_p,
                buckets):
        """A paged-engine session (``PagedSession``) over ``params``, for streamed rollouts."""
        from jaxgrpo.rollout.engine import PagedSession

        state = nnx.merge_state(params, self.parts.rest)
        return PagedSession(self.graphdef, state, key, num_samples=num_samples,
                            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, eos_ids=self.eos_ids, stop_sequences=(), greedy=False,
                            pad_id=self.pad_id, prompt_width=max(buckets), buckets=buckets,
                            options=self.paged)

    def for_rollout(self, params):
        """``params`` moved on device to the rollout layout (the same arrays if it is the
        training layout, e.g. ``fsdp=1``)."""
        return params if self.rollout_shardings is None else shd.reshard(
            params, self.rollout_shardings)


def _mesh_generate(graphdef, state, tokens, mask, key, mesh, *, local, **kw):
    """Rolls out prompts on ``mesh``; returns host (NumPy) arrays.

    ``local=False``: ``tokens`` are the global batch (the same on every host); the rows are
    padded to a multiple of the data-parallel size with copies of the last prompt, each host
    feeds its block, and the whole result comes back on every host. ``local=True``: ``tokens``
    are this host's rows (prompt widths are made equal across hosts) and this host's rows come
    back.
    """
    nproc, pid = jax.process_count(), jax.process_index()
    tokens, mask = np.asarray(tokens), np.asarray(mask)
    if nproc > 1:  # one prompt width on every host
        width = int(shd.allgather_rows(np.asarray([tokens.shape[1]])).max())
        pad = width - tokens.shape[1]
        tokens = np.pad(tokens, ((0, 0), (pad, 0)), constant_values=kw["pad_id"])
        mask = np.pad(mask, ((0, 0), (pad, 0)), constant_values=False)
    p = tokens.shape[0]
    if not local:
        dp = mesh.shape["data"] * mesh.shape["fsdp"]
        rows = -(-p // dp) * dp
        if rows > p:
            tokens = np.concatenate([tokens, np.repeat(tokens[-1:], rows - p, axis=0)])
            mask = np.concatenate([mask, np.repeat(mask[-1:], rows - p, axis=0)])
        block = rows // nproc
        tokens, mask = (a[pid * block:(pid + 1) * block] for a in (tokens, mask))
    out = generate_functional(graphdef, state, tokens, mask, key,
                              row_sharding=shd.batch_sharding(mesh, 2), **kw)
    out = jax.tree.map(shd.local_rows, out)
    if local:
        return out
    return jax.tree.map(lambda a: shd.allgather_rows(a)[:p], out)


def resolve_tasks(cfg: ExperimentConfig):
    """``(names, {name: Task}, {name: ratio})`` from ``tasks.mixture``."""
    mix = cfg.tasks.mixture
    if isinstance(mix, str):
        if mix not in MIXTURES:
            raise InputError(f"unknown mixture {mix!r}; known: {', '.join(MIXTURES)}")
        ratios = dict(MIXTURES[mix])
        specs = [(name, {}) for name in ratios]
    else:
        ratios = cfg.tasks.ratios()
        specs = [(t.spec, t.options) for t in mix]
    tasks = {}
    for spec, options in specs:
        try:  # the task name and options come from the config (or an extra is missing)
            tasks[spec] = get_task(spec, **options)
        except (ValueError, TypeError, ImportError) as e:
            raise InputError(f"tasks.mixture: {e}" if spec in str(e) else
                             f"tasks.mixture: task {spec!r}: {e}") from e
    return list(ratios), tasks, ratios


def compute_advantages(rewards, valid, cfg: ExperimentConfig):
    """``[P, G]`` advantages for a scalar-reward estimator (host NumPy in, NumPy out).

    ``blockwise`` needs per-block rewards and token block ids: see :func:`batch_advantages`.
    """
    lc = cfg.loss
    if lc.estimator == Estimator.BLOCKWISE:
        raise ValueError(
            "loss.estimator 'blockwise' needs block rewards and token block ids: call "
            "batch_advantages(groups, valid, cfg)"
        )
    adv = core_adv.group_relative(
        jnp.asarray(rewards),
        jnp.asarray(valid),
        baseline=modes.ESTIMATORS[lc.estimator].baseline,
        scale=str(lc.resolved_scale),
        std_ddof=lc.std_ddof,
        eps=lc.eps,
    )
    return np.asarray(adv)


def batch_advantages(groups: rollouts.Groups, valid, cfg: ExperimentConfig):
    """``(advantages, token_weights)`` for the train batch.

    Scalar estimators: ``[P, G]`` advantages and no token weights. ``blockwise`` (BAE): block k's
    advantage (``loss.block_baselines[k]``, OCB strata from the first block's correctness) on
    block k's tokens ``[P, G, Tc]``, with the ``block_mean`` weights ``1 / |T_k|``.
    """
    lc = cfg.loss
    if lc.estimator != Estimator.BLOCKWISE:
        return compute_advantages(groups.rewards, valid, cfg), None
    _, tok, weights = blocks_lib.blockwise_token_advantages(
        groups.blocks, groups.correct, valid, groups.block_ids,
        baselines=lc.block_baselines, std_normalize=lc.block_std_normalize, eps=lc.eps,
    )
    return tok, weights


def check_blockwise(cfg: ExperimentConfig, tasks: dict) -> None:
    """Start-of-run checks of a ``blockwise`` configuration against its tasks (one-line errors)."""
    lc = cfg.loss
    if lc.estimator != Estimator.BLOCKWISE:
        if lc.agg == Agg.BLOCK_MEAN:
            raise InputError("loss.agg 'block_mean' needs loss.estimator 'blockwise' (BAE)")
        return
    if lc.agg != Agg.BLOCK_MEAN:
        raise InputError(
            f"loss.estimator 'blockwise' needs loss.agg 'block_mean' (got {str(lc.agg)!r})"
        )
    if cfg.algo.overlong.buffer > 0:
        raise InputError(
            "algo.overlong.buffer > 0 penalises the scalar reward, which loss.estimator "
            "'blockwise' does not use: set it to 0 (truncated completions lose their last block)"
        )
    for name, task in tasks.items():
        if not isinstance(task, StructuredTask):
            raise InputError(
                f"loss.estimator 'blockwise' needs structured tasks (e.g. "
                f"'confidence' with option base=...), but task {name!r} has no blocks"
            )
        if task.num_blocks != len(lc.block_baselines):
            raise InputError(
                f"loss.block_baselines has {len(lc.block_baselines)} entries but task "
                f"{name!r} has {task.num_blocks} blocks"
            )


def algorithm(cfg: ExperimentConfig) -> modes.AlgorithmSpec:
    """The registry entry of the algorithm that runs (GRPO with ``algo.sampling.enabled``:
    DAPO's)."""
    spec = modes.ALGORITHMS[cfg.algo.name]
    if spec.with_sampling is not None and cfg.algo.sampling.enabled:
        spec = modes.ALGORITHMS[spec.with_sampling]
    return spec


def make_batch_sampler(cfg: ExperimentConfig, names, seed: int) -> RatioPreservingSampler:
    """GRPO, DAPO and MT-GRPO are settings (presets) of the one ratio-preserving sampler.

    The batch is padded with filtered groups when the round cap leaves it short
    (``fill="pad"``): the train step's shapes stay static.
    """
    spec, ds, mt = algorithm(cfg), cfg.algo.sampling, cfg.algo.mt_grpo
    kw = dict(seed=seed, fill="pad")
    if spec.dynamic_sampling:
        kw.update(oversample=ds.oversample, max_rounds=ds.max_rounds, filter=str(ds.filter))
    if spec.task_weights:
        kw.update(max_inflation=mt.max_inflation, rho_decay=mt.rho_ema,
                  preserve_ratios=mt.preserve_ratios, preserve_from_step=mt.preserve_from_step,
                  target_mode=str(mt.target_mode), schedule=str(mt.schedule))
    return RatioPreservingSampler.from_preset(spec.sampler, names, cfg.tasks.prompts_per_step, **kw)


def _scorer(cfg: ExperimentConfig):
    """``score_many`` with the configured verifier memory limit."""
    return functools.partial(score_many, memory_mb=cfg.tasks.verifier_memory_mb)


def evaluate(policy: Policy, params, tasks, eval_sets, cfg: ExperimentConfig, key) -> dict:
    """Per-task accuracy: mean correctness over ``eval_samples`` completions of each prompt."""
    rc = cfg.rollout
    gen = policy.generator(
        num_samples=rc.eval_samples, max_new_tokens=rc.max_new_tokens,
        temperature=rc.eval_temperature, top_k=rc.top_k, top_p=rc.top_p, buckets=rc.prompt_buckets,
    )
    out = {}
    for i, (name, items) in enumerate(eval_sets.items()):
        groups = rollouts.collect(
            items, tasks=tasks, task_index={name: 0}, tokenizer=policy.tokenizer,
            generate=lambda t, m, k: gen(params, t, m, k), key=rng_lib.eval_task_key(key, i),
            prompt_buckets=rc.prompt_buckets, pad_id=policy.pad_id, score_fn=_scorer(cfg),
            max_prompts=rc.max_prompts_per_call,
        )
        out[name] = float(groups.correct.mean())
    return out


@dataclasses.dataclass(frozen=True)
class EvalItem:
    task: str
    record: dict
    uid: str


def eval_sets(tasks, cfg: ExperimentConfig) -> dict:
    n = cfg.tasks.eval_prompts
    out = {}
    for name, task in tasks.items():
        ds = task.dataset("eval", cfg.tasks.seed)
        out[name] = [EvalItem(name, ds[i], f"{name}/eval/{i}") for i in range(min(n, len(ds)))]
    return out


@dataclasses.dataclass
class Setup:
    """What every sub-command needs: tasks, the policy, its initial params, eval prompts.

    ``workdir`` is local or a URI such as ``gs://bucket/run`` (the scheme kept)."""

    workdir: epath.Path
    names: list
    tasks: dict
    ratios: dict
    policy: Policy
    params: object
    eval_sets: dict
    eval_key: jax.Array
    log: object
    stream: object = None  # where progress goes (a metrics.Heartbeat in `jaxgrpo train`)


def setup(cfg: ExperimentConfig, *, stream=sys.stderr, mesh=None) -> Setup:
    """With a ``mesh`` the parameters are created in the training layout and rollouts run there
    (resharded to the rollout layout); without one, everything is on the default device."""
    names, tasks, ratios = resolve_tasks(cfg)  # an unknown task fails before anything is written
    paged = paged_options(cfg.rollout, mesh)
    metrics_lib.set_phase(stream, "loading the model and tokenizer")
    workdir = paths.as_path(cfg.train.workdir)  # keeps gs:// (pathlib would not)
    workdir.mkdir(parents=True, exist_ok=True)
    quiet = jax.process_index() != 0
    log = lambda msg: None if quiet else print(f"[jaxgrpo] {msg}", file=stream, flush=True)
    model, tokenizer = build_policy(cfg.model, seed=cfg.train.seed, workdir=workdir, mesh=mesh,
                                    rules=shd.TRAIN_RULES)
    pad_id, eos_ids = special_ids(tokenizer)
    parts, params = split_model(model)
    rollout_sh = None if mesh is None else rollout_param_shardings(params, mesh)
    policy = Policy(parts, nnx.graphdef(model), tokenizer, pad_id, eos_ids,
                    matmul_params=int(model.cfg.matmul_params), mesh=mesh,
                    rollout_shardings=rollout_sh, paged=paged)
    eval_key = rng_lib.eval_key(rng_lib.base_key(cfg.train.seed))
    return Setup(workdir, names, tasks, ratios, policy, params, eval_sets(tasks, cfg), eval_key, log,
                 stream)


def paged_options(rc, mesh):
    """``PagedOptions`` from ``rollout`` when ``rollout.engine`` is paged, else None."""
    if rc.engine != "paged":
        return None
    if jax.process_count() > 1 or (mesh is not None and mesh.size > 1):
        raise ValueError("rollout.engine 'paged' runs on one device: set rollout.engine=static "
                         "or mesh.devices=1")
    return PagedOptions(max_slots=rc.max_slots, steps_per_sync=rc.steps_per_sync,
                        page_size=rc.page_size)


def rollout_param_shardings(params, mesh):
    """The parameters' rollout-layout shardings (``ROLLOUT_RULES``), or None when they equal
    the training layout (``fsdp=1``: no reshard). ``params`` may be abstract."""
    flat = lambda rules: jax.tree.leaves(
        shd.param_shardings(params, mesh, rules),
        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    if flat(shd.TRAIN_RULES) == flat(shd.ROLLOUT_RULES):
        return None
    return shd.param_shardings(params, mesh, shd.ROLLOUT_RULES)  # fsdp > 1: weights gathered


def step_config(cfg: ExperimentConfig, num_tasks: int) -> StepConfig:
    """The train step's static knobs from the config (``num_tasks``: tasks in the mixture)."""
    lc, rc = cfg.loss, cfg.rollout
    return StepConfig(
        epochs=lc.epochs, num_minibatches=lc.minibatches, microbatches=lc.micro_batches,
        clip_low=lc.clip_low, clip_high=lc.clip_high, dual_clip=lc.dual_clip,
        kl_coef=lc.kl_coef, kl_estimator=str(lc.kl_estimator),
        kl_ratio_correction=lc.kl_ratio_correction, agg=str(lc.agg),
        max_len=rc.max_new_tokens, recompute_old_logp=lc.recompute_old_logp,
        num_tasks=num_tasks if algorithm(cfg).task_weights else 0,
        improvement_reduce=str(cfg.algo.mt_grpo.improvement_reduce),
    )


def train_batch_shardings(mesh, *, blockwise: bool) -> batch_lib.TrainBatch:
    """A TrainBatch of shardings: rows over ``("data", "fsdp")``, the rest replicated
    (``advantages`` is ``[N, S]`` for BAE, ``[N]`` otherwise)."""
    return batch_lib.TrainBatch(
        *(shd.batch_sharding(mesh, 2),) * 3, shd.batch_sharding(mesh, 2 if blockwise else 1),
        *(shd.batch_sharding(mesh, 2),) * 2, *(shd.batch_sharding(mesh, 1),) * 2,
    )


def warm_start(cfg: ExperimentConfig, su: Setup, params, out_dir: epath.PathLike | None = None):
    """SFT on gold completions; saves the result as an HF checkpoint in ``out_dir`` if given
    (a local directory, or a URI: written to a local staging directory, then copied there by
    ``jaxgrpo.paths.local_dir``)."""
    params = _warm_start(cfg, su.policy, params, su.tasks, su.names, su.ratios, su.workdir, su.log,
                         stream=su.stream)
    if out_dir is not None:
        save_policy_hf(su.policy, params, out_dir)
        su.log(f"SFT model saved (HF format) to {out_dir}")
    return params


def save_policy_hf(policy: Policy, params, out_dir: epath.PathLike) -> None:
    """The policy with ``params`` as an HF directory (``config.json``, ``model.safetensors``
    and the tokenizer) that ``transformers`` and ``jaxgrpo.model.load_hf`` load.

    ``out_dir`` is local or a URI (written to a local staging directory, then copied there by
    ``jaxgrpo.paths.local_dir``). With several processes every process must call this (each
    parameter is gathered to every host); process 0 writes.
    """
    from jaxgrpo.model import save_hf

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        params = jax.tree.map(lambda a: multihost_utils.process_allgather(a, tiled=True), params)
    if jax.process_index() != 0:
        return
    with paths.local_dir(out_dir) as local:
        save_hf(policy.parts.merge(params), local)
        policy.tokenizer.save_pretrained(str(local))


def export_checkpoint(cfg: ExperimentConfig, run_dir: epath.PathLike, out_dir: epath.PathLike,
                      *, step: int | None = None) -> int:
    """Writes checkpoint ``step`` (default: the latest) of the run in ``run_dir`` (its
    ``train.workdir``; ``cfg`` is the run's own config) to ``out_dir`` in the HF format, as
    :func:`save_policy_hf` does; returns the step. One process, the default device.

    Raises:
      FileNotFoundError: no checkpoint directory, or no committed checkpoint for ``step``.
    """
    import tempfile

    run_dir = paths.as_path(run_dir)
    ckpt_dir = paths.as_path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir / "checkpoints"
    ckpt = Checkpointer(ckpt_dir, create=False)
    steps = ckpt.all_steps()
    if not steps:
        raise FileNotFoundError(f"no committed checkpoint in {ckpt_dir}: nothing to export")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step} in {ckpt_dir}; available steps: "
                                + ", ".join(map(str, steps)))
    with tempfile.TemporaryDirectory(prefix="jaxgrpo-export-") as tmp:
        # The architecture and tokenizer come from the config (the preset's tokenizer is
        # rebuilt in a scratch directory); the weights from the checkpoint.
        model, tokenizer = build_policy(cfg.model, seed=cfg.train.seed,
                                        workdir=epath.Path(tmp))
        parts, params = split_model(model)
        abstract = jax.eval_shape(lambda: initial_state(cfg, params))
        state, _ = ckpt.restore(step, abstract_state=abstract)
        ckpt.close()
        policy = Policy(parts, nnx.graphdef(model), tokenizer, *special_ids(tokenizer))
        save_policy_hf(policy, state.params, out_dir)
    return step


def optimizer(cfg: ExperimentConfig):
    return make_optimizer(cfg.optim, cfg.train.steps * cfg.loss.epochs * cfg.loss.minibatches)


def initial_state(cfg: ExperimentConfig, params, tx=None):
    """A fresh train state (also the abstract target of a checkpoint restore)."""
    lc = cfg.loss
    return init_train_state(
        params, tx or optimizer(cfg), cfg.train.seed, with_ref=lc.kl_coef > 0,
        entropy_coef=lc.entropy_coef,
    )


def sharded_state(cfg: ExperimentConfig, params, mesh, tx):
    """``(state, abstract_state, state_shardings)`` of a fresh train state on ``mesh``.

    The state is built by one jitted function whose outputs are already in their
    ``TRAIN_RULES`` layout. ``abstract_state`` (shapes and dtypes: parameters, optimiser moments
    and reference parameters all in the parameters' dtype) with ``state_shardings`` is also the
    target of a checkpoint restore (``shd.abstract_like(abstract_state, state_shardings)``).
    """
    make_state = lambda p: initial_state(cfg, p, tx)
    abstract_state = jax.eval_shape(make_state, params)
    state_sh = shd.state_shardings(abstract_state, mesh, shd.TRAIN_RULES, tx)
    return jax.jit(make_state, out_shardings=state_sh)(params), abstract_state, state_sh


def run(
    cfg: ExperimentConfig, *, resume: bool | str = False, stop_after: int | None = None,
    stream=sys.stderr,
) -> dict:
    """Trains as configured; returns a summary with per-task accuracy before and after.

    ``resume`` continues from the latest checkpoint under the run's directory; ``"auto"`` does
    so when there is one and starts a fresh run otherwise (the log says which). ``stop_after``
    ends this process's work after that many steps (with a checkpoint); a later ``resume``
    continues exactly where it stopped.

    A SIGTERM (or, with several processes, JAX's preemption notice on any host) ends the run
    after the current step with a checkpoint of that step (:mod:`jaxgrpo.train.preemption`):
    the summary then has ``preempted_at`` (the saved step) and no ``accuracy_after``. At the
    end of a complete run the policy is exported in the HF format to
    ``<train.workdir>/final_model``.

    Joins a multi-host run first (``cfg.distributed`` or the environment; nothing happens for a
    single process), then builds the mesh ``cfg.mesh`` over every device and trains under it.
    """
    if cfg.mesh.axis_types != "auto":
        raise InputError(
            f"mesh.axis_types {str(cfg.mesh.axis_types)!r} is not supported by the trainer: set "
            "mesh.axis_types=auto (the step pins its shardings through jit in/out shardings)"
        )
    if cfg.model.path is None and cfg.model.preset is None:
        raise InputError(f"model.hf_config ({cfg.model.hf_config!r}) is an architecture without "
                         "weights: set model.path to a local HF checkpoint to train")
    shd.initialize_distributed(cfg.distributed)
    validate(cfg, num_devices=jax.device_count(), check_paths=False)
    if jax.process_count() > 1 and cfg.mesh.devices != -1:
        raise InputError("mesh.devices must be -1 (every device) in a multi-process run")
    if jax.process_count() > 1 and cfg.model.sft.steps > 0:
        raise InputError(
            "model.sft.steps > 0 runs the SFT warm start in this process only: with several "
            "processes run `jaxgrpo sft` first and start RL from its HF checkpoint (model.path), "
            "with model.sft.steps=0"
        )
    if resume not in (False, True, "auto"):
        raise ValueError(f"resume must be False, True or 'auto', got {resume!r}")
    # Every refusal comes before anything is written, built or compiled.
    check_run_directory(cfg, resume=resume)
    check_blockwise(cfg, resolve_tasks(cfg)[1])
    check_resources(cfg)
    mesh = shd.make_mesh(cfg.mesh)
    lead = jax.process_index() == 0
    # The lead process says what it is doing at least every 10 s (compiles included); a
    # caller's heartbeat (`jaxgrpo train` starts one before importing JAX) is carried on.
    beat = None
    if lead and not isinstance(stream, metrics_lib.Heartbeat):
        stream = beat = metrics_lib.Heartbeat(stream)
    metrics_lib.set_phase(stream, "setting up")
    try:
        if lead:
            print(f"[jaxgrpo] train: {cfg.train.steps} RL steps, run files in "
                  f"{cfg.train.workdir}", file=stream, flush=True)
        with jax.set_mesh(mesh), PreemptionWatch() as watch:
            return _run(cfg, mesh, resume=resume, stop_after=stop_after, stream=stream,
                        watch=watch)
    finally:
        if beat is not None:
            beat.close()


def checkpoint_dir(cfg: ExperimentConfig) -> epath.Path:
    """Where the run's checkpoints go: ``checkpoint.dir``, else ``<train.workdir>/checkpoints``."""
    if cfg.checkpoint.dir:
        return paths.as_path(cfg.checkpoint.dir)
    return paths.as_path(cfg.train.workdir) / "checkpoints"


def check_run_directory(cfg: ExperimentConfig, *, resume: bool | str) -> None:
    """Refuses, before anything is written, a fresh run over an old run's checkpoints and a
    ``--resume`` with nothing to resume (one-line :class:`InputError`); ``resume="auto"``
    accepts both."""
    ckpt_dir = checkpoint_dir(cfg)
    steps = committed_steps(ckpt_dir)
    if steps and not resume:
        raise InputError(f"{ckpt_dir} already holds checkpoints (step {steps[-1]}): pass "
                         "--resume to continue that run, or set train.workdir to a new directory")
    if resume is True and not steps:
        raise InputError(f"--resume: nothing to resume, {ckpt_dir} holds no committed "
                         "checkpoint: start without --resume (or give the run's train.workdir)")


def check_resources(cfg: ExperimentConfig):
    """Reads the model's dimensions (config.json and the safetensors headers of ``model.path``:
    a broken file is named here) and refuses batch sizes that cannot fit in memory
    (:mod:`jaxgrpo.train.resources`). Nothing is allocated or written."""
    from jaxgrpo.train import aot, resources

    if cfg.model.path is not None:
        from jaxgrpo.model.hf import _index_weights, _read_config_json

        directory = pathlib.Path(cfg.model.path).expanduser()
        _read_config_json(directory)
        _index_weights(directory)
    try:
        mcfg, _ = aot.model_config(cfg)
    except aot.CompileError as e:
        raise InputError(str(e)) from None
    return resources.check(cfg, mcfg)


def _run(cfg: ExperimentConfig, mesh, *, resume: bool | str, stop_after: int | None, stream,
         watch: PreemptionWatch) -> dict:
    # ---- SET-UP --------------------------------------------------------------------------
    su = setup(cfg, stream=stream, mesh=mesh)
    workdir, names, tasks, ratios, policy, log = (
        su.workdir, su.names, su.tasks, su.ratios, su.policy, su.log
    )
    check_blockwise(cfg, tasks)
    lead = jax.process_index() == 0  # the one process that writes logs and files
    if lead:
        save_config(cfg, workdir / "config.yaml")
    base_key = rng_lib.base_key(cfg.train.seed)
    task_index = {n: i for i, n in enumerate(names)}
    rc, lc = cfg.rollout, cfg.loss
    parts, params, tokenizer, pad_id = policy.parts, su.params, policy.tokenizer, policy.pad_id

    # ---- CHECKPOINTS ---------------------------------------------------------------------
    ckpt_dir = paths.as_path(cfg.checkpoint.dir) if cfg.checkpoint.dir else workdir / "checkpoints"
    ckpt = Checkpointer(ckpt_dir, keep=cfg.checkpoint.keep, asynchronous=cfg.checkpoint.asynchronous)
    restoring = bool(resume) and ckpt.latest_step() is not None
    if resume == "auto" and not restoring:
        log(f"--resume auto: no checkpoint in {ckpt_dir}: starting a fresh run")
    if not resume and ckpt.latest_step() is not None:
        raise ValueError(
            f"{ckpt_dir} already holds checkpoints (step {ckpt.latest_step()}): pass --resume to "
            "continue that run, or set train.workdir to a new directory"
        )

    # ---- SFT WARM START (fresh runs only: a checkpoint already holds its result) ----------
    es, eval_key = su.eval_sets, su.eval_key
    summary = {"workdir": str(workdir)}
    if not restoring and cfg.model.sft.steps > 0:
        metrics_lib.set_phase(stream, "evaluating before SFT (the first call compiles the sampler)")
        summary["accuracy_init"] = evaluate(policy, params, tasks, es, cfg, eval_key)
        params = warm_start(cfg, su, params, workdir / "sft_model")

    # ---- STATE, STEP, SAMPLERS -----------------------------------------------------------
    tx = optimizer(cfg)
    state, abstract_state, state_sh = sharded_state(cfg, params, mesh, tx)
    step_cfg = step_config(cfg, len(names))
    blockwise = lc.estimator == Estimator.BLOCKWISE
    batch_sh = train_batch_shardings(mesh, blockwise=blockwise)
    train_step = make_train_step(parts, tx, step_cfg, state_sharding=state_sh,
                                 batch_sharding=batch_sh)
    prompts = TaskSampler(
        {n: t.dataset("train", cfg.tasks.seed) for n, t in tasks.items()},
        ratios, global_batch=cfg.tasks.prompts_per_step, seed=cfg.tasks.seed,
    )
    batcher = make_batch_sampler(cfg, names, cfg.tasks.seed)
    mt = TaskWeightUpdater(names, cfg.algo.mt_grpo) if algorithm(cfg).task_weights else None
    if restoring:
        state, meta = ckpt.restore(abstract_state=shd.abstract_like(abstract_state, state_sh))
        prompts.set_state(meta["task_sampler"])
        batcher.set_state(meta["batch_sampler"])
        if mt is not None:
            mt.set_state(meta["task_weights"])
        summary["accuracy_before"] = meta["accuracy_before"]
        summary.update({k: meta[k] for k in ("accuracy_init",) if k in meta})
        log(f"resumed from {ckpt_dir} at step {int(state.step)}")
    else:
        metrics_lib.set_phase(stream, "evaluating before RL")
        summary["accuracy_before"] = evaluate(
            policy, policy.for_rollout(state.params), tasks, es, cfg, eval_key
        )
    log("accuracy before RL: " + _fmt_acc(summary["accuracy_before"]))

    # ---- LOOP ----------------------------------------------------------------------------
    peak, peak_source = peak_flops(str(cfg.model.dtype), list(mesh.devices.flat))
    log(f"perf/mfu denominator: {peak:.3g} FLOP/s ({peak_source})")
    log_path = workdir / "metrics.jsonl"
    if lead and not restoring and log_path.exists():
        log_path.unlink()
    writer = (metrics_lib.JsonlWriter(log_path, resume_step=int(state.step) if restoring else None)
              if lead else metrics_lib.NullWriter())
    if lead and cfg.logging.tensorboard:
        writer = metrics_lib.MultiWriter(
            [writer, metrics_lib.TensorBoardWriter(cfg.logging.dir or workdir / "tensorboard")]
        )
    if lead and cfg.logging.wandb.enabled:
        wb = cfg.logging.wandb
        writer = metrics_lib.MultiWriter([writer, metrics_lib.WandbWriter(
            project=wb.project, entity=wb.entity, name=wb.name or workdir.name, mode=wb.mode,
            dir=wb.dir, tags=wb.tags)])
    writer.write_hparams({**flatten_config(cfg), "perf/peak_flops_source": peak_source})
    guard = metrics_lib.NonFiniteGuard(max_consecutive=cfg.train.max_nonfinite_steps)
    progress = (metrics_lib.ProgressBar(cfg.train.steps, stream=stream)
                if lead and cfg.logging.progress else None)
    gen = policy.generator(
        num_samples=rc.group_size, max_new_tokens=rc.max_new_tokens, temperature=rc.temperature,
        top_k=rc.top_k, top_p=rc.top_p, buckets=rc.prompt_buckets, local=True,
    )
    start_step = last_saved = int(state.step)
    # Each host rolls out its own block of a round: its share of the prompts per sampler call.
    local_max_prompts = (None if rc.max_prompts_per_call is None
                         else rc.max_prompts_per_call // jax.process_count())
    ent_ctl = (
        blocks_lib.EntropyController(
            target=lc.target_entropy, delta=lc.entropy_delta, max_coef=lc.entropy_coef_max
        )
        if lc.adaptive_entropy
        else None
    )
    pending = None  # (step, host metrics, device metrics): fetched one step late
    end_step = cfg.train.steps if stop_after is None else min(cfg.train.steps, stop_after)
    preempted_at = None
    clock = StageClock()  # stage times, read with the metrics (one step late, no device sync)
    verify = clock.timed("verify", _scorer(cfg))
    loop_t0 = time.perf_counter()
    for step in range(start_step, end_step):
        clock.begin(step)
        first = step == start_step
        metrics_lib.set_phase(stream, f"RL step {step + 1}/{cfg.train.steps}: rollouts"
                              + (" (compiling the sampler)" if first else ""))
        rounds: list[rollouts.Groups] = []
        rollout_params = policy.for_rollout(state.params)

        def generate(requests, _params=rollout_params, _step=step, _rounds=rounds):
            items = prompts.draw(requests)  # the global batch, the same on every host
            # This host rolls out and verifies its block of the prompts (padded to a multiple
            # of the data-parallel size); every host then holds every group's results.
            mine, pad = _host_block(items, mesh)
            g = rollouts.collect(
                mine, tasks=tasks, task_index=task_index, tokenizer=tokenizer,
                generate=lambda tok, msk, rk: gen(_params, tok, msk, rk),
                key=rng_lib.rollout_key(base_key, _step, len(_rounds)),
                prompt_buckets=rc.prompt_buckets,
                pad_id=pad_id, score_fn=verify, with_blocks=blockwise,
                eos_ids=policy.eos_ids, max_prompts=local_max_prompts,
            )
            g = _gather_groups(g, items, pad)
            _apply_overlong(g, cfg)
            r = len(_rounds)
            _rounds.append(g)
            return [Group(it.task, it.uid, tuple(g.rewards[i]), (r, i)) for i, it in enumerate(items)]

        weights = mt.weights() if mt is not None else ratios
        if cfg.algo.sampling.stream:  # one device: no host blocks to gather
            group_stream = rollouts.GroupStream(
                policy.session(rollout_params, rng_lib.rollout_key(base_key, step, 0),
                               num_samples=rc.group_size, max_new_tokens=rc.max_new_tokens,
                               temperature=rc.temperature, top_k=rc.top_k, top_p=rc.top_p,
                               buckets=rc.prompt_buckets),
                draw=prompts.draw, tasks=tasks, task_index=task_index, tokenizer=tokenizer,
                prompt_buckets=rc.prompt_buckets, pad_id=pad_id, score_fn=verify,
                with_blocks=blockwise, eos_ids=policy.eos_ids,
                postprocess=lambda g: _apply_overlong(g, cfg))
            result = batcher.run_step_streamed(weights, group_stream)
            rounds = group_stream.parts
        else:
            result = batcher.run_step(weights, generate)
        if result.hit_cap:
            log(f"warning: step {step + 1}: dynamic sampling hit its round cap "
                f"(algo.sampling.max_rounds={cfg.algo.sampling.max_rounds}): "
                f"{int(np.sum(result.padded))} of {len(result.padded)} groups in the batch are "
                "padding with no learning signal (raise algo.sampling.oversample or "
                "max_rounds, or start from a better policy)")
        chosen = [g.payload for g in result.batch]
        groups = rollouts.Groups.concat([rounds[r].take([i]) for r, i in chosen])
        valid = ~np.asarray(result.padded)[:, None] & ~groups.errors
        clock.rollout_done()
        adv, token_weights = batch_advantages(groups, valid, cfg)
        tb = batch_lib.assemble(
            groups.prompt_tokens, groups.prompt_mask, groups.tokens, groups.mask, adv,
            old_logp=groups.logprobs, valid=valid, task_ids=groups.task_ids, pad_id=pad_id,
            token_weights=token_weights,
        )
        # Every host built the same global batch; each feeds its own rows (whole groups).
        rows = tb.tokens.shape[0] // jax.process_count()
        own = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
        tb = shd.shard_batch(jax.tree.map(lambda a, s=own: a[s], tb), mesh,
                             group_size=rc.group_size, process_local=True)
        coef_used = float(state.entropy_coef) if ent_ctl is not None else 0.0  # (donated next)
        metrics_lib.set_phase(stream, f"RL step {step + 1}/{cfg.train.steps}: train step"
                              + (" (compiling it)" if first else ""))
        state, dev_metrics = train_step(state, tb)
        clock.dispatched(dev_metrics)
        if ent_ctl is not None:
            # The next rollout waits for this step's parameters anyway: fetching one scalar
            # here costs no overlap.
            coef = ent_ctl.update(coef_used, float(dev_metrics["loss/entropy_mean"]))
            state = state.replace(entropy_coef=_replicated(coef, mesh))
        if pending is not None:
            _flush(pending, writer, guard, progress, clock)
        host = _rollout_metrics(groups, rounds, names, result)
        if blockwise:
            host.update(_block_metrics(groups, valid, adv, cfg))
        if ent_ctl is not None:
            host["loss/entropy_coef"] = coef_used
        # Model FLOPs, 2N per real token and forward pass: the rollouts' (every round; each
        # prompt prefilled once) and the train step's (StepConfig.forward_passes).
        host["perf/rollout_flops"] = 2.0 * policy.matmul_params * (
            host["rollout/tokens"] + sum(float(r.prompt_mask.sum()) for r in rounds))
        trained = float(groups.prompt_mask.sum()) * rc.group_size + float(groups.mask.sum())
        host["update/tokens"] = trained  # real (unpadded) tokens of the train batch
        host["perf/update_flops"] = (2.0 * policy.matmul_params * step_cfg.forward_passes
                                     * trained)
        host["perf/peak_flops"] = peak
        pending = (step, host, dev_metrics)
        if mt is not None:
            # Streamed, the step's finished groups are one generation round (J_k: one EMA step).
            seen = [rollouts.Groups.concat(rounds)] if cfg.algo.sampling.stream else rounds
            mt.update([(r.correct, r.task_ids) for r in seen],
                      np.asarray(dev_metrics["task_improvement"]))
            host.update(mt.metrics())
        if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0 and step + 1 < cfg.train.steps:
            metrics_lib.set_phase(stream, f"evaluating after step {step + 1}")
            acc = clock.timed("eval", evaluate)(policy, policy.for_rollout(state.params), tasks,
                                                es, cfg, eval_key)
            writer.write_scalars(step + 1, {f"eval/{k}/accuracy": v for k, v in acc.items()})
        if cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0:
            clock.timed("checkpoint", _save)(ckpt, state, prompts, batcher, mt, summary, cfg)
            last_saved = step + 1
        if step + 1 < cfg.train.steps and watch.reached(step + 1):
            preempted_at = step + 1
            break
    if pending is not None:
        _flush(pending, writer, guard, progress, clock)
    summary["train_loop_s"] = time.perf_counter() - loop_t0  # the steps' wall time
    if last_saved != int(state.step):
        _save(ckpt, state, prompts, batcher, mt, summary, cfg)
    ckpt.wait()
    ckpt.close()
    if preempted_at is not None:
        writer.close()
        log(f"{watch.signal_name} received: stopped after step {preempted_at} of "
            f"{cfg.train.steps} with a checkpoint in {ckpt_dir}; continue with --resume")
        summary.update(preempted_at=preempted_at, checkpoint_dir=str(ckpt_dir),
                       params=state.params, task_sampler_state=prompts.get_state())
        return summary

    # ---- FINAL EVALUATION ----------------------------------------------------------------
    metrics_lib.set_phase(stream, "final evaluation")
    summary["accuracy_after"] = evaluate(
        policy, policy.for_rollout(state.params), tasks, es, cfg, eval_key
    )
    writer.write_scalars(cfg.train.steps, {f"eval/{k}/accuracy": v for k, v in summary["accuracy_after"].items()})
    writer.close()
    if int(state.step) == cfg.train.steps:  # (not after stop_after)
        final = workdir / "final_model"
        save_policy_hf(policy, state.params, final)
        log(f"final policy saved (HF format) to {final}")
    summary["params"] = state.params
    summary["task_sampler_state"] = prompts.get_state()
    summary["batch_sampler_state"] = batcher.get_state()
    summary["task_weights_state"] = mt.get_state() if mt is not None else None
    return summary


def _host_block(items: list, mesh) -> tuple[list, int]:
    """``(this host's items, padding)``: the global list is padded with copies of its last item
    to a multiple of the data-parallel size ``data*fsdp`` and split into one contiguous block per
    process (so the global rollout batch has the rows of a single-process run)."""
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    nproc = jax.process_count()
    if dp % nproc:
        raise ValueError(f"mesh: the data-parallel size data*fsdp={dp} must divide by the "
                         f"number of processes ({nproc}), so that every host feeds whole rows")
    padded = list(items) + [items[-1]] * (-len(items) % dp)
    block = len(padded) // nproc
    i = jax.process_index()
    return padded[i * block:(i + 1) * block], len(padded) - len(items)


def _gather_groups(local: rollouts.Groups, items: list, pad: int) -> rollouts.Groups:
    """Every host's block of a round, concatenated in process order, padding rows dropped.

    Arrays are gathered (prompt widths and block counts padded to the widest host first);
    ``items`` is the global list every host drew; ``texts`` are kept for this host's rows only
    (other hosts' completions are ``""``: nothing downstream reads them).
    """
    n = len(items)
    if jax.process_count() == 1:
        return local.take(np.arange(n)) if pad else local
    out = {}
    for f in dataclasses.fields(rollouts.Groups):
        v = getattr(local, f.name)
        if not isinstance(v, np.ndarray):
            continue
        shapes = shd.allgather_rows(np.asarray([v.shape], np.int64))
        widths = [(0, 0)] + [(0, int(m) - d) for m, d in zip(shapes.max(0)[1:], v.shape[1:],
                                                              strict=True)]
        if f.name in ("prompt_tokens", "prompt_mask"):  # left-padded prompts
            widths = [(0, 0), widths[1][::-1]]
        fill = -1 if f.name == "block_ids" else 0
        out[f.name] = shd.allgather_rows(np.pad(v, widths, constant_values=fill))[:n]
    g = local.tokens.shape[1]
    texts = [[""] * g for _ in range(len(items) + pad)]
    block = len(texts) // jax.process_count()
    texts[jax.process_index() * block:(jax.process_index() + 1) * block] = local.texts
    return rollouts.Groups(items=list(items), texts=texts[:n], **out)


def _slowest(seconds: dict) -> dict:
    """Each value the largest over the hosts (one host's stage time holds up all of them)."""
    top = shd.allgather_rows(np.asarray([list(seconds.values())], np.float64)).max(0)
    return dict(zip(seconds, top.tolist(), strict=True))


def _replicated(value: float, mesh) -> jax.Array:
    """A float32 scalar replicated over ``mesh`` (a global array on every host)."""
    return jax.make_array_from_callback((), shd.replicated(mesh),
                                        lambda _: np.asarray(value, np.float32))


def peak_flops(compute_dtype: str, devices=None) -> tuple[float, str]:
    """``(FLOP/s, source)``: the denominator of ``perf/mfu`` for ``devices`` (default: all).

    On a TPU in :mod:`jaxgrpo.hardware`'s table: the device's peak for the compute dtype times
    the number of devices (model FLOPs are counted over the whole batch). Elsewhere (CPU, an
    unknown device): one device's measured float32 matmul rate (:func:`measure_matmul_peak`).
    """
    from jaxgrpo import hardware

    devs = list(jax.devices() if devices is None else devices)
    dev = devs[0]
    hit = hardware.peak_flops_for(dev.device_kind, getattr(dev, "num_cores", None),
                                  compute_dtype)
    if hit is not None:
        return hit[0] * len(devs), f"{len(devs)} x {dev.device_kind}: {hit[1]}"
    return measure_matmul_peak(), (f"measured float32 1024^3 matmul on {dev.device_kind} "
                                   "(measure_matmul_peak)")


def measure_matmul_peak(n: int = 1024, repeats: int = 10) -> float:
    """FLOP/s of a jitted float32 ``n^3`` matmul, the denominator of ``perf/mfu``: the fastest
    of ``repeats`` calls (a peak; a median moves with whatever else the machine runs)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2.0 * n**3 / min(times)


def _fmt_acc(acc: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in acc.items()) + f" (mean {np.mean(list(acc.values())):.3f})"


def _warm_start(cfg, policy: Policy, params, tasks, names, ratios, workdir, log, stream=None):
    """SFT on gold completions drawn from the training mixture (a separate sampler stream)."""
    sc, rc = cfg.model.sft, cfg.rollout
    sampler = TaskSampler(
        {n: t.dataset("train", cfg.tasks.seed + 1) for n, t in tasks.items()},
        ratios, global_batch=sc.batch_size, seed=cfg.tasks.seed + 1,
    )

    def batches():
        while True:
            items = sampler.next_batch()
            yield (
                [tasks[it.task].prompt(it.record) for it in items],
                [tasks[it.task].gold_completion(it.record) for it in items],
            )

    losses = []
    t0 = time.perf_counter()

    metrics_lib.set_phase(stream, f"SFT warm start: compiling the SFT step (0/{sc.steps})")

    def on_step(i, loss):
        metrics_lib.set_phase(stream, f"SFT warm start: step {i + 1}/{sc.steps}")
        if (i + 1) % max(sc.steps // 5, 1) == 0 or i + 1 == sc.steps:
            losses.append(float(loss))
            log(f"sft step {i + 1}/{sc.steps} loss {losses[-1]:.4f} ({time.perf_counter() - t0:.0f} s)")

    import optax

    tx = optax.adamw(sc.lr, weight_decay=0.0)
    params = sft.run_sft(
        policy.parts, params, batches(), tokenizer=policy.tokenizer, steps=sc.steps, tx=tx,
        prompt_buckets=rc.prompt_buckets, completion_len=rc.max_new_tokens,
        pad_id=policy.pad_id, eos_id=policy.eos_ids[0], on_step=on_step,
    )
    return params


def _apply_overlong(groups: rollouts.Groups, cfg: ExperimentConfig) -> None:
    ol = cfg.algo.overlong
    if ol.buffer > 0:
        lengths = groups.mask.sum(-1)
        groups.rewards += rollouts.overlong_penalty(
            lengths, cfg.rollout.max_new_tokens, ol.buffer, ol.penalty
        )


def _rollout_metrics(groups: rollouts.Groups, rounds, names, result) -> dict:
    task_names = [names[i] for i in groups.task_ids]
    lengths = groups.mask.sum(-1)
    out = metrics_lib.per_task_metrics(task_names, groups.rewards, groups.correct, lengths)
    out.update(result.metrics())
    # Accuracy before filtering (MT-GRPO's J_k counts every generated rollout).
    everything = rollouts.Groups.concat(rounds) if len(rounds) > 1 else rounds[0]
    out["reward/mean"] = float(groups.rewards.mean())
    out["accuracy/generated"] = float(everything.correct.mean())
    out["accuracy/batch"] = float(groups.correct.mean())
    out["verifier/errors"] = float(everything.errors.sum())
    out["rollout/truncated_frac"] = float(everything.truncated.mean())
    out["rollout/length_mean"] = float(lengths.mean())
    out["rollout/tokens"] = float(everything.mask.sum())
    return out


def _block_metrics(groups: rollouts.Groups, valid, token_adv, cfg: ExperimentConfig) -> dict:
    """Per-block reward and advantage summaries (BAE), over valid samples."""
    out = {}
    v = np.asarray(valid, bool)
    for k in range(groups.blocks.shape[-1]):
        inside = groups.block_ids == k  # [P, G, Tc]
        has = inside.any(-1) & v
        r = groups.blocks[..., k][v]
        out[f"blocks/{k}/reward_mean"] = float(r.mean()) if r.size else 0.0
        out[f"blocks/{k}/present_frac"] = float(has.sum() / max(v.sum(), 1))
        out[f"blocks/{k}/tokens_mean"] = float(inside.sum(-1)[has].mean()) if has.any() else 0.0
        a = np.where(inside, token_adv, 0.0).sum(-1) / np.maximum(inside.sum(-1), 1)
        out[f"blocks/{k}/adv_abs_mean"] = float(np.abs(a[has]).mean()) if has.any() else 0.0
    return out


def _flush(pending, writer, guard, progress, clock: StageClock) -> None:
    step, host, dev = pending
    times = _slowest(clock.times(step))  # waits for the update, which is done or nearly
    dev = jax.device_get(dev)
    dev.pop("task_improvement", None)
    scalars = {**host, **metrics_lib.to_scalars(dev), **times}
    dt, peak = times["time/step_s"], scalars["perf/peak_flops"]
    rollout_flops, update_flops = scalars.pop("perf/rollout_flops"), scalars.pop("perf/update_flops")
    scalars["perf/tokens_per_s"] = scalars["rollout/tokens"] / dt
    # perf/peak_flops (the denominator; its source is in the hparams) stays in the log.
    scalars["perf/mfu"] = metrics_lib.mfu(rollout_flops + update_flops, dt, peak)
    # The train step alone (batch assembly and transfer included), and the rollout alone.
    scalars["perf/update_mfu"] = metrics_lib.mfu(update_flops, max(times["time/update_s"], 1e-9),
                                                 peak)
    scalars["perf/rollout_tokens_per_s"] = (scalars["rollout/tokens"]
                                            / max(times["time/rollout_s"], 1e-9))
    guard.check(step, scalars)
    scalars.update(guard.metrics())
    writer.write_scalars(step + 1, scalars)
    if progress is not None:
        progress.update(step + 1, scalars)


def _save(ckpt, state, prompts, batcher, mt, summary, cfg) -> None:
    meta = {
        "task_sampler": prompts.get_state(),
        "batch_sampler": batcher.get_state(),
        "task_weights": mt.get_state() if mt is not None else None,
        "accuracy_before": summary["accuracy_before"],
    }
    if "accuracy_init" in summary:
        meta["accuracy_init"] = summary["accuracy_init"]
    ckpt.save(int(state.step), state, meta)
