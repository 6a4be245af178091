"""RatioPreservingSampler (MT-GRPO, arXiv 2602.05547 §5, Alg. 2): exact targets, rounds, cap and
fill, presets, state."""

import collections
import json
import zlib

import numpy as np
import pytest

from jaxgrpo.data import (
    FILTERS,
    PRESETS,
    Group,
    RatioPreservingSampler,
    TaskSampler,
    is_filtered,
    largest_remainder,
)

TASKS = ("countdown", "zebra", "arc")
RATES = {"countdown": 0.1, "zebra": 0.5, "arc": 0.85}
MIXED = (1.0, 0.0, 0.1, 0.0)  # non-zero advantage, one correct rollout


class MockGenerator:
    """Groups whose zero-advantage outcome is a fixed-rate coin flip keyed by the prompt uid.

    Prompts come from a TaskSampler, so the generator's whole state is that sampler's state.
    """

    def __init__(self, rates, seed=0, sizes=100):
        self.rates = dict(rates)
        self.seed = seed
        self.prompts = TaskSampler({t: [{"t": t, "i": i} for i in range(sizes)] for t in rates},
                                   None, global_batch=len(rates), seed=seed)
        self.calls = []

    def __call__(self, requests):
        self.calls.append(dict(requests))
        groups = []
        for item in self.prompts.draw(requests):
            u = np.random.default_rng([self.seed, zlib.crc32(item.uid.encode())]).random()
            if u < self.rates[item.task]:
                rewards = (1.0,) * 4 if u < self.rates[item.task] / 2 else (0.0,) * 4
            else:
                rewards = MIXED
            groups.append(Group(item.task, item.uid, rewards, payload=item.index))
        return groups


def check_batch_invariants(res, b):
    uids = [g.uid for g in res.batch]
    assert len(set(uids)) == len(uids)
    assert len(res.batch) <= b
    assert res.rounds == len(res.requests) >= 1
    counts = collections.Counter(g.task for g, p in zip(res.batch, res.padded, strict=True)
                                 if not p)
    assert {t: counts.get(t, 0) for t in res.targets} == res.realised_counts
    order = [TASKS.index(g.task) for g in res.batch]
    assert order == sorted(order)


# ---- the "done when" check ----------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["paper", "code"])
def test_realised_counts_equal_targets_whenever_cap_not_hit(schedule):
    b = 32
    rps = RatioPreservingSampler.from_preset("mt_grpo", TASKS, b, schedule=schedule, seed=1)
    gen = MockGenerator(RATES)
    rng = np.random.default_rng(0)
    capped, rounds = 0, []
    for _ in range(150):
        z = rng.dirichlet(np.ones(3) * 2.0)  # weights that change every step
        res = rps.run_step(z, gen)
        check_batch_invariants(res, b)
        assert sum(res.targets.values()) == b
        assert not any(is_filtered(g.rewards, "lenient") for g in res.batch)
        rounds.append(res.rounds)
        if res.hit_cap:
            capped += 1
            assert res.rounds == 10
        else:
            assert res.realised_counts == res.targets
            assert len(res.batch) == b
        assert res.metrics()["rps/rounds"] == res.rounds
    assert capped <= 3  # the check above is not vacuous
    assert max(rounds) >= 2 and min(rounds) == 1  # resampling happens and is reported
    # rho tracks the per-round filtered fraction (EMA 0.9 of noisy rates).
    for t, rate in RATES.items():
        assert abs(rps.rho[TASKS.index(t)] - rate) < 0.2


def test_acceptance_aware_sampling_needs_fewer_rounds():
    """Paper App. D.4 / Fig. 16: without the m_k inflation, mean resampling rounds rise."""
    mean_rounds = {}
    for m_acc in (1.0, 5.0):
        rps = RatioPreservingSampler(TASKS, 32, max_inflation=m_acc, seed=1)
        gen = MockGenerator(RATES)
        rng = np.random.default_rng(0)
        rounds = [rps.run_step(rng.dirichlet(np.ones(3) * 2.0), gen).rounds for _ in range(80)]
        mean_rounds[m_acc] = np.mean(rounds)
    assert mean_rounds[5.0] < mean_rounds[1.0]


