"""The optimiser step on MT-GRPO's task logits ``xi`` (z = softmax(xi)), built on optax.

The gradient comes from :mod:`jaxgrpo.core.weighting` (``iwu_gradient``), which
returns ``dL/dxi`` of a quantity to *minimise*; optax descends on it, so it is passed unchanged.

Optimiser kinds (``TASK_WEIGHT_OPTIMIZERS``; MT-GRPO, arXiv 2602.05547, Subroutine 1, and the
released code):

* ``"adam_l2"`` (default, the released code): torch ``Adam([w], lr, weight_decay=gamma)``, i.e.
  *coupled* L2: the decay ``gamma * xi`` is added to the gradient before the Adam moments;
  bias-corrected moments, betas (0.9, 0.999), eps 1e-8 added to ``sqrt(v_hat)``. Written as
  ``chain(add_decayed_weights(gamma), scale_by_adam(b1, b2, eps), scale(-lr))``.
* ``"adamw"`` (the paper's wording): decoupled decay,
  ``xi <- xi - lr * (adam(g) + gamma * xi)`` (``optax.adamw``, same as torch ``AdamW``).
* ``"sgd"``: the paper's literal ``xi <- xi - beta * (g + eta * xi)`` (Subroutine 1 with
  ``eta = 0``, Subroutine 2 with ``eta > 0``): ``chain(add_decayed_weights(eta), scale(-lr))``.

Defaults follow the code: lr 0.025, weight decay 1e-5 (3 tasks; 1e-4 for 9 tasks), logits
initialised to 0. The code takes one step per PPO minibatch (4 per training step) with that
minibatch's improvement; the paper takes one per training step.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from jaxgrpo.core import modes, weighting

TASK_WEIGHT_OPTIMIZERS = modes.TASK_WEIGHT_OPTIMIZERS


def _check_hparam(name: str, value, *, positive: bool = False, below_one: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number; got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or v < 0 or (positive and v == 0) or (below_one and v >= 1):
        need = "in [0, 1)" if below_one else ("> 0" if positive else ">= 0")
        raise ValueError(f"{name} must be finite and {need}; got {value}")
    return v


def make_task_weight_optimizer(
    kind: str = "adam_l2",
    lr: float = 0.025,
    weight_decay: float = 1e-5,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """Build the optax optimiser for the task logits.

    Args:
      kind: ``"adam_l2"`` (code: Adam with coupled L2), ``"adamw"`` (paper: decoupled decay)
        or ``"sgd"`` (plain ``xi - lr (g + weight_decay xi)``).
      lr: step size ``beta`` (paper and code: 0.025).
      weight_decay: ``gamma`` / ``eta`` (code: 1e-5 for 3 tasks, 1e-4 for 9 tasks).
      b1, b2, eps: Adam parameters (ignored by ``"sgd"``).

    Returns:
      An ``optax.GradientTransformation`` whose ``update`` needs ``params`` (the logits).
    """
    if kind not in TASK_WEIGHT_OPTIMIZERS:
        raise ValueError(f"kind must be one of {TASK_WEIGHT_OPTIMIZERS}; got {kind!r}")
    lr = _check_hparam("lr", lr, positive=True)
    weight_decay = _check_hparam("weight_decay", weight_decay)
    b1 = _check_hparam("b1", b1, below_one=True)
    b2 = _check_hparam("b2", b2, below_one=True)
    eps = _check_hparam("eps", eps)
    if kind == "adam_l2":
        return optax.chain(
            optax.add_decayed_weights(weight_decay),
            optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
            optax.scale(-lr),
        )
    if kind == "adamw":
        return optax.adamw(learning_rate=lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.scale(-lr))


def init_task_weights(
    num_tasks: int, tx: optax.GradientTransformation
) -> tuple[jax.Array, optax.OptState]:
    """Logits ``xi_0 = 0`` (uniform ``z``, as paper and code) ``[K]`` and ``tx``'s state."""
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"num_tasks must be an int >= 1; got {num_tasks!r}")
    logits = jnp.zeros((num_tasks,), jnp.float32)
    return logits, tx.init(logits)


def task_weight_step(
    logits: jax.Array,
    opt_state: optax.OptState,
    grad: jax.Array,
    tx: optax.GradientTransformation,
) -> tuple[jax.Array, optax.OptState]:
    """One optimiser step on the logits: descend on ``grad = dL/dxi``.

    Pure and jit-able (close over ``tx``, e.g. ``jax.jit(partial(task_weight_step, tx=tx))``).

    Args:
      logits: ``xi`` ``[K]``.
      opt_state: ``tx``'s state for ``logits``.
      grad: ``[K]`` from ``weighting.iwu_gradient``, unchanged.
      tx: from :func:`make_task_weight_optimizer`.

    Returns:
      ``(new_logits, new_opt_state)``; ``softmax(new_logits)`` are the new task weights.
    """
    xi = jnp.asarray(logits)
    g = jnp.asarray(grad)
    if g.shape != xi.shape:
        raise ValueError(f"grad must have the shape of logits {xi.shape}; got {g.shape}")
    updates, new_state = tx.update(g.astype(xi.dtype), opt_state, xi)
    return optax.apply_updates(xi, updates), new_state


def iwu_step(
    logits: jax.Array,
    opt_state: optax.OptState,
    accuracy: jax.Array,
    improvement: jax.Array,
    tx: optax.GradientTransformation,
    *,
    lam: float,
) -> tuple[jax.Array, optax.OptState]:
    """MT-GRPO Subroutine 1 through ``tx``: ``g = iwu_gradient(xi, J, I, lam)``, then a step."""
    grad = weighting.iwu_gradient(logits, accuracy, improvement, lam=lam)
    return task_weight_step(logits, opt_state, grad, tx)


def iwu_minibatch_steps(
    logits: jax.Array,
    opt_state: optax.OptState,
    accuracy: jax.Array,
    improvements: jax.Array,
    tx: optax.GradientTransformation,
    *,
    lam: float,
) -> tuple[jax.Array, optax.OptState, jax.Array]:
    """The released code's schedule: one IWU step per PPO minibatch, in order (``lax.scan``).

    Minibatch ``m`` uses its own (clipped) improvement ``improvements[m]`` and the same
    accuracy EMA ``J``. For the paper's schedule (one step per training step) sum the
    minibatches' *unclipped* improvements, clip the sum, and call :func:`iwu_step` once.

    Args:
      logits: ``xi`` ``[K]``.
      opt_state: ``tx``'s state.
      accuracy: ``J`` ``[K]``.
      improvements: ``[M, K]``, one row per minibatch (``weighting.task_improvement``).
      tx: from :func:`make_task_weight_optimizer`.
      lam: ``lambda``.

    Returns:
      ``(logits, opt_state, z_history [M, K])`` with the weights after each minibatch step.
    """
    imp = jnp.asarray(improvements)
    xi = jnp.asarray(logits)
    if imp.ndim != 2 or imp.shape[1:] != xi.shape:
        raise ValueError(
            f"improvements must have shape [M, K] with K = {xi.shape[-1]}; got {imp.shape}"
        )

    def body(carry, imp_m):
        x, st = carry
        x, st = iwu_step(x, st, accuracy, imp_m, tx, lam=lam)
        return (x, st), weighting.task_weights(x)

    (xi, opt_state), z_hist = jax.lax.scan(body, (xi, opt_state), imp.astype(xi.dtype))
    return xi, opt_state, z_hist
