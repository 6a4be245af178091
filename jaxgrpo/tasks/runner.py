"""The verifier runner: score completions in worker processes under a per-call time limit.

A hung verifier (a pathological regex, a CPU-bound parse, a C extension in a loop) cannot be
interrupted in a thread, so verifiers run in a small pool of ``spawn``-ed processes (safe to use
from a parent that has started JAX threads). Each worker handles one item at a time; the parent
waits on all workers' pipes and, when an item passes its deadline, kills that worker, records
reward 0 with ``error="timeout after ...s"`` and starts a replacement. A worker that dies (for
example by a crash in a C extension) gives ``error="worker died"`` and is replaced too.

Memory: each worker limits its own address space with ``resource.setrlimit(RLIMIT_AS)`` to
``memory_mb`` (default 4,096 MB; 0 = no limit; Linux), set before it loads any task. A verifier
that allocates past it gets ``MemoryError`` (or is killed by the allocator failing in C code):
the item is scored 0 with ``error="out of memory ..."`` (or ``"worker died"``) and the worker is
replaced, so a runaway verifier can neither take the machine's memory nor leave a damaged
worker behind.

Cheap checks run in the parent before anything is sent: a completion that is not a ``str`` or
is longer than ``task.max_completion_chars`` (default 20,000) gets an error score at once.
Each task object is pickled once per pool and sent to a worker only the first time that worker
needs it; the worker then calls ``task.warmup()`` (heavy imports) before any deadline starts. A
task is serialised with ``cloudpickle``, so one whose class is defined in ``__main__`` (a
training script) or in a function, or that holds a lambda, is sent by value and gets the same
time and memory limits in a worker as any other. A task that cloudpickle cannot serialise (it
holds a lock, an open file, a live connection), or that fails to load in a worker, is refused
with a ``ValueError`` saying so: scoring it in this process would have no time limit
(``score_many(..., workers=0)`` does that on request).

Limits: ``timeout_s`` per call (default 2 s), ``workers`` processes (default 2). Starting a worker
costs about 0.3-1 s and is not counted against any item's time limit (a worker that is not ready
after 60 s gives ``error="worker failed to start"``); the module-level default pool
(``score_many(..., pool=None)``) is reused across calls and closed at interpreter exit.
"""

from __future__ import annotations

import atexit
import collections
import multiprocessing as mp
import multiprocessing.connection as mpc
import pickle
import sys
import threading
import time
from collections.abc import Sequence

import cloudpickle

from jaxgrpo.tasks.base import Score, Task, error_score, sanitize

DEFAULT_TIMEOUT_S = 2.0
DEFAULT_WORKERS = 2
DEFAULT_MEMORY_MB = 4096
STARTUP_TIMEOUT_S = 60.0


def _limit_memory(memory_mb: int) -> None:
    """Caps this process's address space at ``memory_mb`` MB (no-op for 0 or without RLIMIT_AS)."""
    if not memory_mb:
        return
    import resource

    if not hasattr(resource, "RLIMIT_AS"):
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = memory_mb << 20
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _worker_main(conn, memory_mb: int = 0) -> None:
    """Worker loop, under an address-space limit of ``memory_mb`` MB (0: none).

    Messages: ``("load", task_id, task_bytes)`` -> unpickle and ``warmup()``, reply "loaded";
    ``("score", task_id, record, completion, truncated)`` -> reply the score as a tuple;
    ``None`` -> exit.
    """
    tasks: dict[int, Task] = {}
    _limit_memory(memory_mb)
    conn.send("ready")
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        if msg[0] == "load":
            try:
                task = pickle.loads(msg[2])
                task.warmup()
                tasks[msg[1]] = task
                reply = "loaded"
            except BaseException as e:  # noqa: BLE001
                reply = f"load failed: {type(e).__name__}: {str(e)[:200]}"
        else:
            _, task_id, record, completion, truncated = msg
            try:
                s = tasks[task_id].score(record, completion, truncated=truncated)
                reply = (s.reward, s.correct, s.format_ok, s.error, s.blocks, s.confidence)
                if s.error is not None and s.error.startswith("MemoryError"):  # Task.score's
                    raise MemoryError
            except MemoryError:
                reply = (0.0, False, False, f"out of memory (limit {memory_mb} MB)", (), None)
            except BaseException as e:  # noqa: BLE001 - report, never die on a bad item
                reply = (0.0, False, False, f"worker: {type(e).__name__}: {str(e)[:200]}", (),
                         None)
        try:
            conn.send(reply)
        except (EOFError, OSError):
            return