def test_first_round_requests_follow_inflated_weights():
    """AAS: round 1 draws from z_k*m_k / sum, m_k = min(1/(1-rho_k), M_acc) (Alg. 2)."""
    rps = RatioPreservingSampler(TASKS, 20, draw_mode="exact", max_inflation=5.0)
    rps.set_state({**rps.get_state(), "rho": {"countdown": 0.1, "zebra": 0.5, "arc": 0.9}})
    m = np.array([1 / 0.9, 2.0, 5.0])  # 1/(1-0.9) = 10 is capped at 5
    np.testing.assert_allclose(rps.inflation(), m, rtol=1e-12)
    z = np.array([0.2, 0.3, 0.5])
    gen = MockGenerator(RATES)
    res = rps.run_step(z, gen)
    p = z * m / (z * m).sum()
    assert gen.calls[0] == dict(zip(TASKS, largest_remainder(list(p), 60), strict=True))
    assert res.inflation == dict(zip(TASKS, m.tolist(), strict=True))


def test_paper_schedule_resamples_only_deficient_tasks():
    """Paper Alg. 2 line 7: extra rounds draw from def_k*m_k, so only short tasks get prompts."""
    rps = RatioPreservingSampler(TASKS, 16, schedule="paper", seed=3)
    gen = MockGenerator({"countdown": 0.3, "zebra": 0.6, "arc": 0.9})
    extra_rounds = 0
    for _ in range(30):
        res = rps.run_step([0.3, 0.3, 0.4], gen)
        for r in range(1, res.rounds):
            extra_rounds += 1
            for t in TASKS:
                deficit = res.targets[t] - res.accepted_counts[r - 1][t]
                if deficit <= 0:
                    assert res.requests[r][t] == 0
            assert sum(res.requests[r].values()) == rps.round_size
        # It stops at the first round after which no task is short (or at the cap).
        last = res.accepted_counts[-1]
        assert res.hit_cap or all(last[t] >= res.targets[t] for t in TASKS)
        for r in range(res.rounds - 1):
            assert any(res.accepted_counts[r][t] < res.targets[t] for t in TASKS)
    assert extra_rounds > 0


def test_code_schedule_uses_base_distribution_while_total_short():
    """Code schedule: while fewer than B accepted, rounds draw from z*m for every task."""
    rps = RatioPreservingSampler(TASKS, 30, schedule="code", oversample=1.0, draw_mode="exact",
                                 max_inflation=1.0, seed=3)
    gen = MockGenerator({"countdown": 0.6, "zebra": 0.6, "arc": 0.6})
    res = rps.run_step(None, gen)
    assert res.rounds >= 2
    assert res.requests[1] == {"countdown": 10, "zebra": 10, "arc": 10}


def test_round_sizes_respect_round_multiple():
    rps = RatioPreservingSampler(TASKS, 10, oversample=3.0, round_multiple=4)
    assert rps.round_size == 32
    rps = RatioPreservingSampler(TASKS, 10, oversample=1.25, round_multiple=1)
    assert rps.round_size == 13


def test_rho_is_a_per_round_ema_of_filtered_fractions():
    """Loop reference: rho_k <- d*rho_k + (1-d)*filtered_k/generated_k per round (the released code)."""
    d = 0.9
    rps = RatioPreservingSampler(TASKS, 16, rho_decay=d, seed=9)
    gen = MockGenerator(RATES)
    rho = dict.fromkeys(TASKS, 0.0)
    for _ in range(25):
        res = rps.run_step([0.2, 0.3, 0.5], gen)
        prev = dict.fromkeys(TASKS, 0)
        for req, acc in zip(res.requests, res.accepted_counts, strict=True):
            for t in TASKS:
                if req[t] > 0:
                    filtered = req[t] - (acc[t] - prev[t])
                    rho[t] = d * rho[t] + (1 - d) * filtered / req[t]
            prev = acc
        for t in TASKS:
            assert res.rho[t] == pytest.approx(rho[t], abs=1e-12)
            assert rps.rho[TASKS.index(t)] == pytest.approx(rho[t], abs=1e-12)


def random_settings(rng) -> dict:
    """A random combination of every sampler setting (the invariant tests draw many)."""
    return dict(
        target_mode=str(rng.choice(["multinomial", "exact", "scaled"])),
        draw_mode=str(rng.choice(["multinomial", "exact"])),
        oversample=float(rng.choice([1.0, 1.5, 3.0])),
        max_inflation=float(rng.choice([1.0, 5.0])),
        max_rounds=int(rng.integers(1, 5)),
        schedule=str(rng.choice(["paper", "code"])),
        filter=str(rng.choice(["strict", "lenient", "lenient_code", "none"])),
        preserve_ratios=bool(rng.integers(2)),
        fill=str(rng.choice(["accepted", "pad", "none"])),
        round_multiple=int(rng.integers(1, 4)),
    )


