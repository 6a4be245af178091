"""Run a shipped CPU preset as a user would and record what it learns, for its config header.

``python benchmarks/preset_run.py configs/dapo_single_task.yaml [key=value ...] --out FILE``
runs ``jaxgrpo train`` on the config (through :func:`jaxgrpo.train.loop.run`, the same code as
the command) and writes one JSON object: the command, wall-clock seconds (SFT, evaluations and
RL included), the per-task accuracy before and after RL (and before SFT), and from
``metrics.jsonl`` the mean step time, the fraction of steps that hit the dynamic-sampling round
cap and the mean number of padded groups per batch. Timings come from whatever machine runs it
(note when it was shared).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--out", required=True, help="results JSON file")
    args = ap.parse_args(argv)

    from jaxgrpo.config import load_config
    from jaxgrpo.train import loop

    with tempfile.TemporaryDirectory() as tmp:
        workdir = os.path.join(tmp, "run")
        cfg = load_config(args.config, [*args.overrides, f"train.workdir={workdir}"])
        t0 = time.perf_counter()
        summary = loop.run(cfg)
        seconds = time.perf_counter() - t0
        rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    steps = [r for r in rows if "time/step_s" in r]
    mean = lambda k: (sum(r.get(k, 0.0) for r in steps) / len(steps)) if steps else None
    out = {
        "command": " ".join(["python", "benchmarks/preset_run.py", args.config, *args.overrides,
                             "--out", args.out]),
        "config": args.config,
        "overrides": args.overrides,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared: timings are noisy)",
        "wall_s": round(seconds, 1),
        "rl_steps": len(steps),
        "step_s_mean": mean("time/step_s"),
        "hit_cap_frac": mean("rps/hit_cap"),
        "padded_groups_mean": mean("rps/num_padded"),
        "batch_prompts": cfg.tasks.prompts_per_step,
        "accuracy_init": summary.get("accuracy_init"),
        "accuracy_before_rl": summary["accuracy_before"],
        "accuracy_after_rl": summary["accuracy_after"],
        "eval": f"{cfg.tasks.eval_prompts} held-out prompts x {cfg.rollout.eval_samples} samples "
                f"at T={cfg.rollout.eval_temperature}",
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
