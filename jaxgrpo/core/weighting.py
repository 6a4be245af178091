"""Multi-task weighting for MT-GRPO (Ramesh et al., arXiv 2602.05547): pure, jit- and vmap-able.

The task weights are ``z = softmax(xi)`` over ``K`` task logits ``xi``. The Improvement-aware
Weight Update (IWU, paper Subroutine 1) moves ``xi`` against the gradient of

    L(xi) = sum_k z_k(xi) * s_k,        s_k = I_k + lam * J_k,

    dL/dxi_k = g_k = z_k * (s_k - sum_j z_j * s_j)        (softmax Jacobian, paper Eqs. 7/29)

Sign convention (one convention for the whole package): every ``*_gradient`` function here
returns ``dL/dxi``, the gradient of a quantity to be *minimised*. Hand it unchanged to an optax
optimiser (``jaxgrpo.train.task_weights``), which descends: ``xi <- xi - lr * g`` for SGD, as in
the paper (``xi_{t+1} = xi_t - beta * g_t``) and in the released code (torch ``Adam.step`` on
the autograd gradient of ``<softmax(w), s>``). Descent lowers the weight of tasks whose signal
``s_k`` is above the weighted average, so a task gains weight when it is both under-performing
(low ``J_k``) and under-improving (low ``I_k``).

Signals, as the authors' released code computes them (where it departs from the paper's text):

* ``J_k`` (:func:`task_accuracy` then :func:`ema_update`, decay 0.5, started at 0): per-task
  rate of *correct* training rollouts (reward >= 1 - 1e-6; format-only credit does not count),
  per prompt then averaged over the task's prompts, before zero-gradient filtering.
* ``I_k`` (:func:`task_improvement`): per-task change of the clipped surrogate objective on one
  minibatch across that minibatch's optimiser step, summed over the task's sequences (code) or
  averaged, then clipped to ``[-c, c]`` (c = 0.1 or 0.2). Tasks without samples get 0.

Shapes: ``K`` tasks, ``N`` sequences. Functions taking ``[K]`` arrays also accept ``[..., K]``.

Edges. Task ids outside ``[0, K)`` are dropped (they count for no task and get weight 0); they
cannot be refused at trace time. The scalar hyper-parameters (``lam``, ``eta``, ``decay``,
``clip``, ``threshold``) may be Python numbers, range-checked at trace time, or traced scalars,
unchecked (a new value does not recompile); ``num_tasks`` and the modes are static. NaN values
are not hidden: a NaN reward counts as incorrect in :func:`task_accuracy` (``NaN >= t`` is
false); a NaN value or surrogate of a valid entry makes its task's :func:`per_task_mean` or
:func:`task_improvement` NaN (clipping keeps NaN), and the other tasks are unaffected.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrpo.core import modes
from jaxgrpo.core.masked import safe_div

REDUCTIONS = modes.IMPROVEMENT_REDUCTIONS


# --------------------------------------------------------------------------------------------
# validation helpers (trace time)


def _check_same_trailing(name_a: str, a: jax.Array, name_b: str, b: jax.Array) -> None:
    if a.ndim < 1:
        raise ValueError(f"{name_a} must have a trailing task axis [..., K]; got a scalar")
    if a.shape != b.shape:
        raise ValueError(
            f"{name_b} must have the same shape as {name_a} {a.shape}; got {b.shape}"
        )


def _check_float(name: str, value, *, low=None, high=None, high_open=False) -> None:
    """Validate a Python/NumPy scalar hyper-parameter; traced values pass through unchecked."""
    if isinstance(value, jax.Array):  # traced or device value: checked by the caller, if at all
        return
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number; got {type(value).__name__}") from None
    if not np.isfinite(v):
        raise ValueError(f"{name} must be finite; got {v}")
    if low is not None and v < low:
        raise ValueError(f"{name} must be >= {low}; got {v}")
    if high is not None and (v >= high if high_open else v > high):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}; got {v}")


def _check_num_tasks(num_tasks) -> int:
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, (int, np.integer)):
        raise TypeError(f"num_tasks must be a Python int (static); got {type(num_tasks).__name__}")
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1; got {num_tasks}")
    return int(num_tasks)


def _check_task_ids(task_ids: jax.Array, n: int, what: str) -> None:
    if task_ids.shape != (n,):
        raise ValueError(f"task_ids must have shape [{what}] = ({n},); got {task_ids.shape}")
    if not jnp.issubdtype(task_ids.dtype, jnp.integer):
        raise TypeError(f"task_ids must be an integer array; got dtype {task_ids.dtype}")


def _as_float(x) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    return x


# --------------------------------------------------------------------------------------------
# the weight update


def task_weights(task_logits: jax.Array) -> jax.Array:
    """``z = softmax(xi)`` over the last axis: the task sampling distribution. ``[..., K]``."""
    return jax.nn.softmax(_as_float(task_logits), axis=-1)


def softmax_objective_gradient(task_logits: jax.Array, signal: jax.Array) -> jax.Array:
    """Gradient in ``xi`` of ``L = sum_k softmax(xi)_k * s_k``: ``g_k = z_k (s_k - <z, s>)``.

    The common core of every update here. ``sum_k g_k = 0`` and ``g = 0`` when ``s`` is constant.

    Args:
      task_logits: ``xi`` ``[..., K]``.
      signal: ``s`` ``[..., K]``, treated as a constant (no gradient flows into it).

    Returns:
      ``g`` ``[..., K]`` (float).
    """
    xi = _as_float(task_logits)
    s = jax.lax.stop_gradient(_as_float(signal)).astype(xi.dtype)
    _check_same_trailing("task_logits", xi, "signal", s)
    z = jax.nn.softmax(xi, axis=-1)
    # s_k - <z, s> written as sum_j z_j (s_k - s_j) (equal since sum_j z_j = 1): exactly 0 when
    # s is constant, where the direct form leaves ~1e-9 of rounding that Adam would amplify to a
    # full-size step. O(K^2), negligible for task counts.
    diff = s[..., :, None] - s[..., None, :]
    centred = jnp.sum(diff * z[..., None, :], axis=-1)
    return z * centred


def iwu_signal(accuracy: jax.Array, improvement: jax.Array, *, lam) -> jax.Array:
    """The IWU signal ``s_k = I_k + lam * J_k`` (paper Eq. 40; code ``lambda_bias_type='add'``)."""
    j = _as_float(accuracy)
    i = _as_float(improvement).astype(j.dtype)
    _check_same_trailing("accuracy", j, "improvement", i)
    _check_float("lam", lam)
    return i + lam * j


def iwu_gradient(
    task_logits: jax.Array, accuracy: jax.Array, improvement: jax.Array, *, lam
) -> jax.Array:
    """IWU gradient (MT-GRPO Subroutine 1): ``g_k = z_k (s_k - sum_j z_j s_j)``.

    ``z = softmax(xi)``, ``s_k = I_k + lam * J_k``. ``g = dL/dxi`` for ``L = <z, s>``; descend
    on it (``xi <- xi - beta * g``, or pass it as the gradient to an optax optimiser). Larger
    ``lam`` approaches the strict worst-task update; smaller favours slow-improving tasks.

    Args:
      task_logits: ``xi`` ``[..., K]``; the code starts at 0 (uniform ``z``).
      accuracy: ``J`` ``[..., K]``, per-task rollout accuracy (EMA, see :func:`ema_update`).
      improvement: ``I`` ``[..., K]``, per-task surrogate improvement (:func:`task_improvement`).
      lam: ``lambda`` >= 0 (paper: 0.2/0.25 for 3 tasks, 0.1-1.2 for 9 tasks).

    Returns:
      ``g`` ``[..., K]``, summing to 0 along the task axis.
    """
    xi = _as_float(task_logits)
    _check_same_trailing("task_logits", xi, "accuracy", jnp.asarray(accuracy))
    _check_float("lam", lam, low=0.0)
    return softmax_objective_gradient(xi, iwu_signal(accuracy, improvement, lam=lam))


# --------------------------------------------------------------------------------------------
# the signals


def per_task_mean(
    values: jax.Array, task_ids: jax.Array, num_tasks: int, valid: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Mean of ``values`` over the (valid) entries of each task, with the counts.

    Args:
      values: ``[N]``.
      task_ids: ``[N]`` int in ``[0, num_tasks)``; ids outside the range are dropped.
      num_tasks: ``K`` (static Python int).
      valid: optional ``[N]`` bool/0-1 mask; invalid entries are ignored.

    Returns:
      ``(mean [K], count [K])``; ``mean`` is exactly 0 for a task with no valid entry.
    """
    k = _check_num_tasks(num_tasks)
    x = _as_float(values)
    if x.ndim != 1:
        raise ValueError(f"values must have shape [N]; got {x.shape}")
    ids = jnp.asarray(task_ids)
    _check_task_ids(ids, x.shape[0], "N")
    m = jnp.ones(x.shape, x.dtype) if valid is None else _valid_mask(valid, x)
    total = jax.ops.segment_sum(jnp.where(m > 0, x, 0) * m, ids, num_segments=k)
    count = jax.ops.segment_sum(m, ids, num_segments=k)
    return safe_div(total, count), count