def test_random_configurations_keep_the_invariants():
    rng = np.random.default_rng(4)
    for trial in range(40):
        k = int(rng.integers(1, 5))
        tasks = tuple(f"t{i}" for i in range(k))
        b = int(rng.integers(1, 20))
        kw = random_settings(rng)
        rps = RatioPreservingSampler(tasks, b, seed=trial, **kw)
        gen = MockGenerator({t: float(rng.uniform(0, 1)) for t in tasks}, seed=trial)
        for _ in range(4):
            res = rps.run_step(rng.dirichlet(np.ones(k)), gen)
            uids = [g.uid for g in res.batch]
            assert len(set(uids)) == len(uids) <= b, kw
            assert 1 <= res.rounds <= kw["max_rounds"]
            assert all(sum(r.values()) == rps.round_size for r in res.requests)
            assert rps.round_size % kw["round_multiple"] == 0
            assert rps.round_size >= kw["oversample"] * b - 1e-9
            assert all(0.0 <= v <= 1.0 for v in res.rho.values())
            assert any(res.padded) <= (kw["fill"] == "pad")
            for g, pad in zip(res.batch, res.padded, strict=True):
                assert pad == is_filtered(g.rewards, kw["filter"])
            if kw["target_mode"] != "scaled":
                assert sum(res.targets.values()) == b
                if kw["preserve_ratios"] and not res.hit_cap:
                    assert res.realised_counts == res.targets, kw
            if not res.hit_cap and kw["fill"] != "none":
                assert len(res.batch) == b or sum(res.targets.values()) < b


def test_two_hosts_share_one_global_rps_step():
    """Multi-host use: every host runs the same RPS on the global groups; each TaskSampler
    draws its host's equal share, and no prompt is drawn twice."""
    hosts = [TaskSampler({t: [{"i": i} for i in range(30)] for t in TASKS}, None,
                         global_batch=6, seed=0, process_index=h, process_count=2)
             for h in range(2)]
    local = {0: [], 1: []}

    def generate(requests):
        groups = []
        for h, s in enumerate(hosts):  # in a real run each host does its part, then allgather
            items = s.draw(requests)
            local[h].append(len(items))
            groups += [Group(it.task, it.uid, MIXED if it.index % 3 else (0.0,) * 4)
                       for it in items]
        return groups

    rps = RatioPreservingSampler(TASKS, 10, round_multiple=2, seed=0)
    assert rps.round_size == 30
    uids = []
    for _ in range(5):
        res = rps.run_step([0.5, 0.25, 0.25], generate)
        uids += [g.uid for g in res.batch]
        if not res.hit_cap:
            assert res.realised_counts == res.targets
    assert local[0] == local[1] and set(local[0]) == {15}
    assert len(set(uids)) == len(uids)


# ---- round cap and fill policies -----------------------------------------------------------


def impossible():
    """arc is always filtered: its target can never be met, so every step hits the cap."""
    return MockGenerator({"countdown": 0.2, "zebra": 0.2, "arc": 1.0})


@pytest.mark.parametrize("fill", ["accepted", "pad", "none"])
def test_cap_hit_fill_policies(fill):
    b = 12
    rps = RatioPreservingSampler(TASKS, b, target_mode="exact", max_rounds=3, fill=fill, seed=2)
    res = rps.run_step(None, impossible())
    check_batch_invariants(res, b)
    assert res.hit_cap and res.rounds == 3
    assert res.targets == {"countdown": 4, "zebra": 4, "arc": 4}
    assert res.realised_counts["arc"] == 0
    if fill == "none":  # strict ratios: no task above its target, batch short
        assert res.realised_counts == {"countdown": 4, "zebra": 4, "arc": 0}
        assert len(res.batch) == 8 and not any(res.padded)
    elif fill == "accepted":  # topped up to B from the other tasks' accepted groups
        assert len(res.batch) == b and not any(res.padded)
        assert res.realised_counts["countdown"] + res.realised_counts["zebra"] == b
        assert min(res.realised_counts["countdown"], res.realised_counts["zebra"]) >= 4
    else:  # pad: the accepted fill, same as above; pads only if accepted groups run out
        assert len(res.batch) == b


