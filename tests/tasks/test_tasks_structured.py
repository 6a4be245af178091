"""Structured outputs: parsing, block spans on tokens, block rewards, malformed handling."""

import math

import numpy as np
import pytest

from jaxgrpo.tasks import get_task, parse_structured, token_block_ids
from jaxgrpo.tasks.structured import (
    StructuredTask,
    block_rewards,
    confidence_reward,
    parse_confidence,
)

GOOD = ("<reasoning>think</reasoning><answer>42</answer>\n"
        "<analysis>sure</analysis><confidence>0.8</confidence>")
REC = {"question": "12+30=", "answer": "42", "a": 12, "b": 30}


def test_parse_well_formed():
    p = parse_structured(GOOD)
    assert p.status == "ok" and p.format_ok and p.answers == ("42",) and p.confidence == 0.8
    assert GOOD[p.split:].startswith("<analysis>")
    assert p.spans() == ((0, p.split), (p.split, len(GOOD)))


@pytest.mark.parametrize(
    "text, status",
    [
        ("", "no_answer"),
        ("<answer>42", "no_answer"),
        ("<answer>4</answer><answer>2</answer><confidence>1</confidence>", "no_answer"),
        ("<answer>42</answer>", "no_confidence"),
        ("<answer>42</answer><analysis>x</analysis><confidence>0.5", "no_confidence"),
        ("<answer>42</answer><confidence>0.5</confidence><confidence>1</confidence>",
         "no_confidence"),
        ("<answer>42</answer><confidence>nan</confidence>", "bad_confidence"),
        ("<answer>42</answer><confidence>inf</confidence>", "bad_confidence"),
        ("<answer>42</answer><confidence>1e999</confidence>", "bad_confidence"),
        ("<answer>42</answer><confidence>1.5</confidence>", "bad_confidence"),
        ("<answer>42</answer><confidence>-0.1</confidence>", "bad_confidence"),
        ("<answer>42</answer><confidence>０.５</confidence>", "bad_confidence"),
        ("<answer>42</answer><confidence>80%</confidence>", "bad_confidence"),
        ("<answer>42</answer><confidence></confidence>", "bad_confidence"),
    ],
)
def test_parse_malformed(text, status):
    p = parse_structured(text)
    assert p.status == status and not p.format_ok and p.confidence is None


def test_truncation_status_and_loose_layout():
    assert parse_structured("<reasoning>abc", truncated=True).status == "truncated"
    assert parse_structured("<answer>1</answer><analysis>x", truncated=True).status == "truncated"
    loose = "junk<answer>42</answer> <confidence>0.5</confidence> trailing"
    p = parse_structured(loose)
    assert p.status == "ok" and not p.format_ok and p.confidence == 0.5
    assert loose[p.split:].startswith("<confidence>")


@pytest.mark.parametrize("text, q", [("0", 0.0), ("1", 1.0), (".5", 0.5), (" 0.25 ", 0.25),
                                     ("8.5e-1", 0.85), ("1.", 1.0)])
def test_parse_confidence_values(text, q):
    assert parse_confidence(text) == q


def test_confidence_rewards_against_formulas():
    for q in (0.0, 0.1, 0.5, 0.9, 1.0):
        for c in (False, True):
            assert confidence_reward(q, c) == pytest.approx(-((q - float(c)) ** 2), abs=1e-12)
            qc = min(max(q, 1e-3), 1 - 1e-3)
            ref = math.log(qc) if c else math.log(1 - qc)
            assert confidence_reward(q, c, kind="log", eps=1e-3) == pytest.approx(ref, abs=1e-12)
    with pytest.raises(ValueError, match="kind"):
        confidence_reward(0.5, True, kind="bce")


@pytest.mark.parametrize(
    "mode, conf_kind, expect",
    [
        ("empty_block", "brier", (1.0, 0.0)),
        ("worst_score", "brier", (1.0, -1.0)),
        ("fail_all", "brier", (0.0, -1.0)),
        ("worst_score", "log", (1.0, math.log(1e-4))),
    ],
)
def test_malformed_modes(mode, conf_kind, expect):
    text = "<reasoning>r</reasoning><answer>42</answer><analysis>hmm"
    p = parse_structured(text, truncated=True)
    assert block_rewards(p, [True], on_malformed=mode, conf_reward=conf_kind) == expect
    spans = p.spans(on_malformed=mode)
    if mode == "empty_block":
        assert spans[1][0] == spans[1][1]
    else:
        assert spans[1] == (text.index("<analysis>"), len(text))


