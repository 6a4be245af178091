"""Adapters for the optional ``[tasks]`` extra: reasoning-gym datasets and math problem files.

* :class:`ReasoningGymTask` (``get_task("rg", dataset="countdown", level=2)``, or the
  MT-GRPO presets ``rg_countdown``, ``rg_zebra``, ``rg_arc1d`` with ``level`` 1-3: Countdown with
  3/4/5 numbers, Zebra puzzles with 3/4/5 people and properties, 1-D ARC with grids of 10/20/30
  cells; arXiv 2602.05547 §6). The completion's answer is the content of its last
  ``<answer>…</answer>`` pair, scored by reasoning-gym's own ``score_answer``. reasoning-gym
  gives partial credit (Countdown: 0.01 unparsable, 0.05 wrong value), so ``correct`` is
  ``score == 1`` and the reward is binary unless ``partial_credit=True``. ``format_bonus=0.1``
  gives the MT-GRPO paper's reward (1 correct, 0.1 for a wrong answer inside the tags, 0 without
  an answer; never added to a correct one). Countdown answers are
  checked against :mod:`jaxgrpo.tasks.safe_arith`'s grammar first, since reasoning-gym parses
  them with sympy (which uses ``eval``): anything else never reaches it. Train and eval use
  different generator seeds (``seed`` and ``seed + 1_000_003``); unlike the built-in tasks
  they are not guaranteed disjoint.
* :class:`MathFileTask` (``get_task("math_file", path="train.jsonl")``): JSONL or Parquet rows
  with a problem and an answer (the BAE setting), checked with math-verify. The answer is the
  content of the last ``<answer>…</answer>`` pair, wrapped in ``\\boxed{}`` before parsing
  (as BAE's math evaluation, arXiv 2602.10231); without tags, math-verify searches the whole completion. math-verify's
  own ``signal.alarm`` timeouts are off: run it through :mod:`jaxgrpo.tasks.runner` for a limit.
"""

from __future__ import annotations

import json
import logging
import pathlib
from collections.abc import Sequence

from jaxgrpo.tasks.base import Score, Task, check_split, register_task
from jaxgrpo.tasks.safe_arith import ArithmeticLimitError, evaluate

MAX_ANSWER_CHARS = 2_000
EVAL_SEED_OFFSET = 1_000_003


def last_tag_content(text: str, tag: str = "answer") -> str | None:
    """The stripped content of the last ``<tag>…</tag>`` pair, or ``None``."""
    open_tag, close_tag = f"<{tag}>", f"</{tag}>"
    j = text.rfind(close_tag)
    if j < 0:
        return None
    i = text.rfind(open_tag, 0, j)
    if i < 0:
        return None
    return text[i + len(open_tag):j].strip()


class _JsonSequence(Sequence):
    """A lazy view of a sequence whose items are JSON round-tripped (tuples become lists)."""

    def __init__(self, items, extra: dict):
        self._items, self._extra = items, extra

    def __len__(self):
        return len(self._items)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return {**json.loads(json.dumps(self._items[i], default=str)), **self._extra}


# MT-GRPO levels (easy/medium/hard) for three reasoning-gym datasets.
RG_LEVELS = {
    "countdown": {lv: {"min_numbers": n, "max_numbers": n} for lv, n in ((1, 3), (2, 4), (3, 5))},
    "zebra_puzzles": {lv: {"num_people": n, "num_characteristics": n}
                      for lv, n in ((1, 3), (2, 4), (3, 5))},
    "arc_1d": {lv: {"min_size": n, "max_size": n} for lv, n in ((1, 10), (2, 20), (3, 30))},
}


