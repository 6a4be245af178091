"""Host-side metrics: writers, a progress bar, the non-finite guard and per-task summaries.

1. The jitted step returns a flat dict of scalars with ``/``-namespaced keys (``loss/policy``,
   ``grad/global_norm``, ``task/<name>/accuracy``); the loop fetches it one step late and hands
   it, as Python floats, to a :class:`MetricWriter`.
2. :class:`JsonlWriter` appends one JSON object per line (``step``, ``time``, the metrics);
   :class:`TensorBoardWriter` writes event files (tensorboardX, imported lazily);
   :class:`MultiWriter` fans out (the loop writes on process 0 only).
   Both writers take a local path or a URI (``gs://bucket/run/metrics.jsonl``, any
   ``etils.epath`` scheme): for a URI they write to a local staging copy and upload it whole at
   most every ``sync_every_s`` seconds, on ``flush()`` and on ``close()`` (object stores cannot
   append to an object).
3. :class:`NonFiniteGuard` decides, per step, whether the update was good, skipped (NaN/Inf in
   the loss or gradient: the device-side step must already have left the state unchanged) or
   whether the run must stop (:class:`NonFiniteError` after ``max_consecutive`` in a row).
4. :class:`ProgressBar` prints step/total, rate, ETA and a few metrics to stderr.
5. :func:`per_task_metrics` turns one step's ``[P, G]`` rewards into per-task scalars.

Nothing here touches devices.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TextIO, runtime_checkable

import numpy as np

from jaxgrpo import paths

__all__ = [
    "JsonlWriter", "MetricWriter", "MultiWriter", "NonFiniteError", "NonFiniteGuard",
    "NullWriter", "ProgressBar", "TensorBoardWriter", "WandbWriter", "mfu", "per_task_metrics",
    "read_jsonl", "to_scalars",
]


@runtime_checkable
class MetricWriter(Protocol):
    """Where scalar metrics go. Keys are ``/``-namespaced; values are Python floats."""

    def write_scalars(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def write_hparams(self, hparams: Mapping[str, Any]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def to_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Every value as a Python float (numpy/jax 0-d arrays and ints included).

    Raises:
      ValueError: a value is not a scalar (names the key).
    """
    out = {}
    for k, v in metrics.items():
        a = np.asarray(v)
        if a.size != 1:
            raise ValueError(f"metric '{k}' must be a scalar, got shape {a.shape}")
        out[str(k)] = float(a.reshape(()))
    return out


class NullWriter:
    """Writes nothing (processes other than 0)."""

    def write_scalars(self, step: int, metrics: Mapping[str, float]) -> None:
        pass

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class _Staged:
    """A local staging directory mirrored to a URI directory (whole files, overwritten)."""

    def __init__(self, remote_dir: str, sync_every_s: float):
        if sync_every_s < 0:
            raise ValueError(f"sync_every_s must be >= 0, got {sync_every_s!r}")
        self.remote_dir = remote_dir
        self.local_dir = tempfile.mkdtemp(prefix="jaxgrpo-logs-")
        self.sync_every_s = sync_every_s
        self._last_sync = time.monotonic()

    def due(self) -> bool:
        return time.monotonic() - self._last_sync >= self.sync_every_s

    def sync(self) -> None:
        paths.upload_tree(self.local_dir, self.remote_dir)
        self._last_sync = time.monotonic()

    def remove(self) -> None:
        shutil.rmtree(self.local_dir, ignore_errors=True)


