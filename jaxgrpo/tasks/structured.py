"""Structured outputs for Blockwise Advantage Estimation: parse, block spans, tokens, rewards.

Two formats (BAE, arXiv 2602.10231: the RLCR-style confidence format and two-attempt refinement):

* ``"confidence"``: ``<reasoning>…</reasoning><answer>â</answer><analysis>…</analysis>
  <confidence>q</confidence>``. Block 0 (solution) is everything before ``<analysis>``; block 1
  (confidence) is everything from ``<analysis>`` to the end of the text, tags included, and the
  EOS token when :func:`token_block_ids` is given its index (our reading; the paper does not say). Without
  ``<analysis>`` the split is at ``<confidence>``, then at the end of ``</answer>``.
  Rewards: ``r_0 = c``; ``r_1 = -(q - c)^2`` (Brier) or ``c log q + (1-c) log(1-q)`` with q
  clipped to ``[eps, 1-eps]`` (log score).
* ``"two_attempt"``: ``<reasoning>…</reasoning><answer>a1</answer><reasoning>…</reasoning>
  <answer>a2</answer>``. Block 0 ends right after the first ``</answer>``; block 1 is the rest.
  Rewards (App. C): ``r_0 = c1``; ``r_1 = 1`` if ``c2``, ``0.1`` if wrong and ``a2 ≢ a1``, else 0.

Parsing is plain string search (no regex backtracking, linear time). The answer is the content
of the only ``<answer>…</answer>`` pair (per attempt); a repeated or unclosed answer tag means
no answer, so ``c = 0``. The confidence is the content of the only ``<confidence>…</confidence>``
pair after the answer, stripped, an ASCII decimal such as ``0.85``, ``1``, ``.5`` or ``8.5e-1``
in ``[0, 1]``; NaN, infinities, unicode digits, percentages and out-of-range values are invalid.

A missing or invalid second block (no confidence, bad confidence, no second answer, or text
truncated before it) is handled by ``on_malformed`` (configurable):

* ``"empty_block"`` (default): block 1 has no tokens (its token ids are -1, so it gets no loss)
  and reward 0; block 0 is scored as usual.
* ``"worst_score"``: block 1 keeps its tokens and gets the worst reward (Brier -1, log score
  ``log(eps)``, two-attempt 0).
* ``"fail_all"``: like ``"worst_score"`` and also ``r_0 = 0``. This is what RLCR's code does to
  its accuracy and Brier *components* on a format failure (it zeroes them, and in its
  ``1 - (c - q)^2`` convention a zero Brier term is the worst one); RLCR's *total* also has a
  format term, so there a format failure scores below every well-formed completion, while with
  this mode alone it ties with the worst well-formed one (``c = 0, q = 1``). Add the format term
  with ``format_reward`` and RLCR's gate with ``format_gate``.

``format_ok`` is true only for the exact layout (only whitespace between the tagged parts and
after the last tag).

Format reward and gate (``StructuredTask`` options; both off by default, as in the BAE paper,
which has no format term):

* ``format_reward = f >= 0``: ``f`` is added to block 1's reward (so to ``Score.reward``) when
  ``format_ok``. Putting it on the last block, whose tokens close the layout, is our choice:
  RLCR's reward is one scalar and the BAE paper has none.
* ``format_gate = True``: a completion whose second block parses but whose layout is not exact
  gets status ``"bad_layout"`` and is scored (and its block 1 spanned) by ``on_malformed`` like
  any other malformed completion. This is RLCR's gate, which scores the layout, not only the
  parse.

With ``format_gate=True, on_malformed="fail_all", format_reward=1, conf_reward="brier"``,
``Score.reward = 2 R - 1`` for RLCR's total
``R = 0.5 format + 0.5 accuracy + 0.5 (1 - (c - q)^2)`` (arXiv:2507.16806, as its released
reward functions compute it): ``1 + c - (q - c)^2`` when well formed, ``-1`` otherwise, an
affine map that leaves group-normalised advantages unchanged. What is *not* RLCR's
behaviour here: RLCR's layout is ``<think>…</think>`` (any text before ``</think>``) then answer,
analysis and confidence, where ours is the tag set's (``<reasoning>`` for ``"full"``, leading
text not allowed); RLCR reads the *last* ``<answer>`` and ``<confidence>``, we require exactly
one of each; RLCR's confidence is any string Python's ``float`` reads in ``[0, 1]`` (unicode
digits included), ours an ASCII decimal; RLCR checks answers with math-verify (or SQuAD-style
exact match), we use the base task's ``check_answer``; RLCR's two logging-only terms (weight
1e-5) are left out; and ``Score.correct`` stays the answer's correctness (a metric, not a
reward) where RLCR's accuracy term is zeroed by the gate.

Tag sets (``tags``): ``"full"`` is the paper's (above); ``"short"`` is a compact set for small
character-level models: ``<a>â</a><c>q</c>`` (confidence; no reasoning or analysis part, block 1
starts at ``<c>``) and ``<a>a1</a><a>a2</a>`` (two attempts). The parsing rules are the same.

``gold_confidence`` (``StructuredTask`` option) sets the confidence in SFT targets
(:meth:`StructuredTask.gold_completion`): ``"one"`` writes ``1``; ``"uniform"`` writes one of
``0.0, 0.1, ..., 1.0`` chosen by a hash of the prompt (CRC-32 mod 11), i.e. uniformly spread and
independent of whether the model will be right, so a warm start learns the format and a varied
confidence but no calibration.
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib
from collections.abc import Callable, Sequence

import numpy as np

from jaxgrpo.tasks.base import Score, Task, get_task, register_task

FORMATS = ("confidence", "two_attempt")
MALFORMED_MODES = ("empty_block", "worst_score", "fail_all")
CONFIDENCE_REWARDS = ("brier", "log")
TAG_SETS = ("full", "short")
GOLD_CONFIDENCES = ("one", "uniform")

_NUMBER = re.compile(r"[+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,3})?", re.ASCII)
_CONF_TAGS = ("<reasoning>", "</reasoning>", "<answer>", "</answer>", "<analysis>",
              "</analysis>", "<confidence>", "</confidence>")
_TWO_TAGS = ("<reasoning>", "</reasoning>", "<answer>", "</answer>") * 2


@dataclasses.dataclass(frozen=True)
class _Tags:
    answer: tuple[str, str]
    conf: tuple[str, str]
    split_at: tuple[str, ...]  # block 1 of the confidence format starts at the first of these
    conf_layout: tuple[str, ...]
    two_layout: tuple[str, ...]


_TAGS = {
    "full": _Tags(("<answer>", "</answer>"), ("<confidence>", "</confidence>"),
                  ("<analysis>", "<confidence>"), _CONF_TAGS, _TWO_TAGS),
    "short": _Tags(("<a>", "</a>"), ("<c>", "</c>"), ("<c>",), ("<a>", "</a>", "<c>", "</c>"),
                   ("<a>", "</a>") * 2),
}


def _check_tags(tags: str) -> _Tags:
    if tags not in TAG_SETS:
        raise ValueError(f"tags must be one of {TAG_SETS}, got {tags!r}")
    return _TAGS[tags]


@dataclasses.dataclass(frozen=True)
class StructuredParse:
    """What :func:`parse_structured` found.

    Attributes:
      format: "confidence" or "two_attempt".
      status: "ok"; "no_answer" (no unique answer in block 0); "no_confidence" /
        "bad_confidence" (confidence format); "no_second_answer" (two-attempt); "truncated"
        (the text was cut off before block 1 was complete); or "bad_layout" (parsed, but the
        layout is not exact; only from a task with ``format_gate=True``).
      answers: the extracted answer texts, ``(â,)`` or ``(a1, a2)``; ``None`` where missing.
      confidence: q in [0, 1], or ``None``.
      split: the character index where block 1 starts (``len(text)`` if block 1 is empty).
      length: ``len(text)``.
      format_ok: the exact layout was followed.
    """

    format: str
    status: str
    answers: tuple[str | None, ...]
    confidence: float | None
    split: int
    length: int
    format_ok: bool

    @property
    def second_block_ok(self) -> bool:
        return self.status == "ok"

    def spans(self, *, on_malformed: str = "empty_block") -> tuple[tuple[int, int], ...]:
        """Character spans ``[start, end)`` of the two blocks (tags included)."""
        _check_mode(on_malformed)
        if not self.second_block_ok and on_malformed == "empty_block":
            return (0, self.split), (self.length, self.length)
        return (0, self.split), (self.split, self.length)


def _check_mode(on_malformed: str) -> None:
    if on_malformed not in MALFORMED_MODES:
        raise ValueError(f"on_malformed must be one of {MALFORMED_MODES}, got {on_malformed!r}")


def parse_confidence(text: str) -> float | None:
    """An ASCII decimal in [0, 1], or ``None``."""
    text = text.strip()
    if len(text) > 40 or not _NUMBER.fullmatch(text):
        return None
    q = float(text)
    return q if math.isfinite(q) and 0.0 <= q <= 1.0 else None


def _unique_pair(text: str, open_tag: str, close_tag: str, start: int) -> tuple[int, int] | None:
    """``(content start, content end)`` of the only ``open…close`` pair at or after ``start``."""
    i = text.find(open_tag, start)
    if i < 0 or text.find(open_tag, i + 1) >= 0:
        return None
    j = text.find(close_tag, i + len(open_tag))
    if j < 0 or text.find(close_tag, j + 1) >= 0:
        return None
    return i + len(open_tag), j


def _exact_layout(text: str, tags: Sequence[str]) -> bool:
    """Tags appear in order, once each, with only whitespace between closing and opening tags."""
    pos = 0
    for k, tag in enumerate(tags):
        i = text.find(tag, pos)
        if i < 0:
            return False
        if (k % 2 == 0) and text[pos:i].strip():  # gap before an opening tag
            return False
        pos = i + len(tag)
    return not text[pos:].strip() and all(text.count(t) == tags.count(t) for t in set(tags))


def parse_structured(text: str, *, format: str = "confidence",  # noqa: A002
                     truncated: bool = False, tags: str = "full") -> StructuredParse:
    """Parses a structured completion.

    Args:
      text: the completion text (no special tokens).
      format: "confidence" or "two_attempt".
      truncated: the completion hit the length limit (no EOS); an incomplete block 1 then has
        status "truncated".
      tags: the tag set, "full" (the paper's) or "short" (see the module docstring).
    """
    tg = _check_tags(tags)
    (a_open, a_close), (c_open, c_close) = tg.answer, tg.conf
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    n = len(text)
    if format == "confidence":
        ans = _unique_pair(text, a_open, a_close, 0)
        if ans is None:
            return StructuredParse(format, "truncated" if truncated else "no_answer", (None,),
                                   None, n, n, False)
        after = ans[1] + len(a_close)
        split = after
        for tag in tg.split_at:
            i = text.find(tag, after)
            if i >= 0:
                split = i
                break
        answer = text[ans[0]:ans[1]]
        conf = _unique_pair(text, c_open, c_close, after)
        if conf is None:
            status, q = ("truncated" if truncated else "no_confidence"), None
        else:
            q = parse_confidence(text[conf[0]:conf[1]])
            status = "ok" if q is not None else "bad_confidence"
        ok = status == "ok" and _exact_layout(text, tg.conf_layout)
        return StructuredParse(format, status, (answer,), q, split, n, ok)
    # two_attempt: the first answer pair ends block 0
    i = text.find(a_open)
    j = text.find(a_close, i + len(a_open)) if i >= 0 else -1
    if i < 0 or j < 0 or text.find(a_open, i + 1, j) >= 0:
        return StructuredParse(format, "truncated" if truncated else "no_answer", (None, None),
                               None, n, n, False)
    split = j + len(a_close)
    a1 = text[i + len(a_open):j]
    second = _unique_pair(text, a_open, a_close, split)
    if second is None:
        status, a2 = ("truncated" if truncated else "no_second_answer"), None
    else:
        status, a2 = "ok", text[second[0]:second[1]]
    ok = status == "ok" and _exact_layout(text, tg.two_layout)
    return StructuredParse(format, status, (a1, a2), None, split, n, ok)


def confidence_reward(q: float, c: bool, *, kind: str = "brier", eps: float = 1e-4) -> float:
    """Brier ``-(q - c)^2`` or log score ``c log q + (1 - c) log(1 - q)`` (q clipped to eps)."""
    if kind not in CONFIDENCE_REWARDS:
        raise ValueError(f"kind must be one of {CONFIDENCE_REWARDS}, got {kind!r}")
    if not 0.0 < eps < 0.5:
        raise ValueError(f"eps must be in (0, 0.5), got {eps!r}")
    c = 1.0 if c else 0.0
    if kind == "brier":
        return -((q - c) ** 2)
    q = min(max(q, eps), 1.0 - eps)
    return c * math.log(q) + (1.0 - c) * math.log(1.0 - q)


def worst_confidence_reward(*, kind: str = "brier", eps: float = 1e-4) -> float:
    return -1.0 if kind == "brier" else math.log(eps)


def second_attempt_reward(c2: bool, same_as_first: bool) -> float:
    """App. C: 1 if correct, 0.1 if wrong with a different answer, 0 if the same wrong answer."""
    return 1.0 if c2 else (0.0 if same_as_first else 0.1)


def block_rewards(parse: StructuredParse, correct: Sequence[bool], *, same_answers: bool = False,
                  on_malformed: str = "empty_block", conf_reward: str = "brier",
                  eps: float = 1e-4) -> tuple[float, float]:
    """The two block rewards ``(r_0, r_1)`` for a parsed completion.

    Args:
      parse: from :func:`parse_structured`.
      correct: correctness of each answer in ``parse.answers`` (False where it is ``None``).
      same_answers: two-attempt only: ``a2 ≡ a1``.
      on_malformed, conf_reward, eps: see the module docstring.
    """
    _check_mode(on_malformed)
    c0 = bool(correct[0]) and parse.answers[0] is not None
    if parse.second_block_ok:
        if parse.format == "confidence":
            return float(c0), confidence_reward(parse.confidence, c0, kind=conf_reward, eps=eps)
        c1 = bool(correct[1])
        return float(c0), second_attempt_reward(c1, same_answers)
    worst = (worst_confidence_reward(kind=conf_reward, eps=eps)
             if parse.format == "confidence" else 0.0)
    if on_malformed == "empty_block":
        return float(c0), 0.0
    if on_malformed == "worst_score":
        return float(c0), worst
    return 0.0, worst


def token_block_ids(spans: Sequence[tuple[int, int]], offsets: Sequence[Sequence[int]], *,
                    length: int, eos_index: int | None = None) -> np.ndarray:
    """Per-token block ids ``[T]`` (int32, -1 outside every block).

    A token belongs to the block whose character span contains the token's first character.
    Zero-width tokens (special tokens, offsets ``(0, 0)``) get -1, except ``eos_index``, which
    gets the last block if that block is not empty (our reading; the paper does not say).

    Args:
      spans: ``[(start, end), ...]`` per block, from ``StructuredParse.spans``.
      offsets: ``[(char start, char end), ...]`` per token, e.g. a fast tokenizer's
        ``return_offsets_mapping=True`` output; ``len(offsets) <= length``.
      length: T, the output length (padding positions get -1).
      eos_index: the position of the EOS token, if any.
    """
    if not isinstance(length, int) or length < 0:
        raise ValueError(f"length must be an int >= 0, got {length!r}")
    if len(offsets) > length:
        raise ValueError(f"offsets has {len(offsets)} tokens, more than length={length}")
    ids_T = np.full((length,), -1, dtype=np.int32)
    for t, (s, e) in enumerate(offsets):
        if e <= s:
            continue
        for k, (a, b) in enumerate(spans):
            if a <= s < b:
                ids_T[t] = k
                break
    if eos_index is not None:
        if not 0 <= eos_index < length:
            raise ValueError(f"eos_index must be in [0, {length}), got {eos_index!r}")
        last = len(spans) - 1
        if spans[last][1] > spans[last][0]:
            ids_T[eos_index] = last
    return ids_T


def normalize_answer(answer: str) -> str:
    """Whitespace-collapsed, stripped answer text (the default ``a2 ≡ a1`` key)."""
    return " ".join(answer.split())


class StructuredTask(Task):
    """Wraps a task so that completions use a structured format with block rewards.

    ``Score.reward`` is ``r_0 + r_1`` (for Brier and a well-formed completion this is RLCR's
    ``c - (q - c)^2`` without RLCR's format term; see ``format_reward`` and ``format_gate`` in the
    module docstring for that term and how close to RLCR's total they come);
    ``Score.blocks`` is ``(r_0, r_1)``; ``Score.correct`` is the correctness of the (first)
    answer; ``Score.confidence`` is q. The base task checks an answer with
    ``base.check_answer(record, answer_text)``.
    """

    num_blocks = 2
    uses_truncation = True

    def __init__(self, base: str | Task, *, format: str = "confidence",  # noqa: A002
                 on_malformed: str = "empty_block", conf_reward: str = "brier",
                 eps: float = 1e-4, equivalent: Callable[[str, str], bool] | None = None,
                 tags: str = "full", gold_confidence: str = "one", format_reward: float = 0.0,
                 format_gate: bool = False, **base_options):
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
        _check_mode(on_malformed)
        if conf_reward not in CONFIDENCE_REWARDS:
            raise ValueError(f"conf_reward must be one of {CONFIDENCE_REWARDS}, "
                             f"got {conf_reward!r}")
        if not 0.0 < eps < 0.5:
            raise ValueError(f"eps must be in (0, 0.5), got {eps!r}")
        self.base = get_task(base, **base_options) if isinstance(base, str) else base
        if not isinstance(self.base, Task):
            raise TypeError(f"base must be a task spec or Task, got {type(base).__name__}")
        self.format, self.on_malformed, self.conf_reward, self.eps = (
            format, on_malformed, conf_reward, eps)
        self.equivalent = equivalent
        _check_tags(tags)
        if gold_confidence not in GOLD_CONFIDENCES:
            raise ValueError(f"gold_confidence must be one of {GOLD_CONFIDENCES}, "
                             f"got {gold_confidence!r}")
        self.tags, self.gold_confidence = tags, gold_confidence
        if (isinstance(format_reward, bool) or not isinstance(format_reward, int | float)
                or not 0.0 <= format_reward < math.inf):
            raise ValueError(f"format_reward must be a finite number >= 0, got {format_reward!r}")
        if not isinstance(format_gate, bool):
            raise TypeError(f"format_gate must be true or false, got {format_gate!r}")
        self.format_reward, self.format_gate = float(format_reward), format_gate
        self.name = f"{format}:{self.base.name}"
        self.description = f"{self.base.name} in the {format} block format"
        self.max_completion_chars = self.base.max_completion_chars

    def warmup(self) -> None:
        self.base.warmup()

    def dataset(self, split: str = "train", seed: int = 0):
        return self.base.dataset(split=split, seed=seed)

    def prompt(self, record: dict) -> str:
        return self.base.prompt(record)

    def chat(self, record: dict) -> list[dict[str, str]]:
        if self.tags == "short":
            system = ("Answer in <a>...</a>, then give the probability that the answer is correct "
                      "in <c>...</c> as a number in [0, 1]." if self.format == "confidence" else
                      "Answer in <a>...</a>, then give a final answer in a second <a>...</a>.")
        elif self.format == "confidence":
            system = ("Think in <reasoning>...</reasoning>, give the final answer in "
                      "<answer>...</answer>, analyse whether it is right in "
                      "<analysis>...</analysis>, then give the probability that the answer is "
                      "correct in <confidence>...</confidence> as a number in [0, 1].")
        else:
            system = ("Think in <reasoning>...</reasoning> and answer in <answer>...</answer>. "
                      "Then reflect on the first attempt in a second <reasoning>...</reasoning> "
                      "and give a final answer in a second <answer>...</answer>.")
        return [{"role": "system", "content": system}, *self.base.chat(record)]

    def sft_confidence(self, record: dict) -> str:
        """The confidence text of the SFT target (``gold_confidence``, module docstring)."""
        if self.gold_confidence == "one":
            return "1"
        h = zlib.crc32(self.base.prompt(record).encode("utf-8")) % 11
        return f"{h / 10:.1f}"

    def gold_completion(self, record: dict) -> str:
        gold = self.base.gold_completion(record)
        q = self.sft_confidence(record)
        if self.tags == "short":
            if self.format == "confidence":
                return f"<a>{gold}</a><c>{q}</c>"
            return f"<a>{gold}</a><a>{gold}</a>"
        if self.format == "confidence":
            return (f"<reasoning></reasoning><answer>{gold}</answer>"
                    f"<analysis></analysis><confidence>{q}</confidence>")
        return (f"<reasoning></reasoning><answer>{gold}</answer>"
                f"<reasoning></reasoning><answer>{gold}</answer>")

    def _same(self, a: str, b: str) -> bool:
        if self.equivalent is not None:
            return bool(self.equivalent(a, b))
        return normalize_answer(a) == normalize_answer(b)

    def verify(self, record: dict, completion: str, *, truncated: bool = False) -> Score:
        p = self.parse(completion, truncated=truncated)
        correct = [a is not None and self.base.check_answer(record, a) for a in p.answers]
        same = (p.format == "two_attempt" and p.status == "ok"
                and self._same(p.answers[0], p.answers[1]))
        r0, r1 = block_rewards(p, correct, same_answers=same, on_malformed=self.on_malformed,
                               conf_reward=self.conf_reward, eps=self.eps)
        if p.format_ok:
            r1 += self.format_reward
        return Score(r0 + r1, bool(correct[0]), p.format_ok, None, (r0, r1), p.confidence)

    def parse(self, completion: str, *, truncated: bool = False) -> StructuredParse:
        p = parse_structured(completion, format=self.format, truncated=truncated, tags=self.tags)
        if self.format_gate and p.status == "ok" and not p.format_ok:
            p = dataclasses.replace(p, status="bad_layout")
        return p


def _structured_factory(format: str):  # noqa: A002
    def factory(base: str = "addition@1", **options) -> StructuredTask:
        return StructuredTask(base, format=format, **options)

    return factory


register_task("confidence", _structured_factory("confidence"),
              description="a base task (option base=SPEC) with <answer> + <confidence> blocks")
register_task("two_attempt", _structured_factory("two_attempt"),
              description="a base task (option base=SPEC) answered in two attempts (two blocks)")


def completion_block_ids(task: StructuredTask, completions: Sequence[str],
                         offsets: Sequence[Sequence[Sequence[int]]], *, length: int,
                         eos_index: Sequence[int | None] | None = None,
                         truncated: Sequence[bool] | None = None) -> np.ndarray:
    """Block ids ``[N, T]`` (int32, -1 outside blocks) for a batch of completions.

    Args:
      task: the structured task (its format and ``on_malformed`` decide the spans).
      completions: N completion texts.
      offsets: per completion, the token character offsets (as for :func:`token_block_ids`).
      length: T.
      eos_index: per completion, the EOS position or ``None``.
      truncated: per completion, whether it hit the length limit.
    """
    n = len(completions)
    if len(offsets) != n:
        raise ValueError(f"offsets must have one entry per completion, got {len(offsets)} for {n}")
    eos = [None] * n if eos_index is None else list(eos_index)
    cut = [False] * n if truncated is None else list(truncated)
    if len(eos) != n or len(cut) != n:
        raise ValueError("eos_index and truncated must have one entry per completion")
    ids_NxT = np.full((n, length), -1, dtype=np.int32)
    for i, text in enumerate(completions):
        spans = task.parse(text, truncated=cut[i]).spans(on_malformed=task.on_malformed)
        ids_NxT[i] = token_block_ids(spans, offsets[i], length=length, eos_index=eos[i])
    return ids_NxT
