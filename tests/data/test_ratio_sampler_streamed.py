"""RatioPreservingSampler.run_step_streamed: the same targets, filter, trim and fill as run_step,
fed by a stream of groups that finish one by one in a seeded random order."""

import collections

import numpy as np
import pytest

from jaxgrpo.data import Group, RatioPreservingSampler, is_filtered
from tests.data.test_ratio_sampler import MIXED, RATES, TASKS, MockGenerator, random_settings


class MockStream:
    """A continuous-batching engine: groups as ``MockGenerator``'s (a fixed-rate zero-advantage
    coin keyed by the uid); each ``finished()`` returns 1 to ``burst`` random outstanding ones.
    More than ``limit`` prompts or calls since ``start_step`` fail (a runaway loop)."""

    def __init__(self, rates, seed=0, order_seed=0, burst=3, limit=100_000):
        self.gen = MockGenerator(rates, seed=seed)
        self.rng = np.random.default_rng(order_seed)
        self.burst = burst
        self.limit = limit
        self.pending = []
        self.start_step()

    def submit(self, requests):
        self.submits.append(dict(requests))
        self.submitted += sum(requests.values())
        assert self.submitted <= self.limit, "runaway submits"
        self.pending += self.gen(requests)

    def finished(self):
        self.calls += 1
        assert self.calls <= self.limit, "runaway finished() calls"
        if not self.pending:
            return []
        n = int(self.rng.integers(1, min(self.burst, len(self.pending)) + 1))
        picked = set(self.rng.choice(len(self.pending), size=n, replace=False).tolist())
        out = [g for i, g in enumerate(self.pending) if i in picked]
        self.pending = [g for i, g in enumerate(self.pending) if i not in picked]
        self.returns.append(out)
        return out

    def cancel(self):
        n = len(self.pending)
        self.cancels.append(n)
        self.pending = []
        return n

    def start_step(self):
        self.submits, self.returns, self.cancels, self.calls, self.submitted = [], [], [], 0, 0


def per_task(groups):
    c = collections.Counter(g.task for g in groups)
    return {t: c.get(t, 0) for t in TASKS}


def check_stream_invariants(res, stream, rps):
    b = rps.batch_size
    uids = [g.uid for g in res.batch]
    assert len(set(uids)) == len(uids) <= b
    assert res.rounds == len(res.requests) == len(stream.submits) == len(res.accepted_counts)
    assert res.requests == stream.submits
    submitted = {t: sum(r[t] for r in res.requests) for t in TASKS}
    returned = per_task([g for out in stream.returns for g in out])
    assert res.generated == returned  # finished groups only
    assert {t: returned[t] + res.dropped[t] for t in TASKS} == submitted
    assert sum(submitted.values()) <= rps.max_rounds * rps.round_size
    assert sum(res.dropped.values()) == sum(stream.cancels) and len(stream.cancels) <= 1
    assert res.metrics()["rps/dropped"] == sum(res.dropped.values())
    counts = collections.Counter(g.task for g, p in zip(res.batch, res.padded, strict=True)
                                 if not p)
    assert {t: counts.get(t, 0) for t in TASKS} == res.realised_counts
    # accepted_counts[-1] is the step's final count, accepted_counts[i] was known at submit i+1.
    accepted = [g for out in stream.returns for g in out
                if not is_filtered(g.rewards, rps.filter)]
    assert res.accepted_counts[-1] == per_task(accepted)
    for a, b_ in zip(res.accepted_counts, res.accepted_counts[1:], strict=False):
        assert all(a[t] <= b_[t] for t in TASKS)


def is_short(have, n_accepted, res, rps, preserve=True):
    deficit = any(have[t] < res.targets[t] for t in TASKS)
    if not preserve:
        return n_accepted < rps.batch_size
    if rps.schedule == "paper":
        return deficit
    return deficit or n_accepted < rps.batch_size


def check_stops_as_soon_as_done(res, stream, rps, preserve=True):
    """Short after every finished() return but the last; not short after the last."""
    have, n = dict.fromkeys(TASKS, 0), 0
    states = []
    for out in stream.returns:
        for g in out:
            if not is_filtered(g.rewards, rps.filter):
                have[g.task] += 1
                n += 1
        states.append(is_short(have, n, res, rps, preserve))
    assert all(states[:-1])
    assert states[-1] == res.hit_cap


# ---- (1) exact counts whenever the cap is not hit ------------------------------------------


