"""The pure core: model-free, jit- and vmap-able math for GRPO-family training.

Importing this package loads only jax, numpy and chex (tested in ``tests/test_layering.py``).
"""

from jaxgrpo.core import masked

__all__ = ["masked"]
