"""The jitted train step: mu epochs x minibatches of clipped policy-gradient updates.

One call consumes one rollout batch (:class:`~jaxgrpo.train.batch.TrainBatch`):

1. Reference quantities, once, with the parameters at the start of the step: the "old" policy's
   log-probs (recomputed in the trainer's layout unless the sampler's are trusted, see below) and
   the reference policy's log-probs when KL is on.
2. ``lax.scan`` over ``epochs * num_minibatches`` minibatches (rows shuffled per epoch by the
   step's shuffle key, :func:`jaxgrpo.train.rng.shuffle_key`): gradient of :func:`jaxgrpo.core.losses.policy_loss` accumulated
   exactly over micro-batches (numerators summed, one shared denominator), then an optax update.
   A non-finite loss or gradient skips that update and is counted.
3. Optionally, one extra forward pass after each update gives every sequence's clipped surrogate
   after the update; its per-task change is MT-GRPO's improvement signal I_k.

**Rows stay on their devices.** On a mesh the rows ``[N, ...]`` are split over ``data*fsdp`` in
``D = StepConfig.row_shards`` contiguous blocks. Every split keeps each device on its own rows:
the shuffle permutes rows within each block only, and a split into ``parts`` (minibatches,
micro-batches, the old-log-prob forward's chunks) gives part ``i`` the ``i``-th slice of every
block::

    [N, ...] -> [D, parts, N/(D*parts), ...] -> swap axes 0, 1 -> [parts, N/parts, ...]

so every scan iteration works on ``N/(D*parts)`` rows on each device and no device gathers
another's. With ``D = 1`` part ``i`` is the ``i``-th contiguous block of rows. The minibatches
(hence the updates) depend on ``D`` when ``num_minibatches > 1``; micro-batches do not change the
update (exact accumulation).

**Old log-probs.** With ``recompute_old_logp`` the old policy is the trainer's own at the start
of the step. A separate forward pass over the batch computes it, except when that pass is
provably the loss pass itself: one epoch, one minibatch and no improvement signal
(:attr:`StepConfig.old_logp_forward` is False). Every micro-batch is then differentiated at the
step's starting parameters, so its old log-probs are its current ones, stop-gradiented (ratio 1
in value, the same loss and gradient), and the step runs one forward and one backward. Without
``recompute_old_logp`` the sampler's log-probs are the old policy. The gap between the two,
``logp/sampler_trainer_gap`` (masked mean of ``|trainer - sampler|``), comes from the separate
forward when there is one, otherwise from the first update's own forward pass at the starting
parameters: the whole batch with one minibatch, the first minibatch's rows with several.

Everything model-specific comes through ``ModelParts`` (split NNX model) and the model's
``__call__(tokens, mask=..., return_hidden=True)`` and ``unembedding()``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import optax

from jaxgrpo.core import losses as core_losses
from jaxgrpo.core import weighting
from jaxgrpo.core.logprobs import chunked_token_logprobs
from jaxgrpo.core.masked import masked_mean
from jaxgrpo.sharding import BATCH_AXES
from jaxgrpo.train import rng as rng_lib
from jaxgrpo.train.batch import TrainBatch
from jaxgrpo.train.state import ModelParts, TrainState


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static knobs of the train step (hashable; changing one recompiles)."""

    epochs: int = 1  # mu: passes over the rollout batch
    num_minibatches: int = 1  # optimiser updates per epoch
    microbatches: int = 1  # gradient-accumulation chunks per minibatch (memory only; exact)
    # row blocks of the batch (data*fsdp devices); None: from batch_sharding's mesh, 1 without
    row_shards: int | None = None
    # old log-probs from the trainer at the start of the step, not the sampler (see the module
    # docstring: no extra forward pass with one epoch, one minibatch and no improvement signal)
    recompute_old_logp: bool = True
    # logit rows (sequences x positions, global) per chunk of chunked_token_logprobs: a chunk
    # covers max(1, logprob_chunk // rows) positions of every row of a micro-batch
    logprob_chunk: int = 256
    # policy_loss keyword arguments
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    kl_ratio_correction: bool = False
    agg: str = "token_mean"
    max_len: int | None = None
    ratio_level: str = "token"
    num_tasks: int = 0  # > 0: report the per-task improvement signal (MT-GRPO)
    improvement_reduce: str = "sum"  # I_k over a task's trained sequences: "sum" or "mean"
    shuffle: bool = True

    @property
    def old_logp_forward(self) -> bool:
        """True when the step runs a separate forward pass for the old log-probs: recomputed,
        and not provably the loss pass's own (more than one epoch or minibatch, or the
        improvement signal, whose surrogates need them)."""
        redundant = self.epochs == 1 and self.num_minibatches == 1 and self.num_tasks == 0
        return self.recompute_old_logp and not redundant

    @property
    def forward_passes(self) -> int:
        """Forward-pass equivalents over the whole batch per step, for model-FLOP accounting
        (``2 N`` FLOPs per token each, ``N`` the matmul parameters): 3 per epoch (forward and
        backward), 1 for the separate old-log-prob forward, 1 for the reference forward (KL), 2
        per epoch for the improvement signal's surrogates before and after each update."""
        return (3 * self.epochs + int(self.old_logp_forward) + int(self.kl_coef > 0)
                + (2 * self.epochs if self.num_tasks > 0 else 0))

    def loss_kwargs(self) -> dict:
        kw = dict(
            clip_low=self.clip_low,
            clip_high=self.clip_high,
            dual_clip=self.dual_clip,
            kl_coef=self.kl_coef,
            kl_estimator=self.kl_estimator,
            kl_ratio_correction=self.kl_ratio_correction,
            agg=self.agg,
            ratio_level=self.ratio_level,
        )
        if self.agg == "seq_mean_token_sum_norm":
            kw["max_len"] = self.max_len
        return kw