def _start_detached_from_main(proc) -> None:
    """Starts a ``spawn`` process without re-importing the parent's ``__main__``.

    ``spawn`` normally re-runs the caller's main script in every child; a training script
    without an ``if __name__ == "__main__"`` guard would then start training again in each
    verifier worker. The worker needs nothing from ``__main__`` (its target lives here), so the
    main module's file and spec are hidden while the child is launched.
    """
    main = sys.modules.get("__main__")
    hidden = {a: main.__dict__[a] for a in ("__file__", "__spec__") if main and a in main.__dict__}
    try:
        for a in hidden:
            if a == "__spec__":
                main.__spec__ = None
            else:
                del main.__dict__[a]
        proc.start()
    finally:
        for a, v in hidden.items():
            main.__dict__[a] = v


class _Worker:
    def __init__(self, ctx, memory_mb: int = 0):
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child, memory_mb), daemon=True)
        _start_detached_from_main(self.proc)
        child.close()
        self.known: set[int] = set()
        self.deadline = 0.0
        self.ready = False

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> bool:
        """Waits for the worker's start-up message (imports happen before any deadline)."""
        if not self.ready:
            try:
                self.ready = self.conn.poll(timeout_s) and self.conn.recv() == "ready"
            except (EOFError, OSError):
                self.ready = False
        return self.ready

    def load(self, key: int, blob: bytes) -> str | None:
        """Sends a task and waits (start-up time limit) for it to load; an error or None."""
        if key in self.known:
            return None
        try:
            self.conn.send(("load", key, blob))
            if not self.conn.poll(STARTUP_TIMEOUT_S):
                return "task load timed out"
            reply = self.conn.recv()
        except (EOFError, OSError):
            return "worker died while loading the task"
        if reply != "loaded":
            return str(reply)
        self.known.add(key)
        return None

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.join(timeout=5)
        finally:
            self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
            self.proc.join(timeout=1)
        except (OSError, EOFError, BrokenPipeError):
            pass
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=5)
        self.conn.close()