@pytest.mark.parametrize(("preset", "schedule"), [("mt_grpo", "paper"), ("mt_grpo", "code"),
                                                  ("grpo_rps", "paper"), ("dapo", "paper")])
def test_realised_counts_equal_targets_whenever_cap_not_hit(preset, schedule):
    b, capped, steps, cancelled = 24, 0, 0, 0
    for seed in range(12):
        rps = RatioPreservingSampler.from_preset(preset, TASKS, b, schedule=schedule, seed=seed)
        stream = MockStream(RATES, seed=seed, order_seed=100 + seed, burst=1 + seed % 4)
        rng = np.random.default_rng(seed)
        for _ in range(8):
            z = rng.dirichlet(np.ones(3) * 2.0) if preset == "mt_grpo" else None
            stream.start_step()
            res = rps.run_step_streamed(z, stream)
            steps += 1
            check_stream_invariants(res, stream, rps)
            check_stops_as_soon_as_done(res, stream, rps, preserve=preset != "dapo")
            assert sum(res.targets.values()) == b
            assert not any(is_filtered(g.rewards, "lenient") for g in res.batch)
            cancelled += sum(res.dropped.values()) > 0
            if res.hit_cap:
                capped += 1
                continue
            assert len(res.batch) == b
            if preset != "dapo":
                assert res.realised_counts == res.targets, (seed, res.targets)
    assert capped <= steps // 20  # the checks above are not vacuous
    assert cancelled > steps // 2  # in-flight prompts are dropped when the batch is complete


def test_results_are_a_function_of_seed_step_and_finish_order():
    def run(order_seed):
        rps = RatioPreservingSampler.from_preset("mt_grpo", TASKS, 16, seed=3)
        stream = MockStream(RATES, order_seed=order_seed)
        out = []
        for _ in range(5):
            res = rps.run_step_streamed([0.2, 0.3, 0.5], stream)
            out.append(([g.uid for g in res.batch], res.requests, res.targets, res.rho))
        return out

    assert run(0) == run(0)
    assert run(0) != run(1)  # the finish order changes what was generated and chosen
    assert [t for _, _, t, _ in run(0)] == [t for _, _, t, _ in run(1)]  # targets: (seed, step)


def test_random_configurations_keep_the_invariants():
    rng = np.random.default_rng(4)
    for trial in range(40):
        b = int(rng.integers(1, 20))
        kw = {**random_settings(rng), "stream_min_outstanding": int(rng.integers(0, 2 * b + 1))}
        rps = RatioPreservingSampler(TASKS, b, seed=trial, **kw)
        stream = MockStream({t: float(rng.uniform(0, 1)) for t in TASKS}, seed=trial,
                            order_seed=trial, burst=int(rng.integers(1, 5)))
        for _ in range(4):
            stream.start_step()
            res = rps.run_step_streamed(rng.dirichlet(np.ones(3)), stream)
            check_stream_invariants(res, stream, rps)
            check_stops_as_soon_as_done(res, stream, rps, preserve=kw["preserve_ratios"])
            assert all(0.0 <= v <= 1.0 for v in res.rho.values())
            for g, pad in zip(res.batch, res.padded, strict=True):
                assert pad == is_filtered(g.rewards, kw["filter"])
            if kw["target_mode"] != "scaled":
                assert sum(res.targets.values()) == b
                if kw["preserve_ratios"] and not res.hit_cap:
                    assert res.realised_counts == res.targets, kw
            if not res.hit_cap and kw["fill"] != "none":
                assert len(res.batch) == b or sum(res.targets.values()) < b


# ---- (2) fewer prompts than whole rounds ---------------------------------------------------


def mean_prompts_per_step(preset, streamed, steps=60, b=32):
    rps = RatioPreservingSampler.from_preset(preset, TASKS, b, seed=1)
    source = MockStream(RATES, order_seed=7) if streamed else MockGenerator(RATES)
    rng = np.random.default_rng(0)
    total, capped = 0, 0
    for _ in range(steps):
        z = rng.dirichlet(np.ones(3) * 2.0)
        res = rps.run_step_streamed(z, source) if streamed else rps.run_step(z, source)
        total += sum(sum(r.values()) for r in res.requests)  # submitted, cancelled included
        capped += res.hit_cap
    return total / steps, capped