class JsonlWriter:
    """One JSON object per line: ``{"step": s, "time": unix seconds, "<key>": value, ...}``.

    NaN and Inf are written as the JSON extensions ``NaN``/``Infinity``, which
    :func:`read_jsonl` (Python's ``json``) reads back. Hyper-parameters go to ``hparams.json``
    next to the file.

    A URI ``path`` (``gs://bucket/run/metrics.jsonl``) is staged: an existing file is first
    downloaded, lines are appended to the local copy, and the whole file is uploaded to ``path``
    at most every ``sync_every_s`` seconds (checked at each write), on :meth:`flush` and on
    :meth:`close`; ``hparams.json`` is written to the URI directly.

    Args:
      path: the ``.jsonl`` file (local or URI); its directory is created.
      resume_step: when resuming from a checkpoint at this step, lines of later steps (written
        after that checkpoint by the interrupted run) are dropped so the log has no duplicates.
      sync_every_s: for a URI ``path``, the most seconds between uploads while writing.
    """

    def __init__(self, path: str | os.PathLike, *, resume_step: int | None = None,
                 sync_every_s: float = 30.0):
        self.path = os.fspath(path)
        self._staged = None
        local = self.path
        if paths.is_uri(self.path):
            remote = paths.as_path(self.path)
            self._staged = _Staged(os.fspath(remote.parent), sync_every_s)
            local = os.path.join(self._staged.local_dir, remote.name)
            if remote.exists():
                with open(local, "wb") as f:
                    f.write(remote.read_bytes())
        else:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        if resume_step is not None and os.path.exists(local):
            kept = [r for r in read_jsonl(local) if r.get("step", -1) <= resume_step]
            tmp = local + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            os.replace(tmp, local)
        self._local = local
        self._file: TextIO | None = open(local, "a", encoding="utf-8")  # noqa: SIM115
        if self._staged is not None:
            self._staged.sync()  # creates the remote file (and drops resumed-over lines there)

    def write_scalars(self, step: int, metrics: Mapping[str, float]) -> None:
        if self._file is None:
            raise ValueError(f"JsonlWriter for '{self.path}' is closed")
        record = {"step": int(step), "time": time.time(), **to_scalars(metrics)}
        self._file.write(json.dumps(record) + "\n")
        if self._staged is not None and self._staged.due():
            self.flush()

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        if self._staged is not None:
            paths.write_text(paths.as_path(self._staged.remote_dir) / "hparams.json",
                             json.dumps(dict(hparams), indent=1, default=str))
            return
        out = os.path.join(os.path.dirname(os.path.abspath(self.path)), "hparams.json")
        with open(out, "w", encoding="utf-8") as f:
            json.dump(dict(hparams), f, indent=1, default=str)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
            if self._staged is not None:
                self._staged.sync()

    def close(self) -> None:
        if self._file is not None:
            self.flush()
            self._file.close()
            self._file = None
            if self._staged is not None:
                self._staged.remove()


class TensorBoardWriter:
    """TensorBoard event files via tensorboardX (imported when the writer is created).

    A URI ``logdir`` (``gs://bucket/run/tensorboard``, any ``etils.epath`` scheme) is staged:
    tensorboardX writes its event file to a local directory, which is uploaded whole to
    ``logdir`` at most every ``sync_every_s`` seconds (checked at each write), on :meth:`flush`
    and on :meth:`close`. tensorboardX writes events from a background queue, so an upload holds
    what it has written by then; the rest goes with the next one, and :meth:`close` uploads
    everything. (tensorboardX's own remote writers cover only ``gs://`` and ``s3://``, each
    through its cloud SDK; staging covers every scheme ``etils.epath`` does.)

    Args:
      logdir: the event-file directory (local or URI).
      sync_every_s: for a URI ``logdir``, the most seconds between uploads while writing.
    """

    def __init__(self, logdir: str | os.PathLike, *, sync_every_s: float = 30.0):
        from tensorboardX import SummaryWriter

        self.logdir = os.fspath(logdir)
        self._staged = None
        if paths.is_uri(self.logdir):
            paths.as_path(self.logdir)  # an unknown scheme fails here
            self._staged = _Staged(self.logdir, sync_every_s)
        self._writer = SummaryWriter(self.logdir if self._staged is None
                                     else self._staged.local_dir)

    def _maybe_sync(self) -> None:
        if self._staged is not None and self._staged.due():
            self.flush()

    def write_scalars(self, step: int, metrics: Mapping[str, float]) -> None:
        for k, v in to_scalars(metrics).items():
            self._writer.add_scalar(k, v, global_step=int(step))
        self._maybe_sync()

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        lines = [f"| {k} | {v} |" for k, v in hparams.items()]
        self._writer.add_text("hparams", "\n".join(["| key | value |", "|---|---|", *lines]))
        self._maybe_sync()

    def flush(self) -> None:
        self._writer.flush()
        if self._staged is not None:
            self._staged.sync()

    def close(self) -> None:
        self._writer.close()
        if self._staged is not None:
            self._staged.sync()
            self._staged.remove()
            self._staged = None


