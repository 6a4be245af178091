"""Clipped-surrogate policy losses for GRPO, DAPO, Dr. GRPO, GSPO and BAE, with exact accumulation.

One function computes the per-token loss and aggregates it; a second form returns the
aggregate's numerator and denominator so that micro-batches can be summed exactly.

Per token (valid tokens only; ``r`` is the importance ratio, ``A`` the advantage)::

    pg[n, t] = -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A)          (PPO / DAPO clip-higher)
    pg[n, t] = min(pg[n, t], -c A)            where A < 0, if dual_clip = c > 1 (Ye et al. 2020)
    loss[n, t] = pg[n, t] + kl_coef * kl[n, t] (* r if kl_ratio_correction)

Ratios (``ratio_level``):

* ``"token"``: ``r[n, t] = exp(logp - old_logp)``.
* ``"sequence"`` (GSPO, Zheng et al. 2025): ``s[n] = exp(mean_t(logp - old_logp))`` over the valid
  tokens of sequence n, used in GSPO-token's form ``r[n, t] = sg(s[n]) * exp(logp - sg(logp))``:
  the value is ``s[n]`` on every token, and the gradient on token t is ``sg(s[n]) * grad logp``.
  With a per-sequence advantage and ``"seq_mean_token_mean"`` this has exactly GSPO's gradient
  (``s * mean_t grad logp``); unlike plain GSPO it stays well defined with per-token advantages
  (BAE blocks), which is why we chose it.

KL to the reference (``d = ref_logp - logp``): ``"k1"`` is ``logp - ref_logp``, ``"k2"`` is
``0.5 (logp - ref_logp)^2``, ``"k3"`` is ``exp(d) - d - 1`` (Schulman's low-variance estimator).
``kl_ratio_correction=True`` multiplies the per-token KL by the ratio ``r`` *with* its gradient
(no stop-gradient), exactly as TRL 1.16's ``use_bias_correction_kl`` multiplies by ``coef_1``.

Aggregation (``agg``; ``w[n]`` = ``sequence_weights``, default 1; ``m`` = mask; ``N`` = rows):

===========================  ==========================================  ===================
mode                         numerator                                   denominator
===========================  ==========================================  ===================
``token_mean`` (DAPO)        ``sum_{n,t} w[n] m loss``                   ``sum_{n,t} m``
``seq_mean_token_mean``      ``sum_n w[n] sum_t m loss / sum_t m``       ``N``
``seq_mean_token_sum_norm``  ``sum_n w[n] sum_t m loss / max_len``       ``N``
``block_mean`` (BAE)         ``sum_n w[n] sum_t m token_weights loss``   ``N``
===========================  ==========================================  ===================

Sequence weights enter the numerator only, so they act as loss weights (MT-GRPO task weights,
or 0 to drop a row) and never renormalise. The sequence modes divide by all ``N`` rows, empty
rows included, which is TRL 1.16's ``grpo`` (``.mean()`` over rows) and ``dr_grpo``
(``N * max_completion_length``) convention; ``token_mean`` is TRL's ``dapo`` with
``num_items_in_batch`` the number of valid tokens. ``max_len`` defaults to ``T`` (the padded
length); pass the configured maximum completion length to match Dr. GRPO / TRL when the batch is
padded shorter than that (the other modes accept ``max_len`` and ignore it). Every denominator
is additive over rows, so summing ``policy_loss_terms`` over micro-batches and dividing once
reproduces the full-batch loss and gradient exactly.

Masked-out positions are removed with ``where`` before any arithmetic, so NaN or inf there never
reaches the loss or its gradient (the gradient there is exactly 0).

Shapes: ``logp, old_logp, ref_logp, mask, token_weights, entropy: [N, T]``, ``advantages: [N]``
or ``[N, T]``, ``sequence_weights: [N]``.
"""

from __future__ import annotations

from collections.abc import Mapping

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxgrpo.core import modes
from jaxgrpo.core.masked import safe_div