def test_pad_fill_when_too_few_groups_pass_the_filter():
    b = 12
    gen = MockGenerator({"countdown": 0.97, "zebra": 0.97, "arc": 1.0})
    for fill in ("accepted", "pad"):
        rps = RatioPreservingSampler(TASKS, b, max_rounds=2, fill=fill, seed=5)
        res = rps.run_step(None, gen)
        assert res.hit_cap
        n_acc = len(res.accepted)
        assert n_acc < b
        if fill == "accepted":  # the code's behaviour: train on the short batch
            assert len(res.batch) == n_acc and not any(res.padded)
        else:
            assert len(res.batch) == b and sum(res.padded) == b - n_acc
            for g, pad in zip(res.batch, res.padded, strict=True):
                assert pad == is_filtered(g.rewards, "lenient")
            assert res.metrics()["rps/num_padded"] == b - n_acc


# ---- GRPO and DAPO as settings ---------------------------------------------------------------


def test_grpo_preset_is_fixed_ratios_one_round_no_filter():
    b = 10
    rps = RatioPreservingSampler.from_preset("grpo", TASKS, b)
    gen = MockGenerator(RATES)
    zero_adv_in_batch = 0
    for _ in range(20):
        res = rps.run_step(None, gen)
        assert res.rounds == 1 and not res.hit_cap
        assert gen.calls[-1] == res.targets == {"countdown": 4, "zebra": 3, "arc": 3}
        assert res.realised_counts == res.targets and len(res.batch) == b
        assert sum(res.filtered.values()) == 0
        # Zero-advantage groups stay in the batch (plain GRPO does not filter).
        n_zero = sum(is_filtered(g.rewards, "lenient") for g in res.batch)
        assert n_zero == sum(res.zero_adv_rates[t] * res.generated[t] for t in TASKS)
        zero_adv_in_batch += n_zero
    assert zero_adv_in_batch > 0
    assert rps.rho.tolist() == [0.0, 0.0, 0.0]


def test_dapo_preset_drops_zero_advantage_and_regenerates_until_b():
    b = 16
    rps = RatioPreservingSampler.from_preset("dapo", TASKS, b, seed=7)
    gen = MockGenerator({"countdown": 0.8, "zebra": 0.85, "arc": 0.9})
    multi = 0
    for _ in range(40):
        res = rps.run_step(None, gen)
        check_batch_invariants(res, b)
        assert not any(is_filtered(g.rewards, "lenient") for g in res.batch)
        assert not res.hit_cap and len(res.batch) == b
        multi += res.rounds > 1
        # Rounds run exactly until B groups in total pass; the per-task mix is not enforced.
        totals = [sum(c.values()) for c in res.accepted_counts]
        assert all(t < b for t in totals[:-1]) and totals[-1] >= b
        # Every round draws 3B prompts from the uniform weights, AAS off.
        assert all(sum(r.values()) == 3 * b for r in res.requests)
        assert res.inflation == dict.fromkeys(TASKS, 1.0)
    assert multi > 0


def test_grpo_rps_preset_preserves_uniform_ratios():
    b = 30
    rps = RatioPreservingSampler.from_preset("grpo_rps", TASKS, b, target_mode="exact", seed=4)
    gen = MockGenerator(RATES)
    for _ in range(30):
        res = rps.run_step(None, gen)
        if not res.hit_cap:
            assert res.realised_counts == {"countdown": 10, "zebra": 10, "arc": 10}


def test_ratio_preservation_warm_up_steps():
    # Steps counted from 1, as the released code: from step 3 means the third call preserves.
    rps = RatioPreservingSampler(TASKS, 12, preserve_from_step=3, target_mode="exact", seed=0)
    gen = MockGenerator({"countdown": 0.0, "zebra": 0.0, "arc": 0.9})
    preserved = 0
    for step in range(1, 9):
        res = rps.run_step(None, gen)
        if step < 3:  # DAPO behaviour: one round suffices, arc under-represented
            assert res.rounds == 1
            assert res.realised_counts["arc"] < 4
        elif not res.hit_cap:
            preserved += 1
            assert res.realised_counts == {"countdown": 4, "zebra": 4, "arc": 4}
    assert preserved >= 3