class ReasoningGymTask(Task):
    """A reasoning-gym dataset as a task (see the module docstring)."""

    def __init__(self, *, dataset: str, level: int | None = None, size: int = 10_000,
                 partial_credit: bool = False, format_bonus: float = 0.0, **config):
        try:
            import reasoning_gym  # noqa: F401
        except ImportError as e:
            raise ImportError("the 'rg' tasks need reasoning-gym (pip install "
                              "'jaxgrpo[tasks]')") from e
        if not isinstance(dataset, str) or not dataset:
            raise ValueError(f"dataset must be a reasoning-gym dataset name, got {dataset!r}")
        if level is not None:
            if dataset not in RG_LEVELS or level not in RG_LEVELS[dataset]:
                raise ValueError(f"level is defined for {sorted(RG_LEVELS)} with levels 1-3; "
                                 f"got dataset={dataset!r}, level={level!r}")
            config = {**RG_LEVELS[dataset][level], **config}
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if isinstance(format_bonus, bool) or not isinstance(format_bonus, int | float) or \
                not 0.0 <= format_bonus < 1.0:
            raise ValueError(f"format_bonus must be a number in [0, 1), got {format_bonus!r}")
        if format_bonus and partial_credit:
            raise ValueError("give partial_credit or format_bonus, not both")
        self.format_bonus = float(format_bonus)
        self.rg_name, self.level, self.size = dataset, level, size
        self.partial_credit, self.config = bool(partial_credit), dict(config)
        self.name = f"rg:{dataset}" + (f"@{level}" if level is not None else "")
        self.description = f"reasoning-gym {dataset}"
        self._score_fn = None

    def __getstate__(self):
        return {**self.__dict__, "_score_fn": None}

    def dataset(self, split: str = "train", seed: int = 0) -> Sequence[dict]:
        import reasoning_gym

        check_split(split)
        rg_seed = seed if split == "train" else seed + EVAL_SEED_OFFSET
        ds = reasoning_gym.create_dataset(self.rg_name, size=self.size, seed=rg_seed,
                                          **self.config)
        return _JsonSequence(ds, {"task": self.name})

    def prompt(self, record: dict) -> str:
        return (f"{record['question']}\nGive only the final answer inside "
                "<answer></answer>.")

    def gold_completion(self, record: dict) -> str:
        return f"<answer>{record['answer']}</answer>"

    def _answer_ok(self, answer: str) -> bool:
        if len(answer) > MAX_ANSWER_CHARS:
            return False
        if self.rg_name == "countdown":
            try:
                evaluate(answer, max_chars=200, max_depth=12, max_bits=128, allow_pow=False)
            except ArithmeticLimitError:
                return False
        return True

    def warmup(self) -> None:
        import reasoning_gym

        self._score_fn = reasoning_gym.get_score_answer_fn(self.rg_name)

    def check_answer(self, record: dict, answer: str) -> bool:
        return self._rg_score(record, answer.strip()) >= 1.0

    def _rg_score(self, record: dict, answer: str) -> float:
        if not self._answer_ok(answer):
            return 0.0
        if self._score_fn is None:
            import reasoning_gym

            self._score_fn = reasoning_gym.get_score_answer_fn(self.rg_name)
        return float(self._score_fn(answer=answer, entry=record))

    def verify(self, record: dict, completion: str) -> Score:
        answer = last_tag_content(completion)
        if answer is None or not self._answer_ok(answer):
            return Score(0.0, False, False)
        s = self._rg_score(record, answer)
        correct = s >= 1.0
        if self.partial_credit:
            return Score(s, correct, True)
        return Score(1.0 if correct else self.format_bonus, correct, True)


def load_records(path: str | pathlib.Path) -> list[dict]:
    """Rows of a ``.jsonl`` or ``.parquet`` file as dicts."""
    path = pathlib.Path(path)
    if not path.exists():
        raise ValueError(f"path {str(path)!r} does not exist")
    if path.suffix == ".jsonl":
        with path.open() as f:
            return [json.loads(line) for line in f if line.strip()]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise ValueError(f"path must end in .jsonl or .parquet, got {str(path)!r}")


