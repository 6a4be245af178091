"""jaxgrpo: JAX/TPU-native RL post-training with verifiable rewards.

The top-level package imports only the pure core (jax, numpy, chex). The trainer, the model and
the tasks are imported explicitly: ``jaxgrpo.train``, ``jaxgrpo.model``, ``jaxgrpo.tasks``.
"""

__version__ = "0.1.0"