def _valid_mask(valid, like: jax.Array) -> jax.Array:
    v = jnp.asarray(valid)
    if v.shape != like.shape:
        raise ValueError(f"valid must have shape {like.shape}; got {v.shape}")
    return v.astype(like.dtype)


def task_accuracy(
    rewards: jax.Array,
    task_ids: jax.Array,
    num_tasks: int,
    *,
    valid: jax.Array | None = None,
    threshold: float = 1.0 - 1e-6,
) -> tuple[jax.Array, jax.Array]:
    """Per-task correctness rate of a round of rollouts (code ``bias_metric='batch_acc'``).

    A rollout is correct when ``reward >= threshold`` (format-only credit such as 0.1 is not).
    Per prompt, the fraction of its valid rollouts that are correct; per task, the mean of that
    over the task's prompts with at least one valid rollout. Call it on the generated round
    *before* zero-gradient filtering, then smooth with :func:`ema_update`.

    Args:
      rewards: ``[P, G]``.
      task_ids: ``[P]`` int task of each prompt.
      num_tasks: ``K`` (static).
      valid: optional ``[P, G]`` mask of rollouts that exist.
      threshold: correctness threshold on the reward.

    Returns:
      ``(accuracy [K], present [K] bool)``; ``present`` marks tasks with a prompt this round.
    """
    r = _as_float(rewards)
    if r.ndim != 2:
        raise ValueError(f"rewards must have shape [P, G]; got {r.shape}")
    _check_float("threshold", threshold)
    m = jnp.ones(r.shape, r.dtype) if valid is None else _valid_mask(valid, r)
    correct = (r >= threshold).astype(r.dtype)
    n_valid = jnp.sum(m, axis=-1)
    frac = safe_div(jnp.sum(correct * m, axis=-1), n_valid)
    acc, count = per_task_mean(frac, task_ids, num_tasks, valid=n_valid > 0)
    return acc, count > 0