class WandbWriter:
    """Weights & Biases (``wandb``, imported when the writer is created; an optional package).

    Scalars go to ``wandb.log`` at their step, hyper-parameters to the run's config. ``mode``
    ``"offline"`` writes the run under ``dir`` without any network (``wandb sync DIR`` uploads
    it later, e.g. from a machine with access).

    Raises:
      ImportError: wandb is not installed (a one-line message saying how to install it).
    """

    def __init__(self, *, project: str, entity: str | None = None, name: str | None = None,
                 mode: str = "online", dir: str | os.PathLike | None = None,
                 tags: Sequence[str] = ()):
        try:
            import wandb
        except ImportError:
            raise ImportError("logging.wandb.enabled needs wandb: pip install wandb") from None
        kw = {} if dir is None else {"dir": os.fspath(dir)}
        if dir is not None:
            os.makedirs(os.fspath(dir), exist_ok=True)
        self._run = wandb.init(project=project, entity=entity, name=name, mode=mode,
                               tags=list(tags), reinit="create_new", **kw)

    def write_scalars(self, step: int, metrics: Mapping[str, float]) -> None:
        self._run.log(to_scalars(metrics), step=int(step))

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        self._run.config.update({k: v for k, v in hparams.items()}, allow_val_change=True)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self._run.finish()


class MultiWriter:
    """Sends everything to each of ``writers``."""

    def __init__(self, writers: Sequence[MetricWriter]):
        self.writers = list(writers)

    def write_scalars(self, step: int, metrics: Mapping[str, float]) -> None:
        for w in self.writers:
            w.write_scalars(step, metrics)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        for w in self.writers:
            w.write_hparams(hparams)

    def flush(self) -> None:
        for w in self.writers:
            w.flush()

    def close(self) -> None:
        for w in self.writers:
            w.close()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a JSONL metrics file, local or URI (for notebooks); a torn last line is
    ignored."""
    records = []
    if paths.is_uri(path):
        lines = paths.as_path(path).read_text(encoding="utf-8").splitlines()
    else:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # a crash mid-write leaves at most the last line torn
                break
            raise ValueError(f"{path}: line {i + 1} is not JSON") from None
    return records


# ---- non-finite guard ------------------------------------------------------------------------


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps: the run stops (the last good checkpoint is kept)."""


class NonFiniteGuard:
    """Counts steps whose loss or gradient metrics are NaN/Inf, and stops a diverging run.

    The jitted step must itself skip a non-finite update (leave the state unchanged); this
    guard, run on the fetched metrics, counts those skips and decides when to give up.

    Args:
      max_consecutive: the run stops at this many non-finite steps in a row.
      keys: metric namespaces that are checked: a key ``k`` is checked if it equals one of them
        or starts with ``<namespace>/`` (default: ``loss`` and ``grad``).
    """

    def __init__(self, max_consecutive: int = 3, *, keys: Sequence[str] = ("loss", "grad")):
        if not isinstance(max_consecutive, int) or isinstance(max_consecutive, bool) or (
                max_consecutive < 1):
            raise ValueError(f"max_consecutive must be an int >= 1, got {max_consecutive!r}")
        if isinstance(keys, str) or not keys:
            raise ValueError(f"keys must be a non-empty sequence of namespaces, got {keys!r}")
        self.max_consecutive = max_consecutive
        self.keys = tuple(keys)
        self.consecutive = 0
        self.total = 0

    def _checked(self, key: str) -> bool:
        return any(key == k or key.startswith(k + "/") for k in self.keys)

    def check(self, step: int, metrics: Mapping[str, Any]) -> bool:
        """True if the step's update was good; False if it was non-finite (skipped).

        Raises:
          NonFiniteError: the ``max_consecutive``-th non-finite step in a row.
        """
        bad = sorted(k for k, v in to_scalars(metrics).items()
                     if self._checked(k) and not math.isfinite(v))
        if not bad:
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.total += 1
        if self.consecutive >= self.max_consecutive:
            shown = ", ".join(f"{k}={float(np.asarray(metrics[k])):g}" for k in bad[:5])
            raise NonFiniteError(
                f"step {step}: non-finite {shown}; {self.consecutive} consecutive non-finite "
                f"steps (limit train.max_nonfinite_steps={self.max_consecutive}), stopping. "
                "The last good checkpoint is intact: lower optim.lr or check the data, then "
                "resume with --resume.")
        return False

    def metrics(self) -> dict[str, float]:
        return {"nonfinite/consecutive": float(self.consecutive),
                "nonfinite/skipped_total": float(self.total)}

    def get_state(self) -> dict[str, int]:
        return {"consecutive": self.consecutive, "total": self.total}

    def set_state(self, state: Mapping[str, int]) -> None:
        self.consecutive, self.total = int(state["consecutive"]), int(state["total"])