def test_scaled_targets_are_rescaled_reference_shares():
    rps = RatioPreservingSampler(TASKS, 10, target_mode="scaled", seed=0)
    res = rps.run_step([0.0, 0.0, 1.0], MockGenerator({"countdown": 0, "zebra": 0, "arc": 0}))
    assert res.targets == {"countdown": 0, "zebra": 0, "arc": 10}
    for _ in range(20):
        res = rps.run_step([0.3, 0.3, 0.4], MockGenerator(RATES))
        assert abs(sum(res.targets.values()) - 10) <= 2
        assert len(res.batch) <= 10
    # Without AAS the reference shares are round 1's own draw (the released code).
    rps = RatioPreservingSampler(TASKS, 10, target_mode="scaled", max_inflation=1.0, seed=0)
    for _ in range(20):
        res = rps.run_step([0.3, 0.3, 0.4], MockGenerator(RATES))
        assert res.targets == {t: round(10 * res.requests[0][t] / 30) for t in TASKS}


# ---- filters -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rewards", "expected"),
    [
        # rewards               strict lenient lenient_code none
        ((0.0, 0.0, 0.0), (True, True, True, False)),
        ((1.0, 1.0, 1.0), (True, True, True, False)),
        ((0.1, 0.1, 0.1), (True, True, False, False)),  # format-only: code keeps it
        ((0.0, 0.1, 0.0), (True, False, False, False)),  # no correct rollout: strict drops
        ((1.0, 0.0, 0.1), (False, False, False, False)),
        ((0.5, 0.5), (True, True, False, False)),
        ((1.0,), (True, True, True, False)),
    ],
)
def test_filters(rewards, expected):
    assert FILTERS == ("strict", "lenient", "lenient_code", "none")
    assert tuple(is_filtered(rewards, m) for m in FILTERS) == expected


def test_strict_filter_in_the_sampler_drops_groups_without_a_correct_rollout():
    def gen(requests):
        out = []
        for t, n in requests.items():
            for i in range(n):
                rewards = (0.0, 0.1) if i % 2 else (1.0, 0.0)
                out.append(Group(t, f"{t}-{i}", rewards))
        return out

    strict = RatioPreservingSampler(TASKS, 6, filter="strict", draw_mode="exact", seed=0)
    res = strict.run_step(None, gen)
    assert all(1.0 in g.rewards for g in res.batch)
    assert res.filtered_rates == dict.fromkeys(TASKS, 0.5)
    assert res.zero_adv_rates == dict.fromkeys(TASKS, 0.0)
    lenient = RatioPreservingSampler(TASKS, 6, filter="lenient", draw_mode="exact", seed=0)
    assert sum(lenient.run_step(None, gen).filtered.values()) == 0


def test_docstring_examples():
    import doctest

    import jaxgrpo.data.ratio_sampler
    import jaxgrpo.data.task_sampler

    for mod in (jaxgrpo.data.task_sampler, jaxgrpo.data.ratio_sampler):
        failed, attempted = doctest.testmod(mod)
        assert failed == 0 and attempted > 0, mod.__name__


# ---- state ---------------------------------------------------------------------------------


def test_state_round_trip_gives_identical_steps():
    def summary(res):
        return ([g.uid for g in res.batch], res.targets, res.rounds, res.requests, res.rho)

    rps = RatioPreservingSampler.from_preset("mt_grpo", TASKS, 16, seed=11)
    gen = MockGenerator(RATES, seed=2)
    z = np.random.default_rng(5).dirichlet(np.ones(3), size=20)
    for t in range(10):
        rps.run_step(z[t], gen)
    state = json.loads(json.dumps({"rps": rps.get_state(), "prompts": gen.prompts.get_state()}))
    expected = [summary(rps.run_step(z[t], gen)) for t in range(10, 20)]

    rps2 = RatioPreservingSampler.from_preset("mt_grpo", TASKS, 16, seed=11)
    gen2 = MockGenerator(RATES, seed=2)
    rps2.set_state(state["rps"])
    gen2.prompts.set_state(state["prompts"])
    assert rps2.step == 10
    assert [summary(rps2.run_step(z[t], gen2)) for t in range(10, 20)] == expected


def test_metrics_are_flat_scalars():
    rps = RatioPreservingSampler(TASKS, 8, seed=0)
    m = rps.run_step([0.5, 0.25, 0.25], MockGenerator(RATES)).metrics()
    assert all(isinstance(v, float) for v in m.values())
    for t in TASKS:
        for key in ("weight", "target_count", "realised_count", "realised_share",
                    "filtered_rate", "rho", "inflation"):
            assert f"task/{t}/{key}" in m
    assert m["task/countdown/weight"] == 0.5
    assert sum(m[f"task/{t}/realised_share"] for t in TASKS) == pytest.approx(1.0)