@pytest.mark.parametrize("preset", ["mt_grpo", "dapo"])
def test_streaming_generates_fewer_prompts_than_rounds(preset):
    rounds, capped_r = mean_prompts_per_step(preset, streamed=False)
    streamed, capped_s = mean_prompts_per_step(preset, streamed=True)
    print(f"{preset}: prompts per step, round-based {rounds:.1f}, streamed {streamed:.1f}")
    assert capped_r == capped_s == 0
    # A round is 3B = 96 prompts; the stream submits about what the acceptance estimate needs.
    assert streamed < 0.8 * rounds


def test_first_submit_covers_the_targets_at_the_acceptance_estimate():
    rps = RatioPreservingSampler(TASKS, 20, target_mode="exact", stream_min_outstanding=0)
    rps.set_state({**rps.get_state(), "rho": {"countdown": 0.1, "zebra": 0.5, "arc": 0.9}})
    stream = MockStream(RATES)
    res = rps.run_step_streamed([0.2, 0.3, 0.5], stream)
    # targets [4, 6, 10], m = [1/0.9, 2, 5 (capped)]: ceil(n*m) = [5, 12, 50]
    assert res.targets == {"countdown": 4, "zebra": 6, "arc": 10}
    assert stream.submits[0] == {"countdown": 5, "zebra": 12, "arc": 50}
    # Later submits top up the deficit's share only: a task with no deficit gets nothing.
    for r in range(1, res.rounds):
        for t in TASKS:
            if res.accepted_counts[r - 1][t] >= res.targets[t]:
                assert res.requests[r][t] == 0


def test_min_outstanding_keeps_the_engine_busy():
    def first_and_dropped(k):
        rps = RatioPreservingSampler(TASKS, 30, target_mode="exact", max_inflation=1.0,
                                     stream_min_outstanding=k, seed=2)
        dropped, first = 0, []
        for _ in range(10):
            stream = MockStream({t: 0.3 for t in TASKS}, order_seed=1)
            res = rps.run_step_streamed(None, stream)
            assert res.realised_counts == res.targets
            first.append(sum(res.requests[0].values()))
            dropped += sum(res.dropped.values())
        return first, dropped

    first, dropped_0 = first_and_dropped(0)
    assert first[0] == 30  # AAS off, rho 0: the targets exactly
    first, dropped_60 = first_and_dropped(60)
    assert min(first) >= 60
    assert dropped_60 > dropped_0  # the trade-off: more in flight, more dropped at the end


# ---- (3) the budget cap ----------------------------------------------------------------------


@pytest.mark.parametrize("fill", ["accepted", "pad", "none"])
def test_budget_cap_with_a_task_that_is_always_filtered(fill):
    b = 12
    rps = RatioPreservingSampler(TASKS, b, target_mode="exact", max_rounds=3, fill=fill, seed=2)
    stream = MockStream({"countdown": 0.2, "zebra": 0.2, "arc": 1.0})
    res = rps.run_step_streamed(None, stream)
    check_stream_invariants(res, stream, rps)
    check_stops_as_soon_as_done(res, stream, rps)
    assert res.hit_cap
    assert sum(sum(r.values()) for r in res.requests) == 3 * rps.round_size == 108
    assert res.dropped == dict.fromkeys(TASKS, 0) and stream.cancels == []
    assert res.targets == {"countdown": 4, "zebra": 4, "arc": 4}
    assert res.realised_counts["arc"] == 0
    n_acc = sum(res.accepted_counts[-1].values())
    assert 8 <= n_acc < b  # prompts went to arc's deficit only, once the others were met
    if fill == "none":
        assert res.realised_counts == {"countdown": 4, "zebra": 4, "arc": 0}
    elif fill == "accepted":  # every accepted group, short of B
        assert len(res.batch) == n_acc and not any(res.padded)
    else:  # padded to B with filtered groups
        assert len(res.batch) == b and sum(res.padded) == b - n_acc


def test_exp2_code_preset_preserves_from_the_tenth_step_counted_from_one():
    # arc is always filtered: B accepted suffice without preservation, with it the budget of
    # two rounds is spent chasing arc's deficit.
    rps = RatioPreservingSampler.from_preset("mt_grpo_exp2_code", TASKS, 12, seed=0)
    stream = MockStream({"countdown": 0.0, "zebra": 0.0, "arc": 1.0})
    capped, spent = [], []
    for _ in range(12):
        stream.start_step()
        res = rps.run_step_streamed(None, stream)
        check_stream_invariants(res, stream, rps)
        capped.append(res.hit_cap)
        spent.append(stream.submitted)
    assert capped == [False] * 9 + [True] * 3
    assert spent[9:] == [2 * rps.round_size] * 3 and max(spent[:9]) < 2 * rps.round_size


