"""The trainer's logged ``perf/update_mfu`` against the train-step benchmark, same shapes, one run.

Usage (from the repository root):
    PYTHONPATH=$PWD python benchmarks/mfu_agreement.py [--steps 8] [--out FILE]

Runs a short demo-shaped training run (the built-in demo config: P=16, G=8, prompts in the
24-token bucket, 10 new tokens; no SFT warm start, no checkpoints, a small evaluation), then
``benchmarks/train_step_throughput.py`` on the demo model with the run's batch shape
``[P*G, 24 + 10]`` and the run's fraction of real tokens, and prints one JSON object: the run's
median ``perf/update_mfu`` over its steps after the first (which compiles), the benchmark's
``mfu`` against the same denominator (the run's logged ``perf/peak_flops``: two measurements
of one machine's peak differ by more than the agreement asked of the step times), and their
ratio. The benchmark's own peak measurement is reported beside it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile

from jaxgrpo.config import load_config
from jaxgrpo.train import loop

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import train_step_throughput  # noqa: E402
from _report import report  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as d:
        cfg = load_config(None, [f"train.workdir={d}", f"train.steps={args.steps}",
                                 "model.sft.steps=0", "tasks.eval_prompts=4",
                                 "rollout.eval_samples=2", "checkpoint.every=0",
                                 "logging.progress=false"])
        loop.run(cfg, stream=io.StringIO())
        rows = [json.loads(line) for line in open(f"{d}/metrics.jsonl")]
    rows = [r for r in rows if "perf/update_mfu" in r][1:]
    n = cfg.tasks.prompts_per_step * cfg.rollout.group_size
    t = max(cfg.rollout.prompt_buckets) + cfg.rollout.max_new_tokens
    real = statistics.median(r["update/tokens"] for r in rows) / (n * t)
    bench = train_step_throughput.main(["--preset", "demo", "--rows", str(n), "--seq", str(t),
                                        "--real-frac", f"{real:.4f}", "--repeats", "5",
                                        "--peak-flops", repr(rows[0]["perf/peak_flops"])])
    run_mfu = statistics.median(r["perf/update_mfu"] for r in rows)
    out = {
        "run": {"steps_used": len(rows), "update_mfu_median": run_mfu,
                "update_mfu_all": [r["perf/update_mfu"] for r in rows],
                "update_s_median": statistics.median(r["time/update_s"] for r in rows),
                "peak_flops": rows[0]["perf/peak_flops"], "real_token_frac": real},
        "benchmark": bench,
        "run_over_benchmark": run_mfu / bench["mfu"],
        # the machine's 1/5/15-minute load averages, before and after (other users' jobs too)
        "loadavg_before_after": [load_before, os.getloadavg()],
    }
    report(out, args.out)


if __name__ == "__main__":
    main()
