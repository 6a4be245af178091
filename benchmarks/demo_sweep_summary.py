"""Summarise demo-sweep runs (``benchmarks/preset_run.py`` JSON files) with standard errors.

``python benchmarks/demo_sweep_summary.py benchmarks/results/demo/run*.json --out FILE.md``

The evaluation reports each task's accuracy as the mean correctness over ``n`` held-out prompts
x ``k`` samples. Samples of one prompt are correlated, so the standard error is taken over
prompts: with per-prompt means ``m_i`` in [0, 1] and overall mean ``p``, ``Var(m_i) <= p(1-p)``,
hence ``SE = sqrt(p(1-p)/n)`` is an upper bound on the prompt-level standard error (it is the
exact one when every prompt is all-correct or all-wrong). The change after RL is judged against
``SE_diff = sqrt(SE_before^2 + SE_after^2)``, the same prompts being scored before and after
(positively correlated scores make the true SE of the difference smaller still).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys


def prompt_se(p: float, n: int) -> float:
    """Upper bound on the standard error over ``n`` prompts of a mean accuracy ``p``."""
    return math.sqrt(max(p * (1.0 - p), 0.0) / n)


def rows(run: dict) -> list[dict]:
    n = int(re.match(r"(\d+) held-out prompts", run["eval"]).group(1))
    out = []
    for task, before in run["accuracy_before_rl"].items():
        after = run["accuracy_after_rl"][task]
        se_b, se_a = prompt_se(before, n), prompt_se(after, n)
        se_d = math.hypot(se_b, se_a)
        out.append({"task": task, "before": before, "after": after, "se_before": se_b,
                    "se_after": se_a, "se_diff": se_d,
                    "z": (after - before) / se_d if se_d > 0 else float("nan")})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--out", required=True, help="markdown file")
    args = ap.parse_args(argv)
    lines = ["| run | task | before RL | after RL | change / SE_diff | wall s (shared) |",
             "|---|---|---|---|---|---|"]
    for path in args.runs:
        run = json.load(open(path, encoding="utf-8"))
        for r in rows(run):
            lines.append(f"| {path.rsplit('/', 1)[-1]} | {r['task']} | {r['before']:.3f} ± "
                         f"{r['se_before']:.3f} | {r['after']:.3f} ± {r['se_after']:.3f} | "
                         f"{r['z']:+.1f} | {run['wall_s']} |")
    text = "\n".join(lines) + "\n"
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