# ---- (4) rho: one EMA step per streamed step ---------------------------------------------------


def test_rho_is_one_ema_step_per_step_over_the_finished_groups():
    d = 0.8
    rps = RatioPreservingSampler.from_preset("mt_grpo", TASKS, 16, rho_decay=d, seed=5)
    stream = MockStream(RATES, order_seed=3)
    rho = dict.fromkeys(TASKS, 0.0)
    dropped = 0
    for _ in range(6):
        stream.start_step()
        res = rps.run_step_streamed([0.3, 0.3, 0.4], stream)
        # The inflation is the one of the step's start throughout it.
        assert res.inflation == pytest.approx({t: min(1 / (1 - rho[t]), 5.0) for t in TASKS},
                                              rel=1e-12)
        done = [g for out in stream.returns for g in out]
        dropped += sum(res.dropped.values())
        for t in TASKS:
            mine = [g for g in done if g.task == t]
            if mine:
                frac = sum(is_filtered(g.rewards, "lenient") for g in mine) / len(mine)
                rho[t] = d * rho[t] + (1 - d) * frac
            assert res.rho[t] == pytest.approx(rho[t], abs=1e-12)
            assert rps.rho[TASKS.index(t)] == pytest.approx(rho[t], abs=1e-12)
    assert dropped > 0  # cancelled groups were there to be (wrongly) counted


# ---- (5) validation --------------------------------------------------------------------------


class BadStream(MockStream):
    def __init__(self, mutate):
        super().__init__({t: 0.0 for t in TASKS})
        self.mutate = mutate

    def finished(self):
        return self.mutate(super().finished())


@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (lambda gs: [Group("ppo", "x", MIXED)], ValueError, "unknown task 'ppo'"),
        (lambda gs: [Group(gs[0].task, "u", MIXED)] * 2, ValueError, "uid 'u' twice"),
        (lambda gs: [Group("arc", f"arc-{i}", MIXED) for i in range(99)], ValueError,
         "returned 99 groups of task 'arc', but only"),
        (lambda gs: [], ValueError, "no group while"),
        (lambda gs: [object()], TypeError, "Group objects"),
    ],
)
def test_stream_validation(mutate, error, match):
    rps = RatioPreservingSampler(TASKS, 8, seed=0)
    with pytest.raises(error, match=match) as info:
        rps.run_step_streamed(None, BadStream(mutate))
    assert "\n" not in str(info.value)
    assert rps.step == 0 and rps.rho.tolist() == [0.0, 0.0, 0.0]  # nothing was advanced


def test_stream_cancel_count_is_checked():
    class Liar(MockStream):
        def cancel(self):
            super().cancel()
            return 0

    rps = RatioPreservingSampler(TASKS, 8, stream_min_outstanding=8, seed=0)
    with pytest.raises(ValueError, match=r"stream.cancel\(\) dropped 0 prompts, but"):
        rps.run_step_streamed(None, Liar(RATES))


@pytest.mark.parametrize(("value", "error"), [(-1, ValueError), (1.5, TypeError)])
def test_min_outstanding_validation(value, error):
    with pytest.raises(error, match="stream_min_outstanding"):
        RatioPreservingSampler(TASKS, 8, stream_min_outstanding=value)
    assert RatioPreservingSampler(TASKS, 9).stream_min_outstanding == 4


# ---- (6) GRPO: one submit of exactly B -------------------------------------------------------


def test_grpo_preset_is_one_submit_of_the_targets_and_nothing_cancelled():
    b = 10
    rps = RatioPreservingSampler.from_preset("grpo", TASKS, b)
    stream = MockStream(RATES)
    for _ in range(10):
        stream.start_step()
        res = rps.run_step_streamed(None, stream)
        check_stream_invariants(res, stream, rps)
        assert res.rounds == 1 and not res.hit_cap
        assert stream.submits == [res.targets] == [{"countdown": 4, "zebra": 3, "arc": 3}]
        assert res.realised_counts == res.targets and len(res.batch) == b
        assert res.dropped == dict.fromkeys(TASKS, 0) and stream.cancels == []
        assert stream.pending == []
    assert rps.rho.tolist() == [0.0, 0.0, 0.0]
