"""TaskSampler and largest_remainder: exact counts, host sharding, determinism, checkpointing."""

import collections
import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from jaxgrpo.data import Item, TaskSampler, largest_remainder

SIZES = {"countdown": 7, "zebra": 13, "arc": 50}
RATIOS = {"countdown": 0.5, "zebra": 0.3, "arc": 0.2}


def make_sources(sizes=SIZES):
    return {t: [{"task": t, "i": i} for i in range(n)] for t, n in sizes.items()}


def make(process_index=0, process_count=1, global_batch=12, seed=3, ratios=RATIOS, **kw):
    return TaskSampler(make_sources(kw.pop("sizes", SIZES)), ratios, global_batch=global_batch,
                       seed=seed, process_index=process_index, process_count=process_count)


def keys(batch):
    return [(it.task, it.index, it.uid) for it in batch]


# ---- largest_remainder ---------------------------------------------------------------------


def test_largest_remainder_hand_examples():
    assert largest_remainder({"a": 0.5, "b": 0.3, "c": 0.2}, 7) == {"a": 4, "b": 2, "c": 1}
    assert largest_remainder([1 / 3] * 3, 4) == [2, 1, 1]  # three-way tie: first task wins
    assert largest_remainder([1 / 3] * 3, 5) == [2, 2, 1]
    assert largest_remainder([0.3, 0.3, 0.4], 5) == [2, 1, 2]  # 1.5/1.5/2.0: tie to the first
    assert largest_remainder([0.0, 1.0], 3) == [0, 3]
    assert largest_remainder([0.25, 0.75], 0) == [0, 0]


def _reference(ratios, total):
    """Loop reference with exact rational arithmetic."""
    from fractions import Fraction

    fr = [Fraction(r).limit_denominator(10**9) for r in ratios]
    s = sum(fr)
    shares = [f / s * total for f in fr]
    counts = [math.floor(x) for x in shares]
    left = total - sum(counts)
    order = sorted(range(len(fr)), key=lambda k: (-(shares[k] - counts[k]), k))
    for k in order[:left]:
        counts[k] += 1
    return counts


def test_largest_remainder_properties_random():
    rng = np.random.default_rng(0)
    for trial in range(300):
        k = int(rng.integers(1, 9))
        # Mix continuous weights with grid weights (which create exact ties).
        w = rng.dirichlet(np.ones(k)) if trial % 2 else rng.integers(0, 4, size=k) + 0.0
        if w.sum() == 0:
            w[0] = 1.0
        w = w / w.sum()
        total = int(rng.integers(0, 200))
        counts = largest_remainder(list(w), total)
        assert sum(counts) == total
        assert all(c >= 0 for c in counts)
        assert all(abs(c - r * total) < 1 for c, r in zip(counts, w, strict=True))
        if trial % 2 == 0:  # grid weights: compare with the exact-arithmetic reference
            assert counts == _reference(list(w), total)
        # Deterministic, and a mapping gives the same numbers.
        assert largest_remainder(list(w), total) == counts
        named = largest_remainder({f"t{i}": x for i, x in enumerate(w)}, total)
        assert list(named.values()) == counts


@pytest.mark.parametrize(
    ("ratios", "total", "exc", "match"),
    [
        ([0.5, 0.6], 4, ValueError, "sum to 1"),
        ([0.5, 0.4], 4, ValueError, "sum to 1"),
        ([1.5, -0.5], 4, ValueError, "non-negative"),
        ([], 4, ValueError, "non-empty"),
        ([float("nan"), 1.0], 4, ValueError, "finite"),
        ([1.0], -1, ValueError, "total"),
        ([1.0], 2.0, TypeError, "total"),
    ],
)
def test_largest_remainder_rejects_bad_input(ratios, total, exc, match):
    with pytest.raises(exc, match=match):
        largest_remainder(ratios, total)


# ---- exact counts and determinism ----------------------------------------------------------


