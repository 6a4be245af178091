"""Orbax checkpoints of a run: ``{"state": pytree of jax arrays, "meta": JSON}`` per step.

1. :meth:`Checkpointer.save` starts an (optionally asynchronous) save of step ``s``: the arrays
   are copied off the device before it returns, then written in the background to
   ``<dir>/<s>.orbax-checkpoint-tmp`` and renamed to ``<dir>/<s>`` (with
   ``commit_success.txt``) when complete. Only the ``keep`` newest committed steps are kept.
2. ``meta`` is any JSON-able dict (the trainer saves its host-side samplers' state, the task
   weights and the accuracy before RL; the RNG key lives in the state). The step is added as
   ``meta["step"]``.
3. :meth:`Checkpointer.latest_step` only ever returns a **committed** step: a save killed
   mid-write leaves a temporary directory that is ignored (and removed on the next open), so
   the previous checkpoint stays the one restored.
4. :meth:`Checkpointer.restore` reads a step into an abstract tree of
   ``jax.ShapeDtypeStruct`` (shardings included: restoring onto another mesh reshards).

This module saves any pytree and never imports the trainer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxgrpo import paths
from jaxgrpo.config import InputError

__all__ = ["Checkpointer", "committed_steps"]

_COMMIT_MARKER = "commit_success.txt"


def _jsonable(x: Any, path: str = "meta") -> Any:
    """numpy/jax scalars and arrays -> Python numbers and lists; checks keys are strings."""
    if isinstance(x, Mapping):
        out = {}
        for k, v in x.items():
            if not isinstance(k, str):
                raise TypeError(f"{path} keys must be strings, got {k!r}")
            out[k] = _jsonable(v, f"{path}.{k}")
        return out
    if isinstance(x, list | tuple):
        return [_jsonable(v, f"{path}[{i}]") for i, v in enumerate(x)]
    if isinstance(x, np.ndarray | np.generic | jax.Array):
        return np.asarray(x).tolist()
    if x is None or isinstance(x, bool | int | float | str):
        return x
    raise TypeError(f"{path} must be JSON-able (dict, list, str, number, bool, None, numpy "
                    f"array), got {type(x).__name__}")


def committed_steps(directory: str | os.PathLike) -> list[int]:
    """The committed steps under a checkpoint directory, ascending (none if it does not exist).

    Only lists files: nothing is created, cleaned up or opened with orbax, so a command can
    check a run's directory before it decides to touch it.
    """
    path = paths.as_path(directory)
    if not path.is_dir():
        return []
    return sorted(int(c.name) for c in path.iterdir()
                  if c.name.isdigit() and (c / _COMMIT_MARKER).is_file())


def _abstract_leaf(x: Any) -> jax.ShapeDtypeStruct:
    sharding = getattr(x, "sharding", None)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)


class Checkpointer:
    """Keep-N, atomic, optionally asynchronous checkpoints of ``state`` and JSON ``meta``.

    Args:
      directory: where step directories live: a local path or a URI kept as it is
        (``gs://bucket/run/checkpoints``; every process of a multi-host run writes its shards
        there, so it must be storage all of them see).
      keep: how many committed checkpoints to keep (oldest deleted first).
      asynchronous: write in a background thread (``save`` returns after the device->host
        copy); ``wait()`` blocks until the last save is committed.
      create: create ``directory`` if missing; with False a missing directory is an error.

    Raises:
      FileNotFoundError: ``directory`` does not exist and ``create`` is False.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3,
                 asynchronous: bool = True, create: bool = True):
        if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
            raise ValueError(f"keep must be an int >= 1, got {keep!r}")
        raw = os.fspath(directory)
        # Local paths are made absolute; URIs (gs://...) are passed to orbax as they are.
        self.directory = raw if paths.is_uri(raw) else os.path.abspath(raw)
        self._path = paths.as_path(self.directory)
        if not self._path.is_dir():
            if not create:
                raise FileNotFoundError(f"checkpoint directory '{self.directory}' does not "
                                        "exist: check checkpoint.dir / train.workdir")
            self._path.mkdir(parents=True, exist_ok=True)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=asynchronous,
            cleanup_tmp_directories=True)
        self._mgr = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "meta"))

    # ---- queries -----------------------------------------------------------------------------

    def _committed(self, step: int) -> bool:
        return (self._path / str(step) / _COMMIT_MARKER).is_file()

    def all_steps(self) -> list[int]:
        """Committed steps on disk, ascending (an in-flight or killed save is not listed)."""
        return committed_steps(self._path)

    def latest_step(self) -> int | None:
        """The newest committed step, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    # ---- save / restore ----------------------------------------------------------------------

    def save(self, step: int, state: Any, meta: Mapping[str, Any] | None = None) -> None:
        """Start saving ``state`` (a pytree of jax arrays) and ``meta`` (JSON) as ``step``.

        Raises:
          TypeError: ``meta`` is not JSON-able (names the entry).
          ValueError: ``step`` is negative or already saved.
        """
        if not isinstance(step, int | np.integer) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        step = int(step)
        meta_json = _jsonable(dict(meta or {}))
        if "step" in meta_json and meta_json["step"] != step:
            raise ValueError(f"meta['step'] = {meta_json['step']} disagrees with step {step}")
        meta_json["step"] = step
        json.dumps(meta_json)  # fail here, not in the background thread
        if step in self._mgr.all_steps():
            raise ValueError(f"a checkpoint for step {step} already exists in "
                             f"'{self.directory}'")
        self._mgr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta_json)), force=True)

    def restore(self, step: int | None = None, *, abstract_state: Any) -> tuple[Any, dict]:
        """Read ``step`` (default: the latest committed) into ``abstract_state``'s structure.

        Args:
          step: which step; None for :meth:`latest_step`.
          abstract_state: a pytree of ``jax.ShapeDtypeStruct`` (or arrays) giving structure,
            shapes, dtypes and, when set, shardings; leaves without one go to the first device.

        Returns:
          ``(state, meta)``.

        Raises:
          FileNotFoundError: no committed checkpoint (for that step) in the directory.
          ValueError: the saved tree's structure or shapes differ from ``abstract_state``.
        """
        self.wait()
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no committed checkpoint in '{self.directory}' to "
                                        "restore: start without --resume")
            step = steps[-1]
        elif step not in steps:
            raise FileNotFoundError(f"no committed checkpoint for step {step} in "
                                    f"'{self.directory}'; available steps: {steps}")
        target = jax.tree.map(_abstract_leaf, abstract_state)
        try:
            restored = self._mgr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        except ValueError as e:
            detail = " ".join(str(e).split())
            if len(detail) > 300:
                detail = detail[:300] + " ..."
            raise InputError(f"checkpoint step {step} in '{self.directory}' does not match "
                             "abstract_state (does the config, e.g. the model or loss.kl_coef, "
                             f"differ from the run's config.yaml?): {detail}") from e
        return restored["state"], dict(restored["meta"])

    def wait(self) -> None:
        """Block until every started save is committed (or raise its error)."""
        self._mgr.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release the manager."""
        self._mgr.wait_until_finished()
        self._mgr.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
