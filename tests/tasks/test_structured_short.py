"""The compact tag set (``tags="short"``) and the SFT confidence option of StructuredTask."""

import numpy as np
import pytest

from jaxgrpo.tasks import get_task
from jaxgrpo.tasks.structured import StructuredTask, parse_structured


def test_short_confidence_parse_and_split():
    text = "<a>12</a><c>0.7</c>"
    p = parse_structured(text, tags="short")
    assert p.status == "ok" and p.answers == ("12",) and p.confidence == 0.7 and p.format_ok
    assert p.split == text.index("<c>")
    assert p.spans() == ((0, 9), (9, len(text)))


@pytest.mark.parametrize(
    "text, status, ok",
    [
        ("<a>12</a><c>0.7</c>  ", "ok", True),
        ("<a>12</a> x <c>0.7</c>", "ok", False),  # stray text: parsed, but not the exact layout
        ("<a>12</a><c>1.5</c>", "bad_confidence", False),
        ("<a>12</a>", "no_confidence", False),
        ("<a>12</a><a>3</a><c>0.2</c>", "no_answer", False),  # repeated answer tag
        ("<a>12", "no_answer", False),
        ("<a>12</a><c>0.2</c><c>0.3</c>", "no_confidence", False),  # repeated confidence
        # the full tags are not the short ones
        ("<answer>12</answer><confidence>0.7</confidence>", "no_answer", False),
    ],
)
def test_short_confidence_statuses(text, status, ok):
    p = parse_structured(text, tags="short")
    assert (p.status, p.format_ok) == (status, ok)


def test_full_tags_unchanged_and_short_tags_rejected_by_full():
    full = "<reasoning></reasoning><answer>5</answer><analysis></analysis><confidence>1</confidence>"
    assert parse_structured(full).status == "ok"
    assert parse_structured("<a>5</a><c>1</c>").status == "no_answer"


def test_short_two_attempt():
    p = parse_structured("<a>3</a><a>4</a>", format="two_attempt", tags="short")
    assert p.status == "ok" and p.answers == ("3", "4") and p.format_ok and p.split == 8


def test_bad_tags_name():
    with pytest.raises(ValueError, match="tags must be one of"):
        parse_structured("x", tags="tiny")
    with pytest.raises(ValueError, match="tags must be one of"):
        StructuredTask("addition@1", tags="tiny")
    with pytest.raises(ValueError, match="gold_confidence must be one of"):
        StructuredTask("addition@1", gold_confidence="random")


def test_short_task_rewards_and_gold():
    task = get_task("confidence", base="addition@1", tags="short")
    rec = task.dataset("train", 0)[0]
    gold = task.gold_completion(rec)
    assert gold == f"<a>{rec['answer']}</a><c>1</c>"
    s = task.verify(rec, gold)
    assert s.correct and s.blocks == (1.0, 0.0) and s.confidence == 1.0
    wrong = f"<a>{int(rec['answer']) + 1}</a><c>0.3</c>"
    s = task.verify(rec, wrong)
    assert not s.correct and s.blocks[0] == 0.0 and s.blocks[1] == pytest.approx(-0.09)
    assert s.reward == pytest.approx(-0.09)  # RLCR's c - (q - c)^2


def test_uniform_gold_confidence_is_spread_and_deterministic():
    task = get_task("confidence", base="addition@1", tags="short", gold_confidence="uniform")
    ds = task.dataset("train", 0)
    qs = []
    for i in range(2000):
        rec = ds[i]
        g = task.gold_completion(rec)
        assert g == task.gold_completion(rec)
        s = task.verify(rec, g)
        assert s.correct and s.confidence is not None
        qs.append(s.confidence)
    values, counts = np.unique(np.round(qs, 1), return_counts=True)
    assert list(values) == pytest.approx([i / 10 for i in range(11)])
    # roughly uniform over the 11 values (each expected ~182 of 2000)
    assert counts.min() > 120 and counts.max() < 250