# ---- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(target_mode="poisson"), "target_mode"),
        (dict(draw_mode="x"), "draw_mode"),
        (dict(schedule="x"), "schedule"),
        (dict(filter="x"), "filter"),
        (dict(fill="x"), "fill"),
        (dict(oversample=0.5), "oversample"),
        (dict(max_inflation=0.5), "max_inflation"),
        (dict(rho_decay=1.0), "rho_decay"),
        (dict(max_rounds=0), "max_rounds"),
        (dict(round_multiple=0), "round_multiple"),
    ],
)
def test_constructor_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RatioPreservingSampler(TASKS, 8, **kwargs)


def test_run_step_validation():
    rps = RatioPreservingSampler(TASKS, 8)
    gen = MockGenerator(RATES)
    with pytest.raises(ValueError, match="sum to 1"):
        rps.run_step([0.5, 0.5, 0.5], gen)
    with pytest.raises(ValueError, match="3 tasks"):
        rps.run_step([0.5, 0.5], gen)
    with pytest.raises(ValueError, match="exactly the tasks"):
        rps.run_step({"countdown": 1.0}, gen)
    with pytest.raises(ValueError, match="per-task counts"):
        rps.run_step(None, lambda req: [])
    with pytest.raises(ValueError, match="twice"):
        rps.run_step(None, lambda req: [Group(t, "same", MIXED) for t, n in req.items()
                                        for _ in range(n)])
    with pytest.raises(TypeError, match="Group"):
        rps.run_step(None, lambda req: [object()])
    with pytest.raises(ValueError, match="preset"):
        RatioPreservingSampler.from_preset("ppo", TASKS, 8)
    with pytest.raises(ValueError, match="distinct"):
        RatioPreservingSampler(("a", "a"), 8)
    with pytest.raises(ValueError, match="get_state"):
        rps.set_state({})
    assert set(PRESETS) >= {"grpo", "dapo", "grpo_rps", "mt_grpo"}


class AcceptAll:
    """Every group has a learning signal (mixed rewards): all are accepted."""

    def __init__(self):
        self.n = 0

    def __call__(self, requests):
        out = []
        for task, count in requests.items():
            for _ in range(count):
                out.append(Group(task, f"{task}/{self.n}", MIXED))
                self.n += 1
        return out


def test_scaled_targets_summing_to_b_plus_one_keep_every_task():
    """Round-1 shares [2, 2, 92] of 96 round to targets [1, 1, 31] for B = 32: the extra prompt
    is taken from the task with the largest target, never from a single-slot task."""
    z = [2 / 96, 2 / 96, 92 / 96]
    for seed in range(100):
        rps = RatioPreservingSampler(TASKS, 32, target_mode="scaled", draw_mode="exact",
                                     max_inflation=1.0, seed=seed)
        res = rps.run_step(z, AcceptAll())
        assert res.targets == {"countdown": 1, "zebra": 1, "arc": 31}
        assert res.realised_counts == {"countdown": 1, "zebra": 1, "arc": 30}, seed


def test_no_task_with_a_target_and_an_accepted_group_ends_empty():
    rng = np.random.default_rng(5)
    over = 0
    for seed in range(150):
        z = rng.dirichlet(np.full(3, 0.3))
        rps = RatioPreservingSampler(TASKS, 8, target_mode="scaled", schedule="code",
                                     max_rounds=int(rng.integers(1, 4)), seed=seed)
        gen = MockGenerator(dict(zip(TASKS, rng.uniform(0, 0.9, 3), strict=True)), seed=seed)
        for _ in range(3):
            res = rps.run_step(z, gen)
            over += sum(res.targets.values()) > 8
            accepted = res.accepted_counts[-1]
            for t in TASKS:
                if res.targets[t] > 0 and accepted[t] > 0:
                    assert res.realised_counts[t] >= 1, (seed, res.targets, accepted)
    assert over > 0  # the B + 1 (or more) trim was exercised


def test_exp2_code_preset_preserves_from_the_tenth_step_counted_from_one():
    # arc is always filtered; without preservation round 1's other groups fill B, with it the
    # second (last) round chases arc's deficit.
    rps = RatioPreservingSampler.from_preset("mt_grpo_exp2_code", TASKS, 12, max_inflation=1.0,
                                             seed=0)
    gen = MockGenerator({"countdown": 0.0, "zebra": 0.0, "arc": 1.0})
    rounds = [rps.run_step(None, gen).rounds for _ in range(12)]
    assert rounds == [1] * 9 + [2] * 3
