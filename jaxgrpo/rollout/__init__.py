"""Rollout: the jitted KV-cache sampler and the paged engine."""

from jaxgrpo.rollout.engine import FinishedPrompt, PagedOptions, PagedSession
from jaxgrpo.rollout.sampler import (
    DEFAULT_BUCKETS,
    ENGINES,
    Rollout,
    bucket_length,
    generate,
    generate_functional,
)

__all__ = ["DEFAULT_BUCKETS", "ENGINES", "FinishedPrompt", "PagedOptions", "PagedSession",
           "Rollout", "bucket_length", "generate", "generate_functional"]