def ema_update(prev: jax.Array, value: jax.Array, present_mask: jax.Array, *, decay) -> jax.Array:
    """Exponential moving average per task: ``decay * prev + (1 - decay) * value`` where present.

    Tasks absent this round (``present_mask`` false) keep ``prev`` unchanged. Initialisation:
    the released code starts the accuracy EMA at 0 (``decay = 0.5``), so the first update of a
    task gives half its accuracy; to start from the first observation instead, initialise
    ``prev`` with that observation (or call with ``decay=0`` once).

    Args:
      prev: ``[..., K]`` previous EMA.
      value: ``[..., K]`` this round's value (ignored where absent, even if NaN).
      present_mask: ``[..., K]`` bool.
      decay: in ``[0, 1]``; the weight kept on ``prev``.
    """
    p = _as_float(prev)
    v = _as_float(value).astype(p.dtype)
    _check_same_trailing("prev", p, "value", v)
    present = jnp.asarray(present_mask)
    if present.shape != p.shape:
        raise ValueError(f"present_mask must have shape {p.shape}; got {present.shape}")
    _check_float("decay", decay, low=0.0, high=1.0)
    updated = decay * p + (1.0 - decay) * jnp.where(present, v, 0)
    return jnp.where(present.astype(bool), updated, p)


