"""An adversarial corpus: every line gets a finite reward, nothing escapes, all of it is fast.

Through the Python API (``score_many`` on a fresh pool, start-up included) and through
``jaxgrpo score``. The time bounds are the task's explicit requirement (< 10 s for the corpus).
"""

import json
import math
import pathlib
import random
import subprocess
import sys
import time

from jaxgrpo.tasks import VerifierPool, get_task

ROOT = pathlib.Path(__file__).resolve().parents[2]


def adversarial_strings() -> list[str]:
    s = [
        "", " ", "\n", "\x00", "\t\r\n", "\ud800", "\ufeff1", "🙂" * 1000,
        "9**9**9**9", "9^9^9^9", "2**1000000", "10**10**10", "(9**9)**(9**9)", "-(2**64)**64",
        "(" * 10_000, ")" * 10_000, "(" * 500 + "1" + ")" * 500, "(" * 50 + "1" + ")" * 49,
        "-" * 5000 + "1", "1" + "*1" * 5000, "+".join(["9"] * 1000), "1" * 13, "0" * 50,
        "__import__('os').system('echo pwned')", "eval('1+1')", "exec('import os')",
        "().__class__.__bases__[0].__subclasses__()", "lambda: 0", "open('/etc/passwd').read()",
        "globals()", "1e308*1e308", "nan", "NaN", "inf", "-inf", "1/0", "0/0", "0**-1",
        "１２３", "٣٤", "½", "𝟗𝟗", "²", "३+४", "1\u200b2",
        "7" * 1_000_000, "x" * 1_000_000, "<answer>" * 100_000, "a" * 19_999 + "\n",
        "<answer>", "</answer>", "<answer></answer>", "<answer>1</answer>" * 1000,
        "<answer><answer>1</answer></answer>", "</answer><answer>", "\\boxed{" * 1000,
        "<confidence>nan</confidence>", "<confidence>" * 1000, "((1+2)*(3-4)/5)**2",
        "1-1-1-1-1-1", "8/0*0",
    ]
    rng = random.Random(0)
    alphabet = "0123456789+-*/^() .e<>"
    s += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 200))) for _ in range(40)]
    return s


CONFS = ["nan", "NaN", "inf", "-inf", "1e999", "-0", "1.5", "-1", "0.5" * 1000, "１", "0x1",
         "", "   ", "0.7</confidence><confidence>0.1", "1e-999", "0.99999999999999999999", "80%"]


def conf_completion(answer: str, conf: str) -> str:
    return (f"<reasoning>{answer[:100]}</reasoning><answer>{answer}</answer>"
            f"<analysis>x</analysis><confidence>{conf}</confidence>")


def corpus():
    """``{task spec or option string: [completion, ...]}``, over 200 lines in total."""
    strings = adversarial_strings()
    confs = [CONFS[i % len(CONFS)] for i in range(len(strings))]
    structured = [conf_completion(a, c) for a, c in zip(strings, confs, strict=True)]
    structured += ["<answer>1+2</answer><analysis>" + "<" * 100_000, "<confidence>0.5</confidence>",
                   "<answer>1</answer><confidence>0.5</confidence>" * 50]
    two = [f"<answer>{a}</answer><reasoning>r</reasoning><answer>{a[::-1]}</answer>"
           for a in strings[:40]]
    return {"countdown@2": strings, "addition@1": strings[::2], "confidence": structured,
            "two_attempt": two}


TASK_OPTIONS = {"confidence": {"base": "countdown@2", "on_malformed": "worst_score"},
                "two_attempt": {"base": "countdown@2"}}


def test_corpus_through_the_python_api():
    items = corpus()
    tasks, records, completions = [], [], []
    for spec, comps in items.items():
        task = get_task(spec, **TASK_OPTIONS.get(spec, {}))
        ds = task.dataset(split="eval", seed=0)
        for i, c in enumerate(comps):
            tasks.append(task)
            records.append(ds[i])
            completions.append(c)
    assert len(completions) >= 200
    start = time.monotonic()
    with VerifierPool(workers=2, timeout_s=2.0) as pool:
        scores = pool.score(tasks, records, completions)
    elapsed = time.monotonic() - start
    assert len(scores) == len(completions)
    for c, s in zip(completions, scores, strict=True):
        assert math.isfinite(s.reward) and all(math.isfinite(b) for b in s.blocks), (c[:80], s)
        assert s.confidence is None or 0.0 <= s.confidence <= 1.0
        assert s.error is None or not s.error.startswith(("timeout", "worker")), (c[:80], s)
    assert sum(s.correct for s in scores) == 0  # none of these is a right answer
    assert elapsed < 10.0, f"corpus took {elapsed:.1f}s"
    # Task.score in this process gives exactly the same scores (nothing needed the time limit)
    inline = [t.score(r, c) for t, r, c in zip(tasks, records, completions, strict=True)]
    assert inline == scores


def test_corpus_through_the_cli(tmp_path):
    for spec, comps in corpus().items():
        if spec not in ("countdown@2", "confidence"):
            continue
        task = get_task(spec, **TASK_OPTIONS.get(spec, {}))
        ds = task.dataset(split="eval", seed=0)
        path = tmp_path / "in.jsonl"
        with path.open("w") as f:
            for i, c in enumerate(comps):
                f.write(json.dumps({"example": ds[i], "completion": c}) + "\n")
            f.write("not json\n")
            f.write(json.dumps({"example": {}, "completion": "1"}) + "\n")
            f.write(json.dumps({"example": ds[0], "completion": 5}) + "\n")
            f.write(json.dumps({"example": ds[0], "completion": task.gold_completion(ds[0])}) + "\n")
        cmd = [sys.executable, "-m", "jaxgrpo.cli", "score", "--task", spec, "--input", str(path)]
        for k, v in TASK_OPTIONS.get(spec, {}).items():
            cmd += ["--opt", f"{k}={v}"]
        start = time.monotonic()
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        elapsed = time.monotonic() - start
        assert out.returncode == 0, out.stderr
        lines = [json.loads(line) for line in out.stdout.splitlines()]
        assert len(lines) == len(comps) + 4
        for rec in lines:
            assert set(rec) >= {"reward", "correct", "error"}
            assert isinstance(rec["reward"], float) and math.isfinite(rec["reward"])
        assert not any(r["correct"] for r in lines[:-1]) and lines[-1]["correct"]
        assert lines[-4]["error"].startswith("bad input") and lines[-2]["error"]
        assert not lines[-3]["correct"]  # an empty example
        assert elapsed < 10.0, f"{spec}: jaxgrpo score took {elapsed:.1f}s"