# ---- progress bar ----------------------------------------------------------------------------


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


class ProgressBar:
    """A plain-text progress line: ``step 40/200 20% | 1.32 step/s | ETA 2:01 | loss 0.41``.

    On a terminal the line is redrawn in place at most every ``min_interval`` seconds (and at
    the last step); otherwise (a log file, CI) one line is printed every ``every`` steps and at
    the last step.

    Args:
      total: the last step number.
      keys: metrics shown, in order, when present.
      every: steps between lines when the stream is not a terminal.
      initial: the step the run starts from (a resumed run's rate ignores earlier steps).
      stream: default ``sys.stderr``.
      clock: seconds, monotonic (injectable for tests).
    """

    def __init__(self, total: int, *, keys: Sequence[str] = ("loss/policy", "reward/mean"),
                 every: int = 10, initial: int = 0, stream: TextIO | None = None,
                 clock=time.monotonic, min_interval: float = 0.2):
        if not isinstance(total, int) or total < 1:
            raise ValueError(f"total must be an int >= 1, got {total!r}")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        self.total, self.keys, self.every, self.initial = total, tuple(keys), every, initial
        self.stream = sys.stderr if stream is None else stream
        self.clock, self.min_interval = clock, min_interval
        self._t0 = clock()
        self._last_draw = -math.inf
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())

    def format(self, step: int, metrics: Mapping[str, Any] | None = None) -> str:
        done = step - self.initial
        elapsed = self.clock() - self._t0
        rate = done / elapsed if elapsed > 0 and done > 0 else math.nan
        eta = (self.total - step) / rate if rate > 0 else math.nan
        parts = [f"step {step}/{self.total} {100 * step // self.total}%",
                 f"{rate:.2f} step/s" if math.isfinite(rate) else "? step/s",
                 f"ETA {_clock(eta)}"]
        for k in self.keys:
            if metrics and k in metrics:
                parts.append(f"{k} {float(np.asarray(metrics[k])):.4g}")
        return " | ".join(parts)

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        last = step >= self.total
        if self.tty:
            now = self.clock()
            if not last and now - self._last_draw < self.min_interval:
                return
            self._last_draw = now
            self.stream.write("\r\x1b[K" + self.format(step, metrics) + ("\n" if last else ""))
        elif last or step % self.every == 0:
            self.stream.write(self.format(step, metrics) + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


class Heartbeat:
    """A text stream that says what is running when nothing else has been printed for a while.

    Wraps ``stream`` (writes pass through); a daemon thread prints
    ``[jaxgrpo] <phase> ... (<elapsed>)`` whenever ``every_s`` seconds pass without a write, so
    a long compile, SFT stretch or rollout is never silent. ``phase`` is a plain attribute the
    caller updates as the run moves on (setting it prints nothing). Use as a context manager,
    or call :meth:`close` to stop the thread.

    Args:
      stream: where everything goes (default ``sys.stderr``).
      every_s: the longest silence, in seconds.
      first_s: the silence before the first line (default ``every_s``).
      clock: seconds, monotonic (injectable for tests).
    """

    def __init__(self, stream: TextIO | None = None, *, every_s: float = 10.0,
                 first_s: float | None = None, clock=time.monotonic, phase: str = "starting"):
        import threading

        first_s = every_s if first_s is None else first_s
        if not (every_s > 0 and 0 < first_s <= every_s):
            raise ValueError(f"every_s must be > 0 and first_s in (0, every_s], got "
                             f"{every_s!r}, {first_s!r}")
        self.stream = sys.stderr if stream is None else stream
        self.every_s, self.clock, self.phase = float(every_s), clock, phase
        self._t0 = clock()
        self._last = self._t0 - (self.every_s - first_s)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="jaxgrpo-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(min(0.5, self.every_s / 4)):
            self.tick()

    def tick(self) -> bool:
        """Prints the heartbeat line if ``every_s`` passed since the last write; returns
        whether it did."""
        with self._lock:
            now = self.clock()
            if now - self._last < self.every_s:
                return False
            self._last = now
            self.stream.write(f"[jaxgrpo] {self.phase} ... ({_clock(now - self._t0)} "
                              "since start)\n")
            self.stream.flush()
            return True

    def write(self, text: str) -> int:
        with self._lock:
            self._last = self.clock()
            return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> Heartbeat:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def set_phase(stream, phase: str) -> None:
    """``stream.phase = phase`` when ``stream`` is a :class:`Heartbeat` (otherwise nothing)."""
    if isinstance(stream, Heartbeat):
        stream.phase = phase


# ---- per-task metrics and throughput ------------------------------------------------------------


def mfu(flops_per_step: float, step_time_s: float, peak_flops_per_s: float,
        num_devices: int = 1) -> float:
    """Model FLOP utilisation: ``flops_per_step / (step_time_s · peak · num_devices)``."""
    if step_time_s <= 0 or peak_flops_per_s <= 0 or num_devices < 1:
        raise ValueError("step_time_s and peak_flops_per_s must be > 0 and num_devices >= 1, "
                         f"got {step_time_s}, {peak_flops_per_s}, {num_devices}")
    return float(flops_per_step) / (step_time_s * peak_flops_per_s * num_devices)


def per_task_metrics(task_names: Sequence[str], rewards_PxG, correct_PxG, lengths_PxG,
                     valid_PxG=None) -> dict[str, float]:
    """Per-task scalars for one step, from host arrays.

    For each task t (the prompts p with ``task_names[p] == t``), over valid completions:
    ``task/<t>/reward_mean``, ``task/<t>/accuracy`` (fraction correct),
    ``task/<t>/zero_adv_frac`` (fraction of the task's prompts whose valid rewards are all
    equal: a zero group-relative advantage), ``task/<t>/length_mean`` and ``.../length_max``,
    and ``task/<t>/prompts``. Tasks whose completions are all invalid get NaN means.

    Args:
      task_names: ``[P]`` task of each prompt.
      rewards_PxG, correct_PxG, lengths_PxG: ``[P, G]`` rewards, correctness (bool), completion
        lengths in tokens.
      valid_PxG: ``[P, G]`` bool; default all valid.
    """
    r = np.asarray(rewards_PxG, dtype=np.float64)
    if r.ndim != 2:
        raise ValueError(f"rewards_PxG must be [P, G], got shape {r.shape}")
    c = np.asarray(correct_PxG, dtype=bool)
    n = np.asarray(lengths_PxG, dtype=np.float64)
    v = np.ones(r.shape, bool) if valid_PxG is None else np.asarray(valid_PxG, dtype=bool)
    for name, a in (("correct_PxG", c), ("lengths_PxG", n), ("valid_PxG", v)):
        if a.shape != r.shape:
            raise ValueError(f"{name} must have shape {r.shape} like rewards_PxG, got {a.shape}")
    if len(task_names) != r.shape[0]:
        raise ValueError(f"task_names must have P={r.shape[0]} entries, got {len(task_names)}")
    names = np.asarray(task_names, dtype=object)
    out: dict[str, float] = {}
    for t in dict.fromkeys(task_names):
        rows = names == t
        rv, vv = r[rows], v[rows]
        cnt = vv.sum()
        mean = (lambda x, cnt=cnt, vv=vv: float((x * vv).sum() / cnt) if cnt else math.nan)
        zero = [np.ptp(rv[i][vv[i]]) == 0 if vv[i].any() else True for i in range(len(rv))]
        out[f"task/{t}/prompts"] = float(rows.sum())
        out[f"task/{t}/reward_mean"] = mean(rv)
        out[f"task/{t}/accuracy"] = mean(c[rows].astype(np.float64))
        out[f"task/{t}/zero_adv_frac"] = float(np.mean(zero))
        out[f"task/{t}/length_mean"] = mean(n[rows])
        out[f"task/{t}/length_max"] = float(n[rows][vv].max()) if cnt else math.nan
    return out