def test_structured_task_scores():
    task = get_task("confidence", base="addition@1")
    s = task.score(REC, GOOD)
    assert s.correct and s.format_ok and s.blocks == pytest.approx((1.0, -0.04))
    assert s.reward == pytest.approx(1 - 0.04) and s.confidence == 0.8  # RLCR: c - (q - c)^2
    wrong = GOOD.replace(">42<", ">41<")
    s = task.score(REC, wrong)
    assert not s.correct and s.blocks == pytest.approx((0.0, -0.64))
    rec = task.dataset()[3]
    assert task.score(rec, task.gold_completion(rec)).blocks == (1.0, 0.0)
    assert task.chat(rec)[0]["role"] == "system"
    fail_all = StructuredTask("addition@1", on_malformed="fail_all")
    s = fail_all.score(REC, "<answer>42</answer>")
    assert s.correct and not s.format_ok and s.blocks == (0.0, -1.0)
    with pytest.raises(ValueError, match="on_malformed"):
        StructuredTask("addition@1", on_malformed="zero")


def test_two_attempt_rewards():
    task = get_task("two_attempt", base="addition@1")

    def comp(a1, a2):
        return (f"<reasoning>x</reasoning><answer>{a1}</answer>"
                f"<reasoning>y</reasoning><answer>{a2}</answer>")

    assert task.score(REC, comp("42", "42")).blocks == (1.0, 1.0)
    assert task.score(REC, comp("41", "42")).blocks == (0.0, 1.0)
    assert task.score(REC, comp("41", "40")).blocks == pytest.approx((0.0, 0.1))
    assert task.score(REC, comp("41", " 41 ")).blocks == (0.0, 0.0)
    s = task.score(REC, "<reasoning>x</reasoning><answer>42</answer><reasoning>y")
    assert s.correct and s.blocks == (1.0, 0.0) and not s.format_ok
    p = parse_structured(comp("1", "2"), format="two_attempt")
    assert p.format_ok and comp("1", "2")[:p.split].endswith("<answer>1</answer>")
    rec = task.dataset()[0]
    assert task.score(rec, task.gold_completion(rec)).blocks == (1.0, 1.0)


def _reference_block_ids(spans, offsets, length):
    out = [-1] * length
    for t, (s, e) in enumerate(offsets):
        if e > s:
            for k, (a, b) in enumerate(spans):
                if a <= s < b:
                    out[t] = k
    return out


def test_token_block_ids_with_multichar_tokens():
    spans = ((0, 10), (10, 20))
    offsets = [(0, 4), (4, 9), (9, 12), (12, 20), (0, 0)]
    ids = token_block_ids(spans, offsets, length=8, eos_index=4)
    assert ids.dtype == np.int32 and ids.shape == (8,)
    assert ids.tolist() == [0, 0, 0, 1, 1, -1, -1, -1]
    assert ids.tolist()[:4] == _reference_block_ids(spans, offsets, 8)[:4]
    # an empty last block gives EOS no block
    assert token_block_ids(((0, 20), (20, 20)), offsets, length=5, eos_index=4)[4] == -1
    with pytest.raises(ValueError, match="length"):
        token_block_ids(spans, offsets, length=3)


def test_truncated_flag_reaches_the_parser_through_score_many():
    from jaxgrpo.tasks import score_many

    task = StructuredTask("addition@1", on_malformed="worst_score")
    cut = "<reasoning>r</reasoning><answer>42</answer><analysis>still thinking"
    for workers in (0, 1):
        s = score_many([task, get_task("addition")], [REC, REC], [cut, "42\n"], workers=workers,
                       truncated=[True, True])
        assert s[0].blocks == (1.0, -1.0) and s[0].correct and s[1].correct
    assert task.parse(cut, truncated=True).status == "truncated"
    assert task.parse(cut).status == "no_confidence"