AGG_MODES = modes.AGGREGATIONS
KL_ESTIMATORS = modes.KL_ESTIMATORS
RATIO_LEVELS = ("token", "sequence")

# Aux terms reduced by min / max instead of a sum when accumulating micro-batches.
_MIN_TERMS = ("ratio_min",)
_MAX_TERMS = ("ratio_max",)


def _check_float(name: str, x, ndim: int | tuple[int, ...], n: int | None = None, t=None):
    x = jnp.asarray(x)
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    chex.assert_rank(x, set(ndims), custom_message=f"{name} must have rank "
                     f"{' or '.join(map(str, ndims))}", exception_type=ValueError)
    chex.assert_type(x, float, custom_message=f"{name} must be floating point",
                     exception_type=TypeError)
    if n is not None and x.shape[0] != n:
        raise ValueError(f"{name} has {x.shape[0]} rows, expected N={n} (like logp)")
    if t is not None and x.ndim == 2 and x.shape[1] != t:
        raise ValueError(f"{name} has {x.shape[1]} tokens, expected T={t} (like logp)")
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _traced(x) -> bool:
    """True for a value only known at run time (an argument of an enclosing ``jax.jit``)."""
    return isinstance(x, jax.core.Tracer)


def _k3(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    d = ref_logp - logp
    return jnp.exp(d) - d - 1.0


# One function per registered KL estimator (``jaxgrpo.core.modes.KL_ESTIMATORS``).
_KL = {
    "k1": lambda logp, ref_logp: logp - ref_logp,
    "k2": lambda logp, ref_logp: 0.5 * jnp.square(logp - ref_logp),
    "k3": _k3,
}
modes.check_table("KL estimator", _KL, KL_ESTIMATORS)


def _kl(logp: jax.Array, ref_logp: jax.Array, estimator: str) -> jax.Array:
    return _KL[estimator](logp, ref_logp)


def policy_loss_terms(
    logp,
    old_logp,
    advantages,
    mask,
    *,
    ref_logp=None,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    kl_ratio_correction: bool = False,
    agg: str = "token_mean",
    max_len: int | None = None,
    token_weights=None,
    sequence_weights=None,
    ratio_level: str = "token",
    entropy=None,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Numerator, denominator and aux sums of :func:`policy_loss`, for exact accumulation.

    Sum ``num``, ``den`` and the aux terms over micro-batches (:func:`accumulate_terms`), then
    ``loss = num / den`` (:func:`loss_from_terms`) and ``aux = aux_from_terms(aux_terms)``. The
    denominator never depends on the parameters, so the gradient of the full-batch loss is
    ``sum_i grad(num_i) / sum_i den_i``. Arguments are those of :func:`policy_loss`.

    Returns:
        ``(num, den, aux_terms)``: float32 scalars and a dict of float32 scalars (sums, counts,
        and ``ratio_min`` / ``ratio_max``), all stop-gradient except ``num``.
    """
    logp = _check_float("logp", logp, 2)
    n, t = logp.shape
    old_logp = _check_float("old_logp", old_logp, 2, n, t)
    if old_logp.shape != logp.shape:
        raise ValueError(f"old_logp shape {old_logp.shape} must equal logp shape {logp.shape}")
    advantages = _check_float("advantages", advantages, (1, 2), n, t)
    mask = jnp.asarray(mask)
    if mask.shape != logp.shape:
        raise ValueError(f"mask shape {mask.shape} must equal logp shape {logp.shape}")
    if not (mask.dtype == jnp.bool_ or jnp.issubdtype(mask.dtype, jnp.number)):
        raise TypeError(f"mask must be boolean or numeric (0/1), got dtype {mask.dtype}")
    if agg not in AGG_MODES:
        raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"ratio_level must be one of {RATIO_LEVELS}, got {ratio_level!r}")
    for name, value in (("clip_low", clip_low), ("clip_high", clip_high),
                        ("dual_clip", dual_clip), ("kl_coef", kl_coef)):
        if value is not None and not _traced(value) and jnp.ndim(value) != 0:
            raise ValueError(f"{name} must be a scalar, got shape {jnp.shape(value)}")
    if not _traced(clip_low) and not 0.0 <= clip_low < 1.0:
        raise ValueError(f"clip_low must be in [0, 1), got {clip_low}")
    if not _traced(clip_high) and not clip_high >= 0.0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high}")
    if dual_clip is not None and not _traced(dual_clip) and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be None or a constant > 1 (e.g. 3.0), got {dual_clip}")
    # A traced kl_coef may be non-zero, so the KL term is always built with it.
    use_kl = _traced(kl_coef) or kl_coef != 0.0
    if use_kl and ref_logp is None:
        if _traced(kl_coef):
            raise ValueError("kl_coef is traced, so it may be non-zero: pass ref_logp, or pass "
                             "kl_coef as the Python float 0.0 to train without a reference")
        raise ValueError("ref_logp is required when kl_coef != 0 (the KL is to the reference)")
    if agg == "block_mean" and token_weights is None:
        raise ValueError("token_weights [N, T] is required with agg='block_mean'")
    if agg != "block_mean" and token_weights is not None:
        raise ValueError(f"token_weights is only used by agg='block_mean', not agg={agg!r}")
    if max_len is not None:
        if _traced(max_len):
            raise ValueError("max_len must be a static Python int, not a traced value (mark it "
                             "static, e.g. jax.jit(..., static_argnames='max_len'))")
        if isinstance(max_len, bool) or not isinstance(max_len, int | np.integer) or max_len <= 0:
            raise ValueError(f"max_len must be a positive Python int, got {max_len!r}")
        # Accepted and ignored by the other aggregations, so one config can feed every mode.
        max_len = int(max_len)

    m = mask.astype(bool)
    sg = jax.lax.stop_gradient
    # Sanitise first: NaN/inf at masked positions must not reach any value or gradient.
    logp = jnp.where(m, logp, 0.0)
    old_logp = jnp.where(m, old_logp, 0.0)
    if advantages.ndim == 1:
        adv = jnp.broadcast_to(advantages[:, None], (n, t))
    else:
        adv = advantages
    adv = jnp.where(m, adv, 0.0)
    count_n = jnp.sum(m, axis=1).astype(jnp.float32)  # [N]

    log_ratio = logp - old_logp  # [N, T], 0 where masked
    if ratio_level == "token":
        ratio = jnp.exp(log_ratio)
    else:
        seq_log_ratio = safe_div(jnp.sum(log_ratio, axis=1), count_n)  # [N]
        ratio = jnp.exp(sg(seq_log_ratio)[:, None] + logp - sg(logp))

    clipped = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg = -jnp.minimum(ratio * adv, clipped * adv)
    if dual_clip is not None:
        cap = -dual_clip * adv
        dual_active = (adv < 0) & (pg > cap)
        pg = jnp.where(adv < 0, jnp.minimum(pg, cap), pg)
    per_token = pg

    kl_ref = None
    if ref_logp is not None:
        ref_logp = _check_float("ref_logp", ref_logp, 2, n, t)
        ref_logp = jnp.where(m, ref_logp, 0.0)
        kl_ref = _kl(logp, ref_logp, kl_estimator)
        if use_kl:
            kl_term = kl_ref * ratio if kl_ratio_correction else kl_ref
            per_token = per_token + kl_coef * kl_term
    per_token = jnp.where(m, per_token, 0.0)

    if sequence_weights is None:
        w = jnp.ones((n,), jnp.float32)
    else:
        w = _check_float("sequence_weights", sequence_weights, 1, n)

    if agg == "token_mean":
        num = jnp.sum(w[:, None] * per_token)
        den = jnp.sum(count_n)
    else:
        if agg == "seq_mean_token_mean":
            seq = safe_div(jnp.sum(per_token, axis=1), count_n)
        elif agg == "seq_mean_token_sum_norm":
            seq = jnp.sum(per_token, axis=1) / float(t if max_len is None else max_len)
        else:
            tw = _check_float("token_weights", token_weights, 2, n, t)
            seq = jnp.sum(jnp.where(m, tw, 0.0) * per_token, axis=1)
        num = jnp.sum(w * seq)
        den = jnp.asarray(float(n), jnp.float32)

    # Diagnostics: sums and counts over valid tokens, all stop-gradient.
    r = sg(ratio)
    a = sg(adv)
    mf = m.astype(jnp.float32)
    lr = sg(log_ratio)
    terms = {
        "num_tokens": jnp.sum(mf),
        "num_sequences": jnp.asarray(float(n), jnp.float32),
        "clip_low_count": jnp.sum(mf * ((r < 1.0 - clip_low) & (a < 0))),
        "clip_high_count": jnp.sum(mf * ((r > 1.0 + clip_high) & (a > 0))),
        # k3 estimate of KL(old || new) from samples of old: (r - 1) - log r, r = new / old.
        "approx_kl_sum": jnp.sum(jnp.where(m, jnp.expm1(lr) - lr, 0.0)),
        "ratio_sum": jnp.sum(jnp.where(m, r, 0.0)),
        "ratio_min": jnp.min(jnp.where(m, r, jnp.inf)),
        "ratio_max": jnp.max(jnp.where(m, r, -jnp.inf)),
    }
    if dual_clip is not None:
        terms["clip_dual_count"] = jnp.sum(mf * dual_active)
    if kl_ref is not None:
        terms["kl_ref_sum"] = jnp.sum(jnp.where(m, sg(kl_ref), 0.0))
    if entropy is not None:
        ent = _check_float("entropy", entropy, 2, n, t)
        terms["entropy_sum"] = jnp.sum(jnp.where(m, sg(ent), 0.0))
    return num, den, terms


def accumulate_terms(a, b):
    """Combine two ``(num, den, aux_terms)`` triples of disjoint micro-batches."""
    num_a, den_a, aux_a = a
    num_b, den_b, aux_b = b
    if set(aux_a) != set(aux_b):
        raise ValueError(f"aux term keys differ: {sorted(aux_a)} vs {sorted(aux_b)}")
    aux = {}
    for k in aux_a:
        if k in _MIN_TERMS:
            aux[k] = jnp.minimum(aux_a[k], aux_b[k])
        elif k in _MAX_TERMS:
            aux[k] = jnp.maximum(aux_a[k], aux_b[k])
        else:
            aux[k] = aux_a[k] + aux_b[k]
    return num_a + num_b, den_a + den_b, aux


def loss_from_terms(num: jax.Array, den: jax.Array) -> jax.Array:
    """``num / den``, or 0 when ``den == 0`` (an all-masked token-mean batch)."""
    return safe_div(num, den)


def aux_from_terms(terms: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Masked means from summed aux terms; every mean over zero valid tokens is exactly 0.

    Keys: ``clip_frac_low`` (fraction of valid tokens with ``r < 1 - clip_low`` and ``A < 0``),
    ``clip_frac_high`` (``r > 1 + clip_high`` and ``A > 0``), ``clip_frac_dual`` (the dual clip
    binds; only with ``dual_clip``), ``approx_kl`` (mean k3 estimate of KL(old || new),
    ``r - 1 - log r`` per token), ``ratio_mean`` / ``ratio_min`` / ``ratio_max``, ``kl_ref_mean``
    (only with ``ref_logp``; the chosen estimator, without the ratio correction),
    ``entropy_mean`` (only with ``entropy``) and ``num_tokens``. All fractions use the number of
    valid tokens as denominator, as TRL and verl do.
    """
    ntok = terms["num_tokens"]
    has = ntok > 0
    out = {
        "clip_frac_low": safe_div(terms["clip_low_count"], ntok),
        "clip_frac_high": safe_div(terms["clip_high_count"], ntok),
        "approx_kl": safe_div(terms["approx_kl_sum"], ntok),
        "ratio_mean": safe_div(terms["ratio_sum"], ntok),
        "ratio_min": jnp.where(has, terms["ratio_min"], 0.0),
        "ratio_max": jnp.where(has, terms["ratio_max"], 0.0),
        "num_tokens": ntok,
    }
    if "clip_dual_count" in terms:
        out["clip_frac_dual"] = safe_div(terms["clip_dual_count"], ntok)
    if "kl_ref_sum" in terms:
        out["kl_ref_mean"] = safe_div(terms["kl_ref_sum"], ntok)
    if "entropy_sum" in terms:
        out["entropy_mean"] = safe_div(terms["entropy_sum"], ntok)
    return out


def policy_loss(
    logp,
    old_logp,
    advantages,
    mask,
    *,
    ref_logp=None,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    kl_ratio_correction: bool = False,
    agg: str = "token_mean",
    max_len: int | None = None,
    token_weights=None,
    sequence_weights=None,
    ratio_level: str = "token",
    entropy=None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped-surrogate policy loss with optional dual clip, KL to a reference, and aggregation.

    See the module docstring for the formulas and the exact normalisation of each ``agg`` mode.
    Arrays may be traced. ``clip_low``, ``clip_high``, ``dual_clip`` and ``kl_coef`` may be
    Python numbers (range-checked at trace time) or traced scalars (changing them then does not
    recompile; their range is not checked, and a traced ``kl_coef`` needs ``ref_logp`` since it
    may be non-zero). The modes and ``max_len`` are static Python values; a traced ``max_len``
    is refused with a ``ValueError``.

    Args:
        logp: ``[N, T]`` log-probs of the sampled tokens under the current policy.
        old_logp: ``[N, T]`` log-probs under the policy that sampled (or the last update's).
        advantages: ``[N]`` per-sequence or ``[N, T]`` per-token advantages (constants).
        mask: ``[N, T]`` bool or 0/1, true on completion tokens that count.
        ref_logp: ``[N, T]`` reference-policy log-probs; required if ``kl_coef != 0``.
        clip_low, clip_high: the ratio is clipped to ``[1 - clip_low, 1 + clip_high]`` (DAPO
            uses clip_high = 0.28).
        dual_clip: constant ``c > 1``: for ``A < 0`` the per-token loss is capped at ``-c A``
            (Ye et al. 2020; verl's ``clip_ratio_c``, 3.0 there). None disables it.
        kl_coef: beta; the per-token KL times beta is added to the per-token loss.
        kl_estimator: ``"k1"``, ``"k2"`` or ``"k3"``.
        kl_ratio_correction: multiply the per-token KL by the ratio, gradient included (TRL
            1.16 ``use_bias_correction_kl``).
        agg: ``"token_mean"``, ``"seq_mean_token_mean"``, ``"seq_mean_token_sum_norm"`` or
            ``"block_mean"``.
        max_len: Dr. GRPO's constant length for ``"seq_mean_token_sum_norm"``; default ``T``.
            Accepted (and validated) but ignored by the other aggregations, so generic code
            may pass its configured value whatever ``agg`` is.
        token_weights: ``[N, T]`` per-token weights for ``"block_mean"`` (``1 / |T_k|`` on block
            k's tokens, 0 elsewhere: see :func:`jaxgrpo.core.advantages.block_token_weights`).
        sequence_weights: ``[N]`` loss weight per sequence, in the numerator only.
        ratio_level: ``"token"`` or ``"sequence"`` (GSPO, in GSPO-token's gradient form).
        entropy: ``[N, T]`` per-token entropy, reported as ``aux["entropy_mean"]`` (no bonus).

    Returns:
        ``(loss, aux)``: a float32 scalar and a dict of float32 scalars (:func:`aux_from_terms`).
    """
    num, den, terms = policy_loss_terms(
        logp,
        old_logp,
        advantages,
        mask,
        ref_logp=ref_logp,
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual_clip,
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
        kl_ratio_correction=kl_ratio_correction,
        agg=agg,
        max_len=max_len,
        token_weights=token_weights,
        sequence_weights=sequence_weights,
        ratio_level=ratio_level,
        entropy=entropy,
    )
    return loss_from_terms(num, den), aux_from_terms(terms)
