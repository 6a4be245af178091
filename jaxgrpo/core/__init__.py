"""The pure core: model-free, jit- and vmap-able math for GRPO-family training.

- :mod:`~jaxgrpo.core.advantages`: group-relative (GRPO, Dr. GRPO, RLOO) and blockwise (BAE,
  OCB) advantages, and their broadcast to tokens.
- :mod:`~jaxgrpo.core.losses`: the clipped policy loss with KL and every aggregation mode.
- :mod:`~jaxgrpo.core.logprobs`: per-token log-probs and entropy, full or chunked over the vocab.
- :mod:`~jaxgrpo.core.weighting`: MT-GRPO's task-weight (IWU) gradients and per-task signals.
- :mod:`~jaxgrpo.core.masked`: NaN-free masked reductions.
- :mod:`~jaxgrpo.core.modes`: every set of mode names (plain Python, no jax).

Importing this package loads only jax, numpy and chex (tested in ``tests/test_layering.py``),
and those only when a submodule other than ``modes`` is first used.
"""

import importlib

_SUBMODULES = ("advantages", "logprobs", "losses", "masked", "modes", "weighting")
_NAMES = {
    "block_token_weights": "advantages",
    "blockwise": "advantages",
    "group_relative": "advantages",
    "token_advantages": "advantages",
    "chunked_token_logprobs": "logprobs",
    "token_logprobs": "logprobs",
    "policy_loss": "losses",
    "policy_loss_terms": "losses",
    "iwu_gradient": "weighting",
}
__all__ = sorted((*_SUBMODULES, *_NAMES))


def __getattr__(name: str):
    # Submodules load on first use, so that the jax-free registries (``jaxgrpo.core.modes``)
    # can be imported by the config without importing jax.
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _NAMES:
        return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
