"""Supervised warm start: maximise the log-likelihood of gold completions given their prompts.

The demo's tiny model starts from random weights; a short SFT stage on the tasks' gold answers
gives it a nonzero success rate on every task, which GRPO needs (a group whose completions all
fail has zero advantage and teaches nothing).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgrpo.core.masked import masked_mean
from jaxgrpo.train import hostio
from jaxgrpo.train.state import ModelParts
from jaxgrpo.train.step import token_logprobs_fn


def make_sft_step(parts: ModelParts, tx: optax.GradientTransformation, chunk: int = 256):
    """``step(params, opt_state, tokens, attn, loss_mask) -> (params, opt_state, loss)``, jitted.

    The loss is the token-mean negative log-likelihood of the ``loss_mask`` targets
    (``loss_mask`` is aligned with ``tokens[:, 1:]``).
    """
    logp_fn = token_logprobs_fn(parts, chunk)

    def loss_fn(params, tokens, attn, loss_mask):
        logp, _ = logp_fn(params, tokens, attn)
        return -masked_mean(logp, loss_mask)

    def step(params, opt_state, tokens, attn, loss_mask):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, attn, loss_mask)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def sft_batch(tokenizer, prompts, golds, *, prompt_buckets, completion_len, pad_id, eos_id):
    """Host arrays for one SFT step: ``(tokens [B, T], attn [B, T], loss_mask [B, T-1])``."""
    ptok, pmask = hostio.encode_prompts(tokenizer, prompts, prompt_buckets, pad_id)
    ctok, cmask = hostio.encode_completions(tokenizer, golds, completion_len, pad_id, eos_id)
    tokens = np.concatenate([ptok, ctok], axis=1)
    attn = np.concatenate([pmask, cmask], axis=1)
    loss_mask = np.zeros((len(prompts), tokens.shape[1] - 1), bool)
    loss_mask[:, ptok.shape[1] - 1 :] = cmask
    return tokens, attn, loss_mask


def run_sft(
    parts: ModelParts,
    params,
    batches: Iterator[tuple[list[str], list[str]]],
    *,
    tokenizer,
    steps: int,
    tx: optax.GradientTransformation,
    prompt_buckets,
    completion_len: int,
    pad_id: int,
    eos_id: int,
    on_step: Callable[[int, float], None] | None = None,
):
    """Runs ``steps`` SFT updates on ``(prompts, gold completions)`` batches; returns the params."""
    step_fn = make_sft_step(parts, tx)
    opt_state = tx.init(params)
    params = jax.tree.map(jnp.copy, params)  # the step donates its inputs
    loss = None
    for i in range(steps):
        prompts, golds = next(batches)
        arrays = sft_batch(
            tokenizer, prompts, golds, prompt_buckets=prompt_buckets,
            completion_len=completion_len, pad_id=pad_id, eos_id=eos_id,
        )
        params, opt_state, loss = step_fn(params, opt_state, *arrays)
        if on_step is not None:
            on_step(i, loss)
    return params
