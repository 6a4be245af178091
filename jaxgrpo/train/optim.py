"""The policy optimiser from config: AdamW with warm-up, decay and global-norm clipping."""

from __future__ import annotations

import optax

from jaxgrpo.config import LRSchedule, OptimConfig


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up to ``cfg.lr`` over ``warmup_steps``, then constant, linear or cosine decay
    to ``cfg.lr * min_lr_ratio`` at ``total_steps``."""
    warm = max(int(cfg.warmup_steps), 0)
    rest = max(int(total_steps) - warm, 1)
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == LRSchedule.CONSTANT:
        after = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == LRSchedule.LINEAR:
        after = optax.linear_schedule(cfg.lr, end, rest)
    else:
        after = optax.cosine_decay_schedule(cfg.lr, rest, alpha=cfg.min_lr_ratio)
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warm), after], [warm])


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """``clip_by_global_norm`` (if set) then AdamW on the schedule above.

    ``total_steps`` counts optimiser updates (steps x epochs x minibatches).
    """
    adamw = optax.adamw(
        learning_rate_schedule(cfg, total_steps),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
    )
    if cfg.clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
