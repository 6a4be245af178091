"""Built-in tasks: gold answers pass, wrong ones fail; datasets are lazy, deterministic, disjoint."""

import json
import math

import pytest

from jaxgrpo.tasks import MIXTURES, Score, Task, get_task, list_tasks, register_task
from jaxgrpo.tasks.base import parse_spec

BUILTINS = ("reverse", "sort", "addition", "countdown")
SPECS = [f"{n}@{lv}" for n in BUILTINS for lv in (1, 2, 3)]


@pytest.mark.parametrize("spec", SPECS)
def test_gold_is_correct_and_wrong_answers_are_not(spec):
    task = get_task(spec)
    ds = task.dataset(split="train", seed=1)
    for i in range(40):
        rec = ds[i]
        gold = task.gold_completion(rec)
        s = task.score(rec, gold)
        assert s == Score(1.0, True, True, None), (rec, gold, s)
        # gold followed by junk on later lines still counts; leading junk does not
        assert task.score(rec, gold + "\nmore text").correct
        assert not task.score(rec, "z" + gold).correct
        assert not task.score(rec, "").correct
        other = ds[i + 1]
        if task.gold_completion(other) != gold and task.name != "countdown":
            assert not task.score(rec, task.gold_completion(other)).correct


def test_specific_wrong_answers():
    add = get_task("addition")
    rec = {"question": "12+30=", "answer": "42", "a": 12, "b": 30}
    assert add.score(rec, "42").correct and add.score(rec, " 042 ").correct
    for bad in ("43", "4 2", "４２", "42.0", "forty-two", "-42"):
        assert not add.score(rec, bad).correct, bad
    cd = get_task("countdown@2")
    rec = {"question": "make 21 from 1 2 7=", "answer": "(2+1)*7", "numbers": [1, 2, 7],
           "target": 21}
    assert cd.score(rec, "7*(1+2)").correct  # any valid expression, not only the gold
    assert cd.score(rec, "(2+1)*7").correct
    for bad in ("21", "7*3", "(2+1)*7*1", "(2+1)*7+0", "7*(1+2", "7*(1+2)=21", "__import__('os')"):
        assert not cd.score(rec, bad).correct, bad
    rev = get_task("reverse")
    rec = {"question": "reverse abc=", "answer": "cba", "text": "abc"}
    assert rev.score(rec, "cba").correct and not rev.score(rec, "CBA").correct


def test_format_bonus_is_kept_apart_from_correctness():
    task = get_task("addition", format_bonus=0.1)
    rec = task.dataset()[0]
    wrong = str(int(rec["answer"]) + 1)
    assert task.score(rec, wrong) == Score(0.1, False, True, None)
    assert task.score(rec, "abc") == Score(0.0, False, False, None)
    assert task.score(rec, rec["answer"]).reward == pytest.approx(1.1)


@pytest.mark.parametrize("spec", SPECS)
def test_datasets_are_deterministic_json_able_and_splits_disjoint(spec):
    task = get_task(spec)
    a, b = task.dataset("train", seed=0), task.dataset("train", seed=0)
    assert len(a) == 100_000 and a[99_999] == b[99_999] and a[-1] == a[99_999]
    assert a[:5] == [a[i] for i in range(5)]
    assert task.dataset("train", seed=1)[:20] != a[:20]
    train = {json.dumps(a[i], sort_keys=True) for i in range(300)}
    ev = task.dataset("eval", seed=0)
    evs = {json.dumps(ev[i], sort_keys=True) for i in range(300)}
    key = "question"
    assert not {json.loads(r)[key] for r in train} & {json.loads(r)[key] for r in evs}
    for i in range(20):
        rec = a[i]
        assert json.loads(json.dumps(rec)) == rec
        # short enough for a character-level demo model
        assert len(task.prompt(rec)) <= 40 and len(task.gold_completion(rec)) <= 40
        assert task.chat(rec)[-1]["content"].endswith(task.prompt(rec))


def test_levels_change_the_problem_size():
    def mean_len(spec):
        t = get_task(spec)
        ds = t.dataset()
        return sum(len(t.gold_completion(ds[i])) for i in range(200)) / 200

    for name in ("reverse", "sort", "addition"):
        assert mean_len(f"{name}@1") < mean_len(f"{name}@2") < mean_len(f"{name}@3")
    lens = [len(get_task(f"countdown@{lv}").dataset()[0]["numbers"]) for lv in (1, 2, 3)]
    assert lens == [2, 3, 4]


def test_demo_mixture_has_three_tasks_and_sums_to_one():
    mix = MIXTURES["demo"]
    assert len(mix) == 3 and math.isclose(sum(mix.values()), 1.0)
    for spec in mix:
        get_task(spec)


def test_registry_and_spec_errors():
    names = [n for n, _ in list_tasks()]
    assert set(BUILTINS) <= set(names) and names == sorted(names)
    assert all(d for _, d in list_tasks())
    assert parse_spec("addition@2") == ("addition", {"level": 2})
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        get_task("nope")
    with pytest.raises(ValueError, match="level"):
        get_task("addition@9")
    with pytest.raises(ValueError, match="after '@'"):
        get_task("addition@x")
    with pytest.raises(ValueError, match="split"):
        get_task("addition").dataset(split="test")
    with pytest.raises(ValueError, match="already registered"):
        register_task("addition", lambda: None)
    with pytest.raises(ValueError, match="format_bonus"):
        get_task("addition", format_bonus=2)


class _Raises(Task):
    name = "raises"

    def verify(self, record, completion):
        raise RuntimeError("boom")


class _NaN(Task):
    name = "nan"

    def verify(self, record, completion):
        return Score(float("nan"), True, True)


class _Recurses(Task):
    name = "recurses"

    def verify(self, record, completion):
        return self.verify(record, completion)


def test_score_never_raises_and_is_finite():
    assert _Raises().score({}, "x") == Score(0.0, False, False, "RuntimeError: boom")
    s = _NaN().score({}, "x")
    assert s.reward == 0.0 and not s.correct and "non-finite" in s.error
    assert _Recurses().score({}, "x").error == "RecursionError"
    assert "must be str" in get_task("addition").score({}, None).error
    assert "longer than" in get_task("addition").score({}, "1" * 10**6).error


@pytest.mark.parametrize("spec", SPECS)
def test_eval_split_is_not_degenerate(spec):
    ev = get_task(spec).dataset("eval", seed=0)
    assert len({ev[i]["question"] for i in range(1000)}) >= 50
