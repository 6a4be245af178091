"""The verifier pool: order, time limits, crashes, non-finite rewards, unpicklable tasks."""

import os
import time

import pytest

from jaxgrpo.tasks import Score, Task, VerifierPool, count_errors, get_task, score_many


class Sleepy(Task):
    """Hangs (busy loop) when the completion says "hang", raises on "raise", dies on "die"."""

    name = "sleepy"

    def verify(self, record, completion):
        if completion == "hang":
            while True:
                pass
        if completion == "raise":
            raise ValueError("bad")
        if completion == "die":
            os._exit(3)
        if completion == "nan":
            return Score(float("inf"), True, True)
        if completion == "pid":
            return Score(float(os.getpid()), True, True)
        return Score(float(record["i"]), True, True)


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(workers=2, timeout_s=1.5) as p:  # generous: the CI machine is shared
        yield p


def test_results_in_input_order_across_tasks(pool):
    add = get_task("addition")
    ds = add.dataset()
    recs = [ds[i] for i in range(30)]
    comps = [r["answer"] if i % 2 == 0 else "x" for i, r in enumerate(recs)]
    got = pool.score(add, recs, comps)
    assert [s.correct for s in got] == [i % 2 == 0 for i in range(30)]
    mixed = pool.score([Sleepy(), add], [{"i": 7}, recs[0]], ["ok", recs[0]["answer"]])
    assert mixed[0].reward == 7.0 and mixed[1].correct


def test_hang_raise_die_and_nonfinite_are_counted_errors(pool):
    task = Sleepy()
    comps = ["ok", "hang", "ok", "raise", "die", "nan", "ok", "hang", "ok"]
    recs = [{"i": i} for i in range(len(comps))]
    got = pool.score(task, recs, comps)
    for i, (c, s) in enumerate(zip(comps, got, strict=True)):
        if c == "ok":
            assert s == Score(float(i), True, True, None), (i, s)
        else:
            assert s.reward == 0.0 and not s.correct and s.error, (c, s)
    assert got[1].error.startswith("timeout") and got[7].error.startswith("timeout")
    assert got[3].error == "ValueError: bad"
    assert got[4].error == "worker died"
    assert "non-finite" in got[5].error
    assert count_errors(got) == {"timeout": 2, "ValueError": 1, "worker": 1, "verifier": 1}
    # the pool still works after killing and replacing workers
    assert pool.score(task, [{"i": 1}], ["ok"])[0].reward == 1.0


def test_workers_are_reused_between_calls(pool):
    task = Sleepy()
    pids = {s.reward for s in pool.score(task, [{}] * 20, ["pid"] * 20)}
    pids2 = {s.reward for s in pool.score(task, [{}] * 20, ["pid"] * 20)}
    assert len(pids) <= 2 and pids2 <= pids | pids2 and len(pids | pids2) <= 2
    assert os.getpid() not in pids


def test_task_of_a_local_class_runs_in_a_worker_under_the_time_limit():
    class Local(Task):  # plain pickle cannot send a class defined in a function
        name = "local"

        def verify(self, record, completion):
            while completion == "hang":
                pass
            return Score(float(os.getpid()), True, True)

    with VerifierPool(workers=1, timeout_s=1.0) as p:
        ok, hung = p.score(Local(), [{}, {}], ["x", "hang"])
        assert ok.error is None and ok.reward != float(os.getpid())  # scored in a worker
        assert hung.error.startswith("timeout") and hung.reward == 0.0


def test_task_that_cannot_be_serialised_is_refused_with_a_sentence():
    import threading

    class HoldsALock(Sleepy):
        def __init__(self):
            self.lock = threading.Lock()

    with VerifierPool(workers=1) as p:
        with pytest.raises(ValueError, match="cannot be sent to a verifier worker.*workers=0"):
            p.score(HoldsALock(), [{"i": 1}], ["ok"])
        assert p.score(Sleepy(), [{"i": 2}], ["ok"])[0].reward == 2.0  # the pool still works
    assert score_many(HoldsALock(), [{"i": 3}], ["ok"], workers=0)[0].reward == 3.0


class Hungry(Task):
    """Allocates 64 MB chunks (touching every page) until it fails; capped at 2 GB so that a
    missing limit makes the test fail instead of exhausting a shared machine."""

    name = "hungry"

    def verify(self, record, completion):
        if completion != "eat":
            return Score(1.0, True, True)
        chunks = [bytearray(64 << 20) for _ in range(32)]
        return Score(float(len(chunks) == 32), True, True)


def test_a_verifier_allocating_without_bound_is_stopped_and_scored_zero():
    with VerifierPool(workers=1, timeout_s=30.0, memory_mb=512) as p:
        first, eaten, after = p.score(Hungry(), [{}] * 3, ["ok", "eat", "ok"])
        assert first.reward == 1.0 and after.reward == 1.0 and after.error is None
        assert eaten.reward == 0.0 and eaten.error == "out of memory (limit 512 MB)"
        assert p.errors["out"] == 1 and count_errors([first, eaten, after]) == {"out": 1}
    with pytest.raises(ValueError, match="memory_mb"):
        VerifierPool(memory_mb=-1)


def test_inline_mode_and_argument_errors():
    add = get_task("addition")
    rec = add.dataset()[0]
    assert score_many(add, [rec], [rec["answer"]], workers=0)[0].correct
    with pytest.raises(ValueError, match="same length"):
        score_many(add, [rec], [], workers=0)
    with pytest.raises(ValueError, match="workers"):
        VerifierPool(workers=0)
    with pytest.raises(ValueError, match="timeout_s"):
        VerifierPool(timeout_s=0)
    with VerifierPool(workers=1) as p, pytest.raises(TypeError, match="tasks\\[0\\]"):
        p.score([object()], [rec], ["1"])


def test_timeout_is_enforced_promptly():
    with VerifierPool(workers=1, timeout_s=0.3) as p:
        p.score(Sleepy(), [{"i": 0}], ["ok"])  # start the worker first
        start = time.monotonic()
        s = p.score(Sleepy(), [{"i": 0}], ["hang"])[0]
        assert s.error.startswith("timeout") and time.monotonic() - start < 5.0


def test_concurrent_callers_get_their_own_results(pool):
    import threading

    task = Sleepy()
    out = {}

    def call(k):
        out[k] = pool.score(task, [{"i": k * 100 + j} for j in range(25)], ["ok"] * 25)

    threads = [threading.Thread(target=call, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(3):
        assert [s.reward for s in out[k]] == [float(k * 100 + j) for j in range(25)]


class FailsInWorker(Task):
    """Pickles fine but cannot be rebuilt in another process."""

    name = "fails_in_worker"

    def __init__(self):
        self.parent = os.getpid()

    def __setstate__(self, state):
        if os.getpid() != state["parent"]:
            raise RuntimeError("cannot load here")
        self.__dict__.update(state)

    def verify(self, record, completion):
        return Score(float(os.getpid() == self.parent), True, True)


def test_task_that_cannot_load_in_a_worker_is_refused_with_a_sentence(pool):
    with pytest.raises(ValueError, match="cannot be loaded in a verifier worker.*cannot load here"):
        pool.score(FailsInWorker(), [{}] * 5, ["x"] * 5)
    assert [s.reward for s in pool.score(Sleepy(), [{"i": 4}] * 3, ["ok"] * 3)] == [4.0] * 3