def token_logprobs_fn(parts: ModelParts, chunk: int):
    """``(params, tokens [n, T], attn [n, T]) -> (logp [n, T-1], entropy [n, T-1])``."""

    def fn(params, tokens, attn):
        model = parts.merge(params)
        # The forward runs over all T positions and drops the last one's hidden state: causal
        # attention makes positions 0..T-2 the same either way, and T (a prompt bucket plus the
        # response budget) is what the attention kernels' block sizes divide, T-1 is not.
        hidden = model(tokens, mask=attn, return_hidden=True)[:, :-1]
        return chunked_token_logprobs(
            hidden, model.unembedding(), tokens[:, 1:], chunk_size=chunk, return_entropy=True
        )

    return fn


def _reduce_terms(stacked: dict) -> dict:
    """Combines aux terms stacked over micro-batches ``[M, ...]`` as
    :func:`jaxgrpo.core.losses.accumulate_terms` does (sums, except the ratio extremes)."""
    zero = jnp.zeros((), jnp.float32)  # num and den are accumulated by the step itself
    m = jax.tree.leaves(stacked)[0].shape[0]
    parts = [(zero, zero, {k: v[i] for k, v in stacked.items()}) for i in range(m)]
    return functools.reduce(core_losses.accumulate_terms, parts)[2]


def _split(tree, parts: int, shards: int = 1):
    """``[N, ...] -> [parts, N/parts, ...]``; part ``i`` holds the ``i``-th slice of each of the
    ``shards`` contiguous row blocks, in block order (``shards=1``: the ``i``-th block of rows).

    ``[N] -> [shards, parts, N/(shards*parts)] -> [parts, shards, N/(shards*parts)] ->
    [parts, N/parts]``: with the rows split over ``shards`` devices every part is local.
    """

    def one(a):
        r = a.shape[0] // (shards * parts)
        a = a.reshape((shards, parts, r) + a.shape[1:])
        return jnp.swapaxes(a, 0, 1).reshape((parts, shards * r) + a.shape[3:])

    return jax.tree.map(one, tree)