class MathFileTask(Task):
    """Math problems from JSONL/Parquet files, verified with math-verify.

    Args:
      path: the file for both splits, or ``train_path`` / ``eval_path`` per split.
      question_key, answer_key: column names (default "problem", "answer").
    """

    def __init__(self, *, path: str | None = None, train_path: str | None = None,
                 eval_path: str | None = None, question_key: str = "problem",
                 answer_key: str = "answer", name: str = "math_file"):
        if path is None and train_path is None and eval_path is None:
            raise ValueError("math_file needs path= (or train_path= / eval_path=)")
        self.paths = {"train": train_path or path, "eval": eval_path or path}
        self.question_key, self.answer_key = question_key, answer_key
        self.name, self.description = name, "math problems from a file, checked by math-verify"
        self._gold_cache: dict[str, object] = {}

    def __getstate__(self):
        return {**self.__dict__, "_gold_cache": {}}

    def dataset(self, split: str = "train", seed: int = 0) -> Sequence[dict]:
        check_split(split)
        if self.paths[split] is None:
            raise ValueError(f"no file given for split {split!r}")
        rows = load_records(self.paths[split])
        out = []
        for k, row in enumerate(rows):
            for key in (self.question_key, self.answer_key):
                if key not in row:
                    raise ValueError(f"{self.paths[split]} row {k} has no {key!r} column")
            out.append({"task": self.name, "question": str(row[self.question_key]),
                        "answer": str(row[self.answer_key])})
        return out

    def prompt(self, record: dict) -> str:
        return f"{record['question']}\nPut the final answer inside <answer></answer>."

    def gold_completion(self, record: dict) -> str:
        return f"<answer>{record['answer']}</answer>"

    @staticmethod
    def _mv():
        import math_verify

        logging.getLogger("math_verify").setLevel(logging.ERROR)
        return math_verify

    def warmup(self) -> None:
        mv = self._mv()
        mv.verify(mv.parse("$1$", parsing_timeout=None), mv.parse("$1$", parsing_timeout=None),
                  timeout_seconds=None)

    def _gold(self, answer: str):
        if answer not in self._gold_cache:
            mv = self._mv()
            self._gold_cache[answer] = mv.parse(f"\\boxed{{{answer}}}", parsing_timeout=None)
        return self._gold_cache[answer]

    def check_answer(self, record: dict, answer: str) -> bool:
        answer = answer.strip()
        if not answer or len(answer) > MAX_ANSWER_CHARS:
            return False
        mv = self._mv()
        pred = mv.parse(f"\\boxed{{{answer}}}", parsing_timeout=None)
        gold = self._gold(record["answer"])
        return bool(pred) and bool(gold) and bool(mv.verify(gold, pred, timeout_seconds=None))

    def verify(self, record: dict, completion: str) -> Score:
        answer = last_tag_content(completion)
        if answer is None:
            tail = completion[-MAX_ANSWER_CHARS:]
            mv = self._mv()
            pred = mv.parse(tail, parsing_timeout=None)
            gold = self._gold(record["answer"])
            ok = bool(pred) and bool(gold) and bool(mv.verify(gold, pred, timeout_seconds=None))
            return Score(float(ok), ok, False)
        ok = self.check_answer(record, answer)
        return Score(float(ok), ok, True)


def _rg_factory(dataset_name: str | None):
    def factory(**options) -> ReasoningGymTask:
        if dataset_name is not None:
            options.setdefault("level", 2)
            return ReasoningGymTask(dataset=dataset_name, **options)
        return ReasoningGymTask(**options)

    return factory


register_task("rg", _rg_factory(None),
              description="any reasoning-gym dataset (options dataset=NAME, level, size)")
register_task("rg_countdown", _rg_factory("countdown"),
              description="reasoning-gym Countdown, MT-GRPO levels 1-3 (3/4/5 numbers)")
register_task("rg_zebra", _rg_factory("zebra_puzzles"),
              description="reasoning-gym Zebra puzzles, MT-GRPO levels 1-3 (3/4/5 people)")
register_task("rg_arc1d", _rg_factory("arc_1d"),
              description="reasoning-gym 1-D ARC, MT-GRPO levels 1-3 (10/20/30 cells)")
register_task("math_file", MathFileTask,
              description="math problems from a JSONL/Parquet file (option path=), math-verify")
