"""Adapters: reasoning-gym datasets and math files accept gold answers and reject wrong ones."""

import json

import pytest

from jaxgrpo.tasks import get_task, score_many
from jaxgrpo.tasks.adapters import last_tag_content

pytest.importorskip("reasoning_gym")


@pytest.mark.parametrize("name", ["rg_countdown", "rg_zebra", "rg_arc1d"])
def test_reasoning_gym_gold_and_wrong(name):
    task = get_task(name, level=1, size=50)
    ds = task.dataset(split="train", seed=0)
    for i in range(3):
        rec = ds[i]
        assert json.loads(json.dumps(rec)) == rec
        s = task.score(rec, "thinking...\n" + task.gold_completion(rec))
        assert s.correct and s.reward == 1.0 and s.format_ok, (rec["answer"], s)
        for wrong in ("<answer>zzz</answer>", "<answer></answer>", rec["answer"], ""):
            s = task.score(rec, wrong)
            assert not s.correct and s.reward == 0.0, (wrong, s)
    assert task.dataset("eval", seed=0)[0] != ds[0]


def test_reasoning_gym_format_bonus_is_the_mt_grpo_reward():
    task = get_task("rg_countdown", level=1, size=10, format_bonus=0.1)
    rec = task.dataset()[0]
    assert task.score(rec, task.gold_completion(rec)).reward == 1.0
    wrong = task.score(rec, "<answer>1+1</answer>")
    assert (wrong.reward, wrong.correct, wrong.format_ok) == (0.1, False, True)
    assert task.score(rec, "no tags at all").reward == 0.0
    with pytest.raises(ValueError, match="format_bonus"):
        get_task("rg_countdown", level=1, size=10, format_bonus=1.5)
    with pytest.raises(ValueError, match="not both"):
        get_task("rg_countdown", level=1, size=10, format_bonus=0.1, partial_credit=True)


def test_reasoning_gym_partial_credit_is_not_correct():
    task = get_task("rg_countdown", level=1, size=10, partial_credit=True)
    rec = task.dataset()[0]
    s = task.score(rec, "<answer>1+1</answer>")  # wrong value: reasoning-gym gives 0.05
    assert not s.correct and 0.0 < s.reward < 1.0
    # text outside the safe arithmetic grammar never reaches reasoning-gym's sympy parser
    for bad in ("<answer>__import__('os').system('true')</answer>", "<answer>9**9**9**9</answer>"):
        s = task.score(rec, bad)
        assert s.reward == 0.0 and not s.format_ok


def test_reasoning_gym_levels_and_errors():
    nums = [len(get_task("rg_countdown", level=lv, size=5).dataset()[0]["metadata"]["numbers"])
            for lv in (1, 2, 3)]
    assert nums == [3, 4, 5]
    with pytest.raises(ValueError, match="level"):
        get_task("rg", dataset="leg_counting", level=1)
    task = get_task("rg", dataset="leg_counting", size=5)
    rec = task.dataset()[0]
    assert task.score(rec, task.gold_completion(rec)).correct


def _write_rows(tmp_path, kind):
    rows = [{"problem": "What is 1/2 + 1/4?", "answer": "\\frac{3}{4}"},
            {"problem": "Solve x + 1 = 3.", "answer": "2"},
            {"problem": "Area of a unit circle?", "answer": "\\pi"}]
    if kind == "jsonl":
        path = tmp_path / "math.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pq = pytest.importorskip("pyarrow.parquet")
        import pyarrow as pa

        path = tmp_path / "math.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_math_file_gold_equivalent_and_wrong(tmp_path, kind):
    pytest.importorskip("math_verify")
    task = get_task("math_file", path=str(_write_rows(tmp_path, kind)))
    ds = task.dataset("train")
    assert len(ds) == 3 and ds[1]["answer"] == "2"
    for rec in ds:
        assert task.score(rec, task.gold_completion(rec)).correct
    assert task.score(ds[0], "so <answer>0.75</answer>").correct
    assert task.score(ds[0], "the answer is \\boxed{3/4}").correct  # no tags: math-verify search
    assert not task.score(ds[0], "the answer is \\boxed{3/4}").format_ok
    assert task.score(ds[2], "<answer>\\pi</answer>").correct
    for rec, wrong in ((ds[0], "<answer>0.7</answer>"), (ds[1], "<answer>3</answer>"),
                       (ds[2], "<answer>3.14</answer>"), (ds[1], "<answer></answer>")):
        assert not task.score(rec, wrong).correct
    # through the worker pool, and wrapped in the BAE confidence format
    conf = get_task("confidence", base=task)
    comp = "<reasoning>r</reasoning><answer>2</answer><analysis>a</analysis><confidence>0.9</confidence>"
    scores = score_many([task, conf], [ds[1], ds[1]], ["<answer>2</answer>", comp], workers=1)
    assert scores[0].correct and scores[1].correct
    assert scores[1].blocks == pytest.approx((1.0, -0.01))


def test_math_file_errors(tmp_path):
    with pytest.raises(ValueError, match="path"):
        get_task("math_file")
    with pytest.raises(ValueError, match="does not exist"):
        get_task("math_file", path=str(tmp_path / "none.jsonl")).dataset()
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(ValueError, match="'problem' column"):
        get_task("math_file", path=str(bad)).dataset()


def test_last_tag_content():
    assert last_tag_content("<answer>1</answer> <answer> 2 </answer>") == "2"
    assert last_tag_content("<answer>1") is None and last_tag_content("</answer>") is None
