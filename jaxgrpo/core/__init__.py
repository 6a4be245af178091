"""The pure core: model-free, jit- and vmap-able math for GRPO-family training.

- :mod:`~jaxgrpo.core.advantages`: group-relative (GRPO, Dr. GRPO, RLOO) and blockwise (BAE,
  OCB) advantages, and their broadcast to tokens.
- :mod:`~jaxgrpo.core.losses`: the clipped policy loss with KL and every aggregation mode.
- :mod:`~jaxgrpo.core.logprobs`: per-token log-probs and entropy, full or chunked over the vocab.
- :mod:`~jaxgrpo.core.weighting`: MT-GRPO's task-weight (IWU) gradients and per-task signals.
- :mod:`~jaxgrpo.core.masked`: NaN-free masked reductions.

Importing this package loads only jax, numpy and chex (tested in ``tests/test_layering.py``).
"""

from jaxgrpo.core import advantages, logprobs, losses, masked, weighting
from jaxgrpo.core.advantages import block_token_weights, blockwise, group_relative, token_advantages
from jaxgrpo.core.logprobs import chunked_token_logprobs, token_logprobs
from jaxgrpo.core.losses import policy_loss, policy_loss_terms
from jaxgrpo.core.weighting import iwu_gradient

__all__ = [
    "advantages",
    "block_token_weights",
    "blockwise",
    "chunked_token_logprobs",
    "group_relative",
    "iwu_gradient",
    "logprobs",
    "losses",
    "masked",
    "policy_loss",
    "policy_loss_terms",
    "token_advantages",
    "token_logprobs",
    "weighting",
]