def task_improvement(
    surrogate_before: jax.Array,
    surrogate_after: jax.Array,
    task_ids: jax.Array,
    num_tasks: int,
    *,
    clip: float | None,
    reduce: str = "sum",
    valid: jax.Array | None = None,
) -> jax.Array:
    """Per-task improvement ``I_k`` of the clipped surrogate across one minibatch update.

    ``I_k = clip( R_{i in task k} (S_i(theta_after) - S_i(theta_before)), -c, c )`` where
    ``S_i`` is sequence ``i``'s token-mean clipped surrogate *objective*
    ``min(r A, clip(r, 1-e_lo, 1+e_hi) A)`` (higher is better; the code's loss is ``-S_i``
    and it flips the sign with ``max_rate=False``), evaluated on the same minibatch before and
    after the optimiser step, and ``R`` is a sum (code, ``average_delta=False``) or a mean.
    Tasks with no (valid) sequence get exactly 0 (not masked, as in the code). Holding
    per-sequence *losses* ``l = -S`` instead, pass ``-loss_before, -loss_after``.

    Args:
      surrogate_before: ``[N]`` per-sequence surrogate at the pre-update parameters.
      surrogate_after: ``[N]`` the same at the post-update parameters (one extra forward).
      task_ids: ``[N]`` int; ids outside ``[0, num_tasks)`` are dropped.
      num_tasks: ``K`` (static).
      clip: ``c > 0`` (code: 0.1, or 0.2 for some runs), or ``None`` for no clipping.
      reduce: ``"sum"`` (code) or ``"mean"`` over the task's sequences.
      valid: optional ``[N]`` mask; padding rows contribute nothing.

    Returns:
      ``I`` ``[K]``.
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}; got {reduce!r}")
    if clip is not None:
        _check_float("clip", clip, low=0.0)
        if not isinstance(clip, jax.Array) and float(clip) == 0.0:
            raise ValueError("clip must be > 0 (or None for no clipping); got 0")
    before = _as_float(surrogate_before)
    after = _as_float(surrogate_after).astype(before.dtype)
    if before.ndim != 1:
        raise ValueError(f"surrogate_before must have shape [N]; got {before.shape}")
    if after.shape != before.shape:
        raise ValueError(
            f"surrogate_after must have the shape of surrogate_before {before.shape}; "
            f"got {after.shape}"
        )
    # The change carries no gradient: it is a signal for the task logits only.
    delta = jax.lax.stop_gradient(after - before)
    if reduce == "sum":
        k = _check_num_tasks(num_tasks)
        ids = jnp.asarray(task_ids)
        _check_task_ids(ids, delta.shape[0], "N")
        m = jnp.ones(delta.shape, delta.dtype) if valid is None else _valid_mask(valid, delta)
        out = jax.ops.segment_sum(jnp.where(m > 0, delta, 0) * m, ids, num_segments=k)
    else:
        out, _ = per_task_mean(delta, task_ids, num_tasks, valid=valid)
    if clip is not None:
        out = jnp.clip(out, -clip, clip)
    return out
