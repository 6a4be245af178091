"""Built-in procedural tasks sized for a character-level model on a CPU (no downloads).

Every prompt ends in ``=`` and the completion is the bare answer (the model then emits its
end-of-sequence token). The answer is the completion's first line with surrounding whitespace
removed; anything after the first newline is ignored. Only ASCII characters count: unicode
digits or letters never match.

============  ===========================  ====================================================
task          prompt -> gold completion    levels 1 / 2 / 3
============  ===========================  ====================================================
reverse       ``reverse abcd=`` -> ``dcba``  3-4 / 5-7 / 8-12 lowercase letters
sort          ``sort dbca=`` -> ``abcd``     3-4 / 5-7 / 8-12 lowercase letters
addition      ``12+345=`` -> ``357``         1-2 / 3 / 5 digit operands
countdown     ``make 22 from 3 5 7=``        2 numbers in 1-20 / 3 in 1-9 / 4 in 1-20; each number
              -> ``3*5+7``                   used exactly once with + - * / and parentheses
============  ===========================  ====================================================

Reward: 1 if correct, plus ``format_bonus`` (default 0) if the answer has the right shape
(letters, digits, an expression); ``Score.correct`` never includes format credit.

``MIXTURES["demo"]`` mixes reverse@1, addition@1 and countdown@2 in equal parts; countdown@2
(search over operator choices and orders) is by far the hardest of the three (the CPU MT-GRPO
experiment's mixture). ``MIXTURES["cpu-demo"]`` (reverse@2, countdown@1, countdown@2), the
built-in demo's, is one where each task improves under GRPO from the demo's SFT warm start.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Sequence

from jaxgrpo.tasks.base import ProceduralDataset, Score, Task, check_split, register_task
from jaxgrpo.tasks.safe_arith import ArithmeticLimitError, evaluate_with_literals

_LOWER = re.compile(r"[a-z]+", re.ASCII)
_INT = re.compile(r"-?[0-9]+", re.ASCII)


def first_line(completion: str) -> str:
    """The answer part of a built-in completion: its first line, stripped."""
    return completion.split("\n", 1)[0].strip()


class ProceduralTask(Task):
    """A built-in task: a generator per level, an answer check and an optional format bonus."""

    levels: dict[int, dict] = {}
    instruction: str = ""

    def __init__(self, *, level: int = 1, format_bonus: float = 0.0, size: int = 100_000):
        if not isinstance(level, int) or level not in self.levels:
            raise ValueError(f"{self.name}: level must be one of {sorted(self.levels)}, "
                             f"got {level!r}")
        if not isinstance(format_bonus, int | float) or not 0.0 <= format_bonus <= 1.0:
            raise ValueError(f"format_bonus must be a number in [0, 1], got {format_bonus!r}")
        self.level, self.format_bonus, self.size = level, float(format_bonus), size
        self.params = self.levels[level]

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.level}"

    def make(self, rng: random.Random) -> tuple[str, dict]:
        """One random problem: ``(canonical key, record)``."""
        raise NotImplementedError(f"{type(self).__name__} must define make() (see ProceduralTask)")

    def check(self, record: dict, answer: str) -> tuple[bool, bool]:
        """``(correct, format_ok)`` for the extracted answer."""
        raise NotImplementedError(f"{type(self).__name__} must define check() (see ProceduralTask)")

    def dataset(self, split: str = "train", seed: int = 0) -> Sequence[dict]:
        check_split(split)
        return ProceduralDataset(self.make, name=self.spec, split=split, seed=seed,
                                 size=self.size)

    def record(self, question: str, answer: str, **extra) -> dict:
        return {"task": self.name, "level": self.level, "question": question, "answer": answer,
                **extra}

    def prompt(self, record: dict) -> str:
        return record["question"]

    def chat(self, record: dict) -> list[dict[str, str]]:
        return [{"role": "user", "content": f"{self.instruction}\n{record['question']}"}]

    def gold_completion(self, record: dict) -> str:
        return record["answer"]

    def verify(self, record: dict, completion: str) -> Score:
        correct, format_ok = self.check(record, first_line(completion))
        reward = (1.0 if correct else 0.0) + (self.format_bonus if format_ok else 0.0)
        return Score(reward, correct, format_ok)


def _letters(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


class ReverseTask(ProceduralTask):
    name = "reverse"
    description = "reverse a string of lowercase letters (levels 1-3: 3-4, 5-7, 8-12 letters)"
    instruction = "Write the letters in reverse order. Reply with the answer only."
    levels = {1: {"len": (3, 4)}, 2: {"len": (5, 7)}, 3: {"len": (8, 12)}}

    def make(self, rng):
        s = _letters(rng, *self.params["len"])
        return s, self.record(f"reverse {s}=", s[::-1], text=s)

    def check(self, record, answer):
        return answer == record["answer"], bool(_LOWER.fullmatch(answer))


class SortTask(ProceduralTask):
    name = "sort"
    description = "sort lowercase letters alphabetically (levels 1-3: 3-4, 5-7, 8-12 letters)"
    instruction = "Sort the letters alphabetically. Reply with the answer only."
    levels = {1: {"len": (3, 4)}, 2: {"len": (5, 7)}, 3: {"len": (8, 12)}}

    def make(self, rng):
        s = _letters(rng, *self.params["len"])
        return s, self.record(f"sort {s}=", "".join(sorted(s)), text=s)

    def check(self, record, answer):
        return answer == record["answer"], bool(_LOWER.fullmatch(answer))


class AdditionTask(ProceduralTask):
    name = "addition"
    description = "add two non-negative integers (levels 1-3: 1-2, 3, 5 digit operands)"
    instruction = "Add the two numbers. Reply with the sum only."
    levels = {1: {"digits": (1, 2)}, 2: {"digits": (3, 3)}, 3: {"digits": (5, 5)}}

    def make(self, rng):
        lo, hi = self.params["digits"]
        a, b = (rng.randint(0, 10 ** rng.randint(lo, hi) - 1) for _ in range(2))
        return f"{a}+{b}", self.record(f"{a}+{b}=", str(a + b), a=a, b=b)

    def check(self, record, answer):
        if not _INT.fullmatch(answer) or len(answer) > 40:
            return False, False
        return int(answer) == int(record["answer"]), True


class CountdownTask(ProceduralTask):
    name = "countdown"
    description = ("reach a target with each given number once and + - * / "
                   "(levels 1-3: 2, 3, 4 numbers)")
    instruction = ("Combine the numbers with + - * / and parentheses, each exactly once, to make "
                   "the target. Reply with the expression only.")
    levels = {1: {"n": 2, "max": 20}, 2: {"n": 3, "max": 9}, 3: {"n": 4, "max": 20}}
    #: limits for parsing a candidate expression (see jaxgrpo.tasks.safe_arith).
    limits = {"max_chars": 120, "max_tokens": 60, "max_depth": 12, "max_digits": 6,
              "max_bits": 128, "allow_pow": False}

    def make(self, rng):
        n, hi = self.params["n"], self.params["max"]
        while True:
            nums = [rng.randint(1, hi) for _ in range(n)]
            expr, value, additive = str(nums[0]), nums[0], False
            for x in nums[1:]:
                op = rng.choice("+-*/")
                if op == "/" and (x == 0 or value % x != 0):
                    op = "*"
                if op in "*/" and additive:
                    expr = f"({expr})"
                expr += f"{op}{x}"
                value = {"+": value + x, "-": value - x, "*": value * x,
                         "/": value // x if x else 0}[op]
                additive = op in "+-"
            if value > 0:
                break
        shown = sorted(nums)
        key = f"{shown}->{value}"
        question = f"make {value} from {' '.join(map(str, shown))}="
        return key, self.record(question, expr, numbers=shown, target=value)

    def check(self, record, answer):
        try:
            value, literals = evaluate_with_literals(answer, **self.limits)
        except ArithmeticLimitError:
            return False, False
        uses_all = sorted(literals) == sorted(record["numbers"])
        return uses_all and value == record["target"], True


for _cls in (ReverseTask, SortTask, AdditionTask, CountdownTask):
    register_task(_cls.name, _cls, description=_cls.description)

#: Task mixtures: ``{task spec: ratio}``; ratios sum to 1.
MIXTURES: dict[str, dict[str, float]] = {
    "demo": {"reverse@1": 1 / 3, "addition@1": 1 / 3, "countdown@2": 1 / 3},
    "demo-hard": {"reverse@2": 1 / 3, "addition@2": 1 / 3, "countdown@3": 1 / 3},
    "cpu-demo": {"reverse@2": 1 / 3, "countdown@1": 1 / 3, "countdown@2": 1 / 3},
}
