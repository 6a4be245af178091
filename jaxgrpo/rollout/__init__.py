"""Rollout: the jitted KV-cache sampler."""

from jaxgrpo.rollout.sampler import (
    DEFAULT_BUCKETS,
    Rollout,
    bucket_length,
    generate,
    generate_functional,
)

__all__ = ["DEFAULT_BUCKETS", "Rollout", "bucket_length", "generate", "generate_functional"]
