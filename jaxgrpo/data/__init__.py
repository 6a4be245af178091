"""Host-side data: the multi-task prompt sampler and MT-GRPO's ratio-preserving sampler.

Plain Python and numpy; no jax (the caller passes ``jax.process_index()`` and
``jax.process_count()``).
"""

from jaxgrpo.data.groups import FILTERS, Group, GroupStream, StepResult, is_filtered
from jaxgrpo.data.ratio_sampler import PRESETS, RatioPreservingSampler
from jaxgrpo.data.task_sampler import Item, TaskSampler, largest_remainder

__all__ = [
    "FILTERS",
    "PRESETS",
    "Group",
    "GroupStream",
    "Item",
    "RatioPreservingSampler",
    "StepResult",
    "TaskSampler",
    "is_filtered",
    "largest_remainder",
]