def test_completion_block_ids_batch_matches_a_loop():
    from jaxgrpo.tasks.structured import completion_block_ids

    task = StructuredTask("addition@1")  # empty_block: a missing confidence block gets -1
    texts = [GOOD, "<answer>42</answer><analysis>x", "nothing"]
    offsets = [[(j, j + 1) for j in range(len(t))] for t in texts]
    T = max(len(t) for t in texts) + 1
    ids = completion_block_ids(task, texts, offsets, length=T,
                               eos_index=[len(GOOD), None, None], truncated=[False, True, False])
    assert ids.shape == (3, T) and ids.dtype == np.int32
    split = GOOD.index("<analysis>")
    assert ids[0].tolist() == [0] * split + [1] * (len(GOOD) - split + 1) + [-1] * (T - len(GOOD) - 1)
    cut = texts[1].index("<analysis>")
    assert ids[1].tolist() == [0] * cut + [-1] * (T - cut)
    assert ids[2].tolist() == [0] * len("nothing") + [-1] * (T - len("nothing"))


def _rlcr_total(text: str, correct_answer: str) -> float:
    """RLCR's released total reward, transcribed from its description, on our "full" tag set
    (``</reasoning>`` where RLCR has ``</think>``): 0.5 format + 0.5 accuracy + 0.5 brier."""
    import re
    layout = re.compile(r".*?</reasoning>\s*<answer>.*?</answer>\s*<analysis>.*?</analysis>"
                        r"\s*<confidence>.*?</confidence>\s*\Z", re.DOTALL)
    fmt = 0.0
    if layout.match(text):
        try:
            q = float(re.findall(r"<confidence>(.*?)</confidence>", text, re.DOTALL)[-1])
            fmt = 1.0 if 0.0 <= q <= 1.0 else 0.0
        except ValueError:
            pass
    if not fmt:
        return 0.0
    answer = re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)[-1]
    c = 1.0 if answer.strip() == correct_answer else 0.0
    return 0.5 * fmt + 0.5 * c + 0.5 * (1.0 - (c - q) ** 2)


RLCR_CASES = [
    GOOD,
    GOOD.replace(">42<", ">41<"),
    GOOD.replace("0.8", "1"),
    GOOD.replace(">42<", ">41<").replace("0.8", "1"),  # the worst well-formed completion
    GOOD.replace("0.8", "0"),
    GOOD.replace("0.8", "1.5"),  # confidence out of range
    GOOD.replace("0.8", "high"),  # not a number
    GOOD.replace("<confidence>0.8</confidence>", ""),  # no confidence
    GOOD.replace("</answer>\n", "</answer> so "),  # text between the answer and the analysis
    GOOD + " trailing words",
    "<reasoning>think</reasoning><answer>42</answer>",
]


def test_format_reward_and_gate_reproduce_rlcr_total_as_an_affine_map():
    rlcr = StructuredTask("addition@1", on_malformed="fail_all", format_gate=True,
                          format_reward=1.0)
    for text in RLCR_CASES:
        assert rlcr.score(REC, text).reward == pytest.approx(
            2 * _rlcr_total(text, "42") - 1, abs=1e-9), text
    # Without the options a format failure ties with the worst well-formed completion; with
    # them it scores below it, as in RLCR.
    plain = StructuredTask("addition@1", on_malformed="fail_all")
    worst, broken = RLCR_CASES[3], RLCR_CASES[7]
    assert plain.score(REC, broken).reward == plain.score(REC, worst).reward == -1.0
    assert rlcr.score(REC, broken).reward == -1.0 < rlcr.score(REC, worst).reward == 0.0


def test_format_gate_marks_a_parsed_but_loose_layout_malformed():
    loose = GOOD.replace("</answer>\n", "</answer> so ")
    gated = StructuredTask("addition@1", format_gate=True)
    p = gated.parse(loose)
    assert p.status == "bad_layout" and not p.format_ok
    assert p.spans() == ((0, p.split), (len(loose), len(loose)))  # "empty_block": no tokens
    s = gated.score(REC, loose)
    assert s.correct and s.blocks == (1.0, 0.0)  # correctness stays a metric
    assert StructuredTask("addition@1").parse(loose).status == "ok"  # ungated: parsed as usual
    bonus = StructuredTask("addition@1", format_reward=0.5)
    assert bonus.score(REC, GOOD).blocks == pytest.approx((1.0, -0.04 + 0.5))
    assert bonus.score(REC, loose).blocks == pytest.approx((1.0, -0.04))
    with pytest.raises(ValueError, match="format_reward"):
        StructuredTask("addition@1", format_reward=-1.0)
    with pytest.raises(TypeError, match="format_gate"):
        StructuredTask("addition@1", format_gate="yes")
    spec = get_task("confidence", base="addition@1", format_reward=1.0, format_gate=True)
    assert spec.format_gate and spec.format_reward == 1.0