class VerifierPool:
    """A reusable pool of verifier worker processes.

    Args:
      workers: number of worker processes (>= 1).
      timeout_s: time limit for one verifier call, in seconds (> 0).
      memory_mb: address-space limit of each worker process in MB (0 = no limit).

    ``errors`` counts error strings over the pool's life (``"timeout"``, ``"worker died"``, ...
    by their first word), for logging.
    """

    def __init__(self, *, workers: int = DEFAULT_WORKERS, timeout_s: float = DEFAULT_TIMEOUT_S,
                 memory_mb: int = DEFAULT_MEMORY_MB):
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an int >= 1, got {workers!r}")
        if not isinstance(timeout_s, int | float) or not timeout_s > 0:
            raise ValueError(f"timeout_s must be a positive number, got {timeout_s!r}")
        if isinstance(memory_mb, bool) or not isinstance(memory_mb, int) or memory_mb < 0:
            raise ValueError(f"memory_mb must be an int >= 0 (0 = no limit), got {memory_mb!r}")
        self.num_workers, self.timeout_s, self.memory_mb = workers, float(timeout_s), memory_mb
        self._ctx = mp.get_context("spawn")
        self._workers: list[_Worker] = []
        self._blobs: dict[int, bytes | str] = {}  # the pickle, or why there is none
        self._task_refs: dict[int, Task] = {}  # keeps ids stable while cached
        self.errors: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()  # one batch at a time; concurrent callers queue up

    def _blob(self, task: Task) -> bytes:
        key = id(task)
        if key not in self._blobs or self._task_refs.get(key) is not task:
            # cloudpickle sends classes of __main__ or defined in a function by value (plain
            # pickle names them, and a worker cannot import them), importable ones by name.
            try:
                self._blobs[key] = cloudpickle.dumps(task)
            except Exception as e:  # noqa: BLE001
                self._blobs[key] = f"{type(e).__name__}: {str(e)[:200]}"
            self._task_refs[key] = task
        blob = self._blobs[key]
        if isinstance(blob, str):
            raise ValueError(
                f"task {task.name!r} cannot be sent to a verifier worker ({blob}); make it "
                "picklable (no locks, open files or connections as attributes), or score it "
                "in this process with score_many(..., workers=0), which has no time limit")
        return blob

    def _ensure_workers(self) -> None:
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self._ctx, self.memory_mb))

    def score(self, tasks: Task | Sequence[Task], records: Sequence[dict],
              completions: Sequence[str], *,
              truncated: Sequence[bool] | None = None) -> list[Score]:
        """Scores ``completions[i]`` against ``records[i]`` with ``tasks[i]`` (or one task).

        ``truncated[i]``: completion i hit the length limit (see ``Task.score``).
        Thread-safe: concurrent calls are served one after another.
        """
        with self._lock:
            return self._score(tasks, records, completions, truncated)

    def _score(self, tasks, records, completions, truncated) -> list[Score]:
        n = len(records)
        if len(completions) != n:
            raise ValueError(f"records and completions must have the same length, "
                             f"got {n} and {len(completions)}")
        truncated = [False] * n if truncated is None else [bool(t) for t in truncated]
        if len(truncated) != n:
            raise ValueError(f"truncated must have one flag per record, got {len(truncated)}")
        if len(self._blobs) > 256:  # many short-lived task objects: start the caches afresh
            self.close()
            self._blobs.clear()
            self._task_refs.clear()
        if isinstance(tasks, Task):
            tasks = [tasks] * n
        elif len(tasks) != n:
            raise ValueError(f"tasks must be one Task or one per record, got {len(tasks)} for {n}")
        results: list[Score | None] = [None] * n
        pending: collections.deque[int] = collections.deque()
        for i, (task, completion) in enumerate(zip(tasks, completions, strict=True)):
            if not isinstance(task, Task):
                raise TypeError(f"tasks[{i}] must be a Task, got {type(task).__name__}")
            if not isinstance(completion, str) or len(completion) > task.max_completion_chars:
                results[i] = task.score(records[i], completion)  # the cheap error path
            else:
                self._blob(task)  # refuses a task that cannot reach a worker, before any work
                pending.append(i)
        if pending:
            self._run(tasks, records, completions, truncated, pending, results)
        self.errors.update(count_errors(results))
        return results  # type: ignore[return-value]

    def _run(self, tasks, records, completions, truncated, pending, results) -> None:
        self._ensure_workers()
        busy: dict[int, int] = {}  # worker index -> item index

        def submit(w_idx: int) -> None:
            while pending:
                i = pending.popleft()
                w, task = self._workers[w_idx], tasks[i]
                if not w.wait_ready():
                    results[i] = error_score("worker failed to start",
                                             num_blocks=task.num_blocks)
                    self._replace(w_idx)
                    continue
                key = id(task)
                err = w.load(key, self._blobs[key])
                if err is not None and err.startswith("load failed"):
                    # The task cannot be rebuilt in a worker: stop every worker (none may keep
                    # a reply for a later batch) and say so, rather than score without a limit.
                    self.close()
                    raise ValueError(
                        f"task {task.name!r} cannot be loaded in a verifier worker ({err}); "
                        "make its class importable there and its warmup() succeed, or score "
                        "it in this process with score_many(..., workers=0), which has no "
                        "time limit")
                if err is not None:
                    results[i] = error_score(f"worker: {err}", num_blocks=task.num_blocks)
                    self._replace(w_idx)
                    continue
                try:
                    w.conn.send(("score", key, records[i], completions[i], truncated[i]))
                except (OSError, EOFError, ValueError):
                    self._replace(w_idx)
                    pending.appendleft(i)
                    continue
                w.deadline = time.monotonic() + self.timeout_s
                busy[w_idx] = i
                return

        for w_idx in range(len(self._workers)):
            submit(w_idx)
        while busy:
            now = time.monotonic()
            wait_s = max(0.0, min(self._workers[w].deadline for w in busy) - now)
            conns = {self._workers[w].conn: w for w in busy}
            ready = mpc.wait(list(conns), timeout=wait_s)
            for conn in ready:
                w_idx = conns[conn]
                i = busy.pop(w_idx)
                try:
                    r, c, f, e, b, q = conn.recv()
                    results[i] = sanitize(Score(r, c, f, e, tuple(b), q),
                                          num_blocks=tasks[i].num_blocks)
                    if e is not None and e.startswith("out of memory"):
                        self._replace(w_idx)  # a fresh process, not a fragmented heap
                except (EOFError, OSError, pickle.UnpicklingError, TypeError, ValueError):
                    results[i] = error_score("worker died", num_blocks=tasks[i].num_blocks)
                    self._replace(w_idx)
                submit(w_idx)
            now = time.monotonic()
            for w_idx in [w for w in busy if self._workers[w].deadline <= now]:
                if self._workers[w_idx].conn.poll():
                    continue  # finished just in time; collected next round
                i = busy.pop(w_idx)
                results[i] = error_score(f"timeout after {self.timeout_s:g}s",
                                         num_blocks=tasks[i].num_blocks)
                self._replace(w_idx)
                submit(w_idx)

    def _replace(self, w_idx: int) -> None:
        self._workers[w_idx].kill()
        self._workers[w_idx] = _Worker(self._ctx, self.memory_mb)

    def close(self) -> None:
        """Stops all workers (the pool restarts them if used again)."""
        for w in self._workers:
            w.stop()
        self._workers = []

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_DEFAULT_POOLS: dict[tuple[int, float, int], VerifierPool] = {}


