"""Masked reductions shared by the pure core.

All functions take a boolean or 0/1 ``mask`` broadcastable to ``x`` and never produce NaN: an
empty selection reduces to 0 (mean, std) rather than 0/0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _as_float_mask(mask: jax.Array, like: jax.Array) -> jax.Array:
    return jnp.asarray(mask).astype(like.dtype)


def masked_sum(x: jax.Array, mask: jax.Array, axis=None, keepdims: bool = False) -> jax.Array:
    """Sum of ``x`` where ``mask`` is true. Masked-out entries contribute exactly 0, even if NaN."""
    m = jnp.asarray(mask).astype(bool)
    return jnp.sum(jnp.where(m, x, 0), axis=axis, keepdims=keepdims)


def masked_count(mask: jax.Array, axis=None, keepdims: bool = False, dtype=jnp.float32) -> jax.Array:
    """Number of true entries of ``mask`` along ``axis``."""
    return jnp.sum(jnp.asarray(mask).astype(dtype), axis=axis, keepdims=keepdims)


def safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """``num / den`` where ``den != 0``, else 0, with a NaN-free gradient in both branches."""
    nonzero = den != 0
    return jnp.where(nonzero, num / jnp.where(nonzero, den, 1), 0)


def masked_mean(x: jax.Array, mask: jax.Array, axis=None, keepdims: bool = False) -> jax.Array:
    """Mean of ``x`` over the true entries of ``mask``; 0 where there are none."""
    s = masked_sum(x, mask, axis=axis, keepdims=keepdims)
    n = masked_count(mask, axis=axis, keepdims=keepdims, dtype=s.dtype)
    return safe_div(s, n)


def masked_mean_std(
    x: jax.Array, mask: jax.Array, axis=None, keepdims: bool = False, ddof: int = 0
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean, standard deviation (with ``ddof``) and count over the true entries of ``mask``.

    The std is 0 where the count is at most ``ddof`` (the statistic is undefined there). A NaN
    among the selected values makes the mean and the std NaN (never a std of 0).
    """
    m = jnp.asarray(mask).astype(bool)
    mean = masked_mean(x, m, axis=axis, keepdims=True)
    n = masked_count(m, axis=axis, keepdims=True, dtype=mean.dtype)
    sq = masked_sum(jnp.square(jnp.where(m, x - mean, 0)), m, axis=axis, keepdims=True)
    var = safe_div(sq, n - ddof)
    var = jnp.where(n > ddof, var, 0)
    # sqrt has an infinite gradient at 0: route zeros through a safe branch. A NaN variance (a
    # NaN among the selected values) stays NaN rather than passing for a zero spread.
    pos = var > 0
    std = jnp.where(pos, jnp.sqrt(jnp.where(pos, var, 1)), jnp.where(jnp.isnan(var), var, 0))
    if not keepdims:
        squeeze_axis = axis if axis is not None else tuple(range(x.ndim))
        mean, std, n = (jnp.squeeze(a, axis=squeeze_axis) for a in (mean, std, n))
    return mean, std, n


def masked_all_equal(x: jax.Array, mask: jax.Array, axis=None, keepdims: bool = False) -> jax.Array:
    """True where the entries of ``x`` selected by ``mask`` along ``axis`` are all equal.

    An empty or one-element selection counts as all equal. The test is exact (``max <= min``
    over the selection), so a group of identical rewards is detected even where a mean-centred
    difference would leave float rounding error. A NaN in the selection gives False, so NaNs are
    not hidden. ``x`` must be floating point; ``mask`` must have the same rank as ``x``.
    """
    m = jnp.asarray(mask).astype(bool)
    hi = jnp.max(jnp.where(m, x, -jnp.inf), axis=axis, keepdims=keepdims)
    lo = jnp.min(jnp.where(m, x, jnp.inf), axis=axis, keepdims=keepdims)
    return hi <= lo
