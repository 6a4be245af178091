"""Tasks, safe verifiers, structured outputs and the verifier runner (host side; never imports jax).

Public API::

    from jaxgrpo.tasks import get_task, list_tasks, register_task, Task, Score, MIXTURES
    from jaxgrpo.tasks import score_many
"""

from jaxgrpo.tasks import adapters as _adapters  # noqa: F401  (registers the adapter tasks)
from jaxgrpo.tasks.base import Score, Task, get_task, list_tasks, parse_spec, register_task
from jaxgrpo.tasks.builtin import MIXTURES
from jaxgrpo.tasks.runner import VerifierPool, count_errors, score_many
from jaxgrpo.tasks.structured import (
    StructuredTask,
    completion_block_ids,
    parse_structured,
    token_block_ids,
)

__all__ = [
    "MIXTURES",
    "Score",
    "Task",
    "StructuredTask",
    "VerifierPool",
    "completion_block_ids",
    "count_errors",
    "get_task",
    "list_tasks",
    "parse_spec",
    "parse_structured",
    "register_task",
    "score_many",
    "token_block_ids",
]