@atexit.register
def _close_default_pools() -> None:
    for pool in _DEFAULT_POOLS.values():
        pool.close()
    _DEFAULT_POOLS.clear()


def score_many(task_or_tasks: Task | Sequence[Task], records: Sequence[dict],
               completions: Sequence[str], *, timeout_s: float = DEFAULT_TIMEOUT_S,
               workers: int = DEFAULT_WORKERS, memory_mb: int = DEFAULT_MEMORY_MB,
               pool: VerifierPool | None = None,
               truncated: Sequence[bool] | None = None) -> list[Score]:
    """Scores completions in order, each call under ``timeout_s`` in a worker process.

    Args:
      task_or_tasks: one Task for all items, or one Task per item.
      records: the records (as from ``task.dataset(...)``), one per completion.
      completions: the completion texts.
      timeout_s: per-call time limit in seconds.
      workers: worker processes; 0 scores in this process (no time or memory limit).
      memory_mb: address-space limit of each worker in MB (0 = no limit).
      pool: a pool to use; by default a shared pool per ``(workers, timeout_s, memory_mb)``
        is reused.
      truncated: per item, whether the completion hit the length limit (no EOS); used by the
        structured formats (a truncated or malformed completion).

    Returns:
      One :class:`Score` per item, in input order. Never raises for bad completions.
    """
    if workers == 0 and pool is None:
        if isinstance(task_or_tasks, Task):
            task_or_tasks = [task_or_tasks] * len(records)
        flags = [False] * len(records) if truncated is None else list(truncated)
        if not len(task_or_tasks) == len(records) == len(completions) == len(flags):
            raise ValueError("tasks, records, completions and truncated must have the same length")
        return [t.score(r, c, truncated=f)
                for t, r, c, f in zip(task_or_tasks, records, completions, flags, strict=True)]
    if pool is None:
        key = (workers, float(timeout_s), memory_mb)
        if key not in _DEFAULT_POOLS:
            _DEFAULT_POOLS[key] = VerifierPool(workers=workers, timeout_s=timeout_s,
                                               memory_mb=memory_mb)
        pool = _DEFAULT_POOLS[key]
    return pool.score(task_or_tasks, records, completions, truncated=truncated)


def count_errors(scores: Sequence[Score]) -> dict[str, int]:
    """How many scores carry an error, by the error's first word (``{"timeout": 2, ...}``)."""
    out: collections.Counter[str] = collections.Counter()
    for s in scores:
        if s.error:
            out[s.error.split(":")[0].split(" ")[0]] += 1
    return dict(out)
