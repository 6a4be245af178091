"""Preemption: a SIGTERM ends a training run after the current step, with a checkpoint.

Cloud TPU maintenance events and spot/preemptible reclaims send SIGTERM to every worker's
processes (so does ``kill``, ``systemctl stop`` and ``scripts/tpu_pod_launch.sh stop``). The
loop asks :meth:`PreemptionWatch.reached` after every step; once it says True the loop saves a
checkpoint of that step (state, samplers, task weights) and returns, and ``--resume`` continues
from it bit for bit.

1. **One process**: a Python SIGTERM handler records the signal; ``reached`` reads the flag.
2. **Several processes** (``jax.distributed``): JAX's preemption sync manager catches SIGTERM on
   whichever host gets it and tells the others through the coordination service;
   ``jax.experimental.multihost_utils.reached_preemption_sync_point(step)`` then turns True on
   every host at the same step (the first one all hosts reach after the notice), so every
   process saves the same step and no collective is left waiting. Where the sync manager is
   off (``jax_enable_preemption_service=False``) each host installs the Python handler and the
   hosts agree by gathering their flags after every step (one tiny collective).

The handler is installed for the lifetime of the watch (a ``with`` block) and the previous one
restored after; outside the main thread (where Python cannot install handlers) nothing is
installed and only the sync point, if any, is watched.
"""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np

__all__ = ["PreemptionWatch"]


def _sync_manager():
    """JAX's preemption sync manager of this process, or None (single process, or disabled)."""
    try:
        from jax._src import distributed
    except ImportError:  # pragma: no cover (layout of another jax version)
        return None
    return getattr(distributed.global_state, "preemption_sync_manager", None)


class PreemptionWatch:
    """Tells the loop, after each step, whether to save and stop (see the module docstring)."""

    def __init__(self):
        self.signal_name: str | None = None
        self._multi = jax.process_count() > 1
        self._use_sync_point = self._multi and _sync_manager() is not None
        self._previous = None
        self._installed = False

    def __enter__(self) -> PreemptionWatch:
        if not self._use_sync_point and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False

    def _on_signal(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def reached(self, step: int) -> bool:
        """True when the run must save ``step`` (the number of completed steps) and stop.

        Every process must call this after every step, with the same ``step``.
        """
        if self._use_sync_point:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.signal_name = self.signal_name or "SIGTERM"
                return True
            return False
        if not self._multi:
            return self.signal_name is not None
        from jaxgrpo import sharding as shd

        flags = shd.allgather_rows(np.asarray([self.signal_name is not None], np.int32))
        if flags.max() > 0:
            self.signal_name = self.signal_name or "SIGTERM"
            return True
        return False