def test_targets_and_1000_steps_of_exact_counts_on_two_hosts():
    hosts = [make(h, 2) for h in range(2)]
    targets = hosts[0].targets
    assert targets == largest_remainder(RATIOS, 12) == {"countdown": 6, "zebra": 4, "arc": 2}
    for _ in range(1000):
        batches = [s.next_batch() for s in hosts]
        assert [len(b) for b in batches] == [6, 6]
        got = collections.Counter(it.task for b in batches for it in b)
        assert dict(got) == targets
        for b in batches:  # every host holds floor or ceil of each task's half
            local = collections.Counter(it.task for it in b)
            for t, n in targets.items():
                assert local[t] in (n // 2, -(-n // 2))


def test_uneven_split_across_four_hosts_is_balanced_and_exact():
    ratios = {"countdown": 0.45, "zebra": 0.35, "arc": 0.2}
    hosts = [make(h, 4, global_batch=20, ratios=ratios) for h in range(4)]
    for _ in range(50):
        batches = [s.next_batch() for s in hosts]
        assert {len(b) for b in batches} == {5}
        got = collections.Counter(it.task for b in batches for it in b)
        assert dict(got) == hosts[0].targets == {"countdown": 9, "zebra": 7, "arc": 4}
        uids = [it.uid for b in batches for it in b]
        assert len(set(uids)) == len(uids)


def test_items_are_records_of_their_source():
    s = make()
    src = make_sources()
    for it in s.next_batch() + s.next_batch():
        assert isinstance(it, Item)
        assert it.record == src[it.task][it.index]
        assert it.uid == f"{it.task}@{it.position}"


def test_deterministic_from_seed_and_step():
    a, b, c = make(), make(), make(seed=4)
    seq_a = [keys(a.next_batch()) for _ in range(20)]
    assert seq_a == [keys(b.next_batch()) for _ in range(20)]
    assert seq_a != [keys(c.next_batch()) for _ in range(20)]


def test_task_streams_do_not_depend_on_other_tasks():
    """A task's stream is a function of (seed, task name): adding a task leaves it unchanged."""
    a = make(global_batch=10, ratios=None, sizes={"x": 9, "y": 5})
    b = make(global_batch=10, ratios=None, sizes={"z": 3, "x": 9, "y": 5})
    xa = [it.index for _ in range(10) for it in a.draw({"x": 2}) if it.task == "x"]
    xb = [it.index for _ in range(10) for it in b.draw({"x": 2}) if it.task == "x"]
    assert xa == xb


# ---- sharding: no duplicates, no gaps ------------------------------------------------------


def test_two_hosts_see_each_record_exactly_once_per_epoch():
    hosts = [make(h, 2) for h in range(2)]
    seen = [collections.defaultdict(list) for _ in range(2)]  # host -> (task, epoch) -> indices
    for _ in range(300):
        for h, s in enumerate(hosts):
            for it in s.next_batch():
                seen[h][(it.task, it.position // SIZES[it.task])].append(it.index)
    for task, n in SIZES.items():
        epochs = 300 * hosts[0].targets[task] // n
        assert epochs >= 10
        for e in range(epochs):  # complete epochs: each record exactly once over both hosts
            both = seen[0][(task, e)] + seen[1][(task, e)]
            assert sorted(both) == list(range(n)), (task, e)
        # Epochs are reshuffled.
        orders = {tuple(seen[0][(task, e)] + seen[1][(task, e)]) for e in range(epochs)}
        assert len(orders) > 1


def test_global_stream_is_the_same_for_any_host_count():
    """The union of all hosts' items equals the single-host batch, whatever the host count."""
    for p in (2, 3, 4, 6):
        hosts = [make(h, p, global_batch=12) for h in range(p)]
        ref = make(0, 1, global_batch=12)
        for _ in range(30):
            union = sorted(k for s in hosts for k in keys(s.next_batch()))
            assert union == sorted(keys(ref.next_batch()))


def test_variable_draws_across_hosts():
    hosts = [make(h, 2) for h in range(2)]
    rng = np.random.default_rng(1)
    drawn = collections.Counter()
    for _ in range(200):
        counts = {t: int(rng.integers(0, 7)) for t in SIZES}
        if sum(counts.values()) % 2:
            counts["arc"] += 1
        batches = [s.draw(counts) for s in hosts]
        assert [len(b) for b in batches] == [sum(counts.values()) // 2] * 2
        items = batches[0] + batches[1]
        assert collections.Counter(it.task for it in items) == +collections.Counter(counts)
        for it in items:
            drawn[(it.task, it.position)] += 1
    # Every position was drawn once, and the drawn positions of a task are a prefix of its
    # stream (no gaps).
    assert all(v == 1 for v in drawn.values())
    for t in SIZES:
        got = {p for (task, p) in drawn if task == t}
        assert got == set(range(hosts[0].get_state()["tasks"][t]["cursor"]))


# ---- checkpointing -------------------------------------------------------------------------


def test_save_mid_run_and_restore_gives_identical_next_100_batches():
    for h in range(2):
        s = make(h, 2)
        for _ in range(37):
            s.next_batch()
        s.draw({"countdown": 3, "zebra": 1})  # a variable draw in the history
        state = json.loads(json.dumps(s.get_state()))
        expected = [keys(s.next_batch()) for _ in range(100)]
        restored = make(h, 2)
        restored.next_batch()  # some other position: set_state must overwrite everything
        restored.set_state(state)
        assert [keys(restored.next_batch()) for _ in range(100)] == expected


def test_state_restores_onto_a_different_host_count():
    one = make(0, 1)
    for _ in range(11):
        one.next_batch()
    state = one.get_state()
    ref = [sorted(keys(one.next_batch())) for _ in range(20)]
    two = [make(h, 2) for h in range(2)]
    for s in two:
        s.set_state(state)
    got = [sorted(keys(two[0].next_batch()) + keys(two[1].next_batch())) for _ in range(20)]
    assert got == ref


def test_set_state_rejects_mismatches():
    state = make().get_state()
    with pytest.raises(ValueError, match="seed"):
        make(seed=9).set_state(state)
    with pytest.raises(ValueError, match="records"):
        make(sizes={"countdown": 8, "zebra": 13, "arc": 50}).set_state(state)
    with pytest.raises(ValueError, match="tasks"):
        make(ratios=None, sizes={"countdown": 7, "zebra": 13}).set_state(state)
    with pytest.raises(ValueError, match="get_state"):
        make().set_state({"step": 3})
    bad = json.loads(json.dumps(state))
    bad["tasks"]["arc"]["returned"] = []  # as earlier versions saved it: accepted
    make().set_state(bad)
    bad["tasks"]["arc"]["returned"] = [0]
    with pytest.raises(ValueError, match="returned positions"):  # a give-back: not served
        make().set_state(bad)


# ---- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(ratios={"countdown": 0.5, "zebra": 0.3, "arc": 0.3}), ValueError, "sum to 1"),
        (dict(ratios={"countdown": 0.5, "zebra": 0.5, "math": 0.0}), ValueError, "unknown"),
        (dict(ratios={"countdown": 0.5, "zebra": 0.5}), ValueError, "lack"),
        (dict(ratios=[0.5, 0.5]), ValueError, "3 tasks"),
        (dict(process_count=5), ValueError, "divide by process_count"),
        (dict(process_index=2, process_count=2), ValueError, "process_index"),
        (dict(global_batch=0), ValueError, "global_batch"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(seed=1.5), TypeError, "seed"),
        (dict(sizes={"countdown": 7, "zebra": 0, "arc": 50}), ValueError, "empty"),
    ],
)
def test_constructor_validation(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        make(**kwargs)


def test_draw_validation():
    s = make(0, 2)
    with pytest.raises(ValueError, match="unknown"):
        s.draw({"math": 2})
    with pytest.raises(ValueError, match="e.g. 4"):
        s.draw({"arc": 3})
    with pytest.raises(ValueError, match=">= 0"):
        s.draw({"arc": -2})
    with pytest.raises(TypeError, match="counts"):
        s.draw({"arc": 2.0})
    with pytest.raises(ValueError, match="non-empty mapping"):
        TaskSampler({}, None, global_batch=2, seed=0)


def test_importing_the_samplers_loads_neither_jax_nor_grain():
    code = (
        "import sys, jaxgrpo.data\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'jax', 'jaxlib', 'grain'}))"
    )
    root = pathlib.Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_host_shares_sum_to_counts_and_equal_local_sizes():
    s = make(0, 3, global_batch=12)
    for a in range(13):
        counts = {"arc": a, "zebra": 12 - a}
        shares = s.host_shares(counts)
        assert shares.sum(axis=1).tolist() == [0, counts["zebra"], counts["arc"]]
        assert set(shares.sum(axis=0).tolist()) == {4}
        assert shares.max(axis=1).tolist() == [0, -(-(12 - a) // 3), -(-a // 3)]