def _unsplit(tree, shards: int = 1):
    """The inverse of :func:`_split`: ``[parts, N/parts, ...] -> [N, ...]``."""

    def one(a):
        parts, m = a.shape[:2]
        a = a.reshape((parts, shards, m // shards) + a.shape[2:])
        return jnp.swapaxes(a, 0, 1).reshape((parts * m,) + a.shape[3:])

    return jax.tree.map(one, tree)


def _permute_within(tree, perm):
    """Rows permuted within each of ``S`` contiguous blocks: ``perm`` is int ``[S, N/S]``,
    row ``j`` of block ``s`` becomes row ``perm[s, j]`` of that block."""
    s, b = perm.shape

    def one(a):
        blocks = a.reshape((s, b) + a.shape[1:])
        return jax.vmap(lambda x, p: x[p])(blocks, perm).reshape(a.shape)

    return jax.tree.map(one, tree)


def _mesh_row_shards(batch_sharding) -> int:
    first = jax.tree.leaves(batch_sharding,
                            is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))[0]
    mesh = getattr(first, "mesh", None)
    if mesh is None:
        return 1
    return math.prod(mesh.shape.get(a, 1) for a in BATCH_AXES)


def make_train_step(parts: ModelParts, tx: optax.GradientTransformation, cfg: StepConfig, *,
                    state_sharding=None, batch_sharding=None):
    """Builds the jitted, donated ``train_step(state, batch) -> (state, metrics)``.

    ``metrics`` is a flat dict of scalars (means over minibatches), plus
    ``"task_improvement"`` ``[epochs*num_minibatches, num_tasks]`` when ``cfg.num_tasks > 0``.

    ``state_sharding`` (a TrainState of ``NamedSharding``s, see
    :func:`jaxgrpo.sharding.state_shardings`) and ``batch_sharding`` (a TrainBatch of them, or
    one sharding for every field) pin the step's in- and out-shardings; the new state keeps the
    state's layout and the metrics come back replicated. Without them the step follows its inputs.

    ``cfg.row_shards`` (the number of row blocks, see the module docstring) defaults to
    ``data*fsdp`` of ``batch_sharding``'s mesh (1 without shardings); an explicit value must
    match it. ``N`` must divide by ``row_shards * num_minibatches * microbatches``.
    """
    logp_fn = token_logprobs_fn(parts, cfg.logprob_chunk)
    inline_old = cfg.recompute_old_logp and not cfg.old_logp_forward
    if cfg.row_shards is not None and (isinstance(cfg.row_shards, bool)
                                       or not isinstance(cfg.row_shards, int)
                                       or cfg.row_shards < 1):
        raise ValueError(f"cfg.row_shards must be a positive int or None, got {cfg.row_shards!r}")
    mesh_shards = 1 if batch_sharding is None else _mesh_row_shards(batch_sharding)
    if cfg.row_shards is not None and batch_sharding is not None and cfg.row_shards != mesh_shards:
        raise ValueError(f"cfg.row_shards={cfg.row_shards} but batch_sharding splits the rows over "
                         f"data*fsdp={mesh_shards} devices: set row_shards={mesh_shards} (or None)")
    shards = cfg.row_shards if cfg.row_shards is not None else mesh_shards

    def batched_logp(params, batch: TrainBatch):
        # Forward over the whole batch in micro-batch chunks (bounded memory), no gradient.
        chunks = cfg.microbatches * cfg.num_minibatches
        toks, attn = _split((batch.tokens, batch.attn_mask), chunks, shards)
        lp, _ = jax.lax.map(lambda xs: logp_fn(params, *xs), (toks, attn))
        return jax.lax.stop_gradient(_unsplit(lp, shards))

    def loss_terms(params, mb: TrainBatch, old_logp, ref_logp, den_total, tok_total, ent_coef):
        """Micro-batch share of the minibatch loss: num_i / den_total - c * entropy_sum_i / tokens.

        Also returns ``(sum, count)`` of ``|logp - sampler logp|`` over the loss mask: the
        sampler-trainer gap of these rows when ``logp`` is at the step's starting parameters.
        """
        logp, ent = logp_fn(params, mb.tokens, mb.attn_mask)
        if inline_old:  # the old policy is this pass at the starting parameters
            old_logp = jax.lax.stop_gradient(logp)
        num, _, aux = core_losses.policy_loss_terms(
            logp,
            old_logp,
            mb.advantages,
            mb.loss_mask,
            ref_logp=ref_logp if cfg.kl_coef else None,
            token_weights=mb.token_weights if cfg.agg == "block_mean" else None,
            sequence_weights=mb.sequence_weights,
            entropy=ent,
            **cfg.loss_kwargs(),
        )
        ent_sum = jnp.sum(jnp.where(mb.loss_mask, ent, 0.0))
        loss = num / den_total - ent_coef * ent_sum / tok_total
        diff = jnp.abs(jax.lax.stop_gradient(logp) - mb.old_logp)
        gap = (jnp.sum(jnp.where(mb.loss_mask, diff, 0.0)),
               jnp.sum(mb.loss_mask.astype(jnp.float32)))
        return loss, (aux, gap)

    def denominator(mb: TrainBatch):
        """The loss denominator of a whole minibatch; it does not depend on the parameters."""
        zeros = jnp.zeros(mb.loss_mask.shape, jnp.float32)
        _, den, _ = core_losses.policy_loss_terms(
            zeros, zeros, mb.advantages, mb.loss_mask,
            token_weights=mb.token_weights if cfg.agg == "block_mean" else None,
            sequence_weights=mb.sequence_weights,
            **cfg.loss_kwargs(),
        )
        return den

    def seq_surrogate(params, mb: TrainBatch, old_logp):
        """Per-sequence clipped surrogate loss (token mean), for the improvement signal."""
        logp, _ = logp_fn(params, mb.tokens, mb.attn_mask)
        one = lambda lp, olp, a, m: core_losses.policy_loss(
            lp[None], olp[None], a[None], m[None],
            clip_low=cfg.clip_low, clip_high=cfg.clip_high, agg="seq_mean_token_mean",
        )[0]
        return jax.vmap(one)(logp, old_logp, mb.advantages, mb.loss_mask)

    def minibatch_update(carry, xs):
        params, opt_state, nonfinite, ent_coef = carry
        mb, old_logp, ref_logp = xs
        den = denominator(mb)
        den = jnp.where(den > 0, den, 1.0)  # an empty minibatch has zero loss and zero gradient
        tok = jnp.maximum(jnp.sum(mb.loss_mask.astype(jnp.float32)), 1.0)
        micro = _split((mb, old_logp, ref_logp), cfg.microbatches, shards)
        grad_fn = jax.value_and_grad(loss_terms, has_aux=True)

        def accumulate(acc, m):
            (loss_i, (aux, gap)), g = grad_fn(params, *m, den, tok, ent_coef)
            return (jax.tree.map(jnp.add, acc[0], g), acc[1] + loss_i), (aux, gap)

        zeros = jax.tree.map(jnp.zeros_like, params)
        (grads, loss), (auxs, gaps) = jax.lax.scan(accumulate, (zeros, jnp.zeros(())), micro)
        gnorm = optax.tree.norm(grads)
        updates, new_opt = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        new_params, new_opt = keep(new_params, params), keep(new_opt, opt_state)
        metrics = {f"loss/{k}": v for k, v in core_losses.aux_from_terms(_reduce_terms(auxs)).items()}
        metrics.update({"loss/total": loss, "grad/global_norm": gnorm, "update/skipped": 1.0 - ok})
        metrics["gap_terms"] = jnp.stack([jnp.sum(gaps[0]), jnp.sum(gaps[1])])
        out = (metrics,)
        if cfg.num_tasks > 0:
            # I_k: change of the task's surrogate objective (minus the loss) across this update,
            # summed or averaged over the task's trained sequences of the minibatch.
            delta = weighting.task_improvement(
                -seq_surrogate(params, mb, old_logp), -seq_surrogate(new_params, mb, old_logp),
                mb.task_ids, cfg.num_tasks, clip=None, reduce=cfg.improvement_reduce,
                valid=jnp.any(mb.loss_mask, axis=-1),
            )
            out = (metrics, delta)
        return (new_params, new_opt, nonfinite + (1 - ok.astype(jnp.int32)), ent_coef), out

    def train_step(state: TrainState, batch: TrainBatch):
        n = batch.tokens.shape[0]
        if n % (shards * cfg.num_minibatches * cfg.microbatches):
            raise ValueError(
                f"batch rows N={n} must divide by row_shards*num_minibatches*microbatches="
                f"{shards}*{cfg.num_minibatches}*{cfg.microbatches}"
            )
        base = jax.random.wrap_key_data(state.rng)
        if cfg.old_logp_forward:
            old_logp = batched_logp(state.params, batch)
            gap = masked_mean(jnp.abs(old_logp - batch.old_logp), batch.loss_mask)
        else:  # the sampler's (recompute off), or a placeholder the loss pass replaces
            old_logp, gap = batch.old_logp, None
        if cfg.kl_coef and state.ref_params is None:
            raise ValueError("kl_coef > 0 needs a reference policy: build the state with_ref=True")
        ref_logp = batched_logp(state.ref_params, batch) if cfg.kl_coef else jnp.zeros_like(old_logp)
        rows = (batch, old_logp, ref_logp)
        epochs = []
        for e in range(cfg.epochs):
            if cfg.shuffle:  # rows permuted within each device's block only
                keys = jax.random.split(rng_lib.shuffle_key(base, state.step, e), shards)
                perm = jax.vmap(lambda k: jax.random.permutation(k, n // shards))(keys)
                epochs.append(_split(_permute_within(rows, perm), cfg.num_minibatches, shards))
            else:
                epochs.append(_split(rows, cfg.num_minibatches, shards))
        xs = jax.tree.map(lambda *a: jnp.concatenate(a), *epochs)  # [epochs*num_mb, N/num_mb]
        carry = (state.params, state.opt_state, jnp.zeros((), jnp.int32), state.entropy_coef)
        (params, opt_state, skipped, _), outs = jax.lax.scan(minibatch_update, carry, xs)
        gap_terms = outs[0].pop("gap_terms")[0]  # the first update: the starting parameters
        metrics = {k: jnp.mean(v) for k, v in outs[0].items()}
        if gap is None:
            gap = gap_terms[0] / jnp.maximum(gap_terms[1], 1.0)
        metrics["logp/sampler_trainer_gap"] = gap
        metrics["update/skipped"] = skipped.astype(jnp.float32)
        if cfg.num_tasks > 0:
            metrics["task_improvement"] = outs[1]
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            nonfinite=state.nonfinite + skipped,
        )
        return new_state, metrics

    if state_sharding is None and batch_sharding is None:
        return jax.jit(train_step, donate_argnums=(0,))
    if state_sharding is None or batch_sharding is None:
        raise ValueError("state_sharding and batch_sharding must be given together")
    first = jax.tree.leaves(state_sharding,
                            is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))[0]
    if not isinstance(first, jax.sharding.NamedSharding):
        raise TypeError(f"state_sharding must hold NamedShardings, got {type(first).__name__}")
    if any(t == jax.sharding.AxisType.Explicit for t in first.mesh.axis_types):
        raise ValueError("state_sharding: the sharded train step needs a mesh with Auto axes "
                         "(XLA propagates the shardings through its scans); build it with "
                         "jaxgrpo.sharding.make_mesh(..., axis_types='auto')")
    metrics_sharding = jax.sharding.NamedSharding(first.mesh, jax.sharding.PartitionSpec())
    return jax.jit(train_step, donate_argnums=(0,), in_shardings=(state_sharding, batch_sharding),
                   out_shardings=(state_sharding, metrics_sharding))



