"""Streamed against round-based dynamic sampling: wall time and prompts generated per RL step.

Usage (from the repository root):
    PYTHONPATH=$PWD python benchmarks/stream_vs_rounds.py --model DIR [--steps 30]
        [--algos dapo mt_grpo] [--out FILE]

``--model`` is an HF checkpoint of the demo policy after its SFT warm start (for instance
``DIR/sft_model`` written by ``benchmarks/mtgrpo_experiment.py``); without it the script runs
the demo's SFT warm start first and saves it under ``--workdir``. Every arm trains from the same
checkpoint, seed and prompts on the demo mixture (``cpu-demo``), with DAPO's sampling settings
(3x oversampling, strict zero-advantage filter, at most 10 rounds) and for MT-GRPO its task
weights and the ratio-preserving sampler:

  rounds/static   whole rounds of ceil(3 B) prompts, the static sampler (the default)
  rounds/paged    whole rounds, the paged engine
  stream/paged    prompts fed to the paged engine while it decodes, finished groups streamed
                  into the batch sampler, generation stopped once every per-task count is met

For each arm it reports, over the steps after ``--skip`` (compilation), the mean step time, the
rollout (generation + verification) time, prompts generated, rounds, prompts dropped in flight
and the fraction of steps that hit the cap, and for each algorithm the ratios of the
round-based arms' step time to the streamed one's, taken in this one run. The arms of an
algorithm run one after another on the same machine: on a shared machine the ratios carry its
load swings. Prints the JSON (and writes it to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _report import report  # noqa: E402

DYNAMIC = {"algo.sampling.oversample": 3.0, "algo.sampling.max_rounds": 10,
           "algo.sampling.filter": "strict", "loss.clip_high": 0.28}
ALGOS = {
    "dapo": {"algo.name": "dapo", "algo.sampling.enabled": True, **DYNAMIC},
    "mt_grpo": {"algo.name": "mt_grpo", "algo.mt_grpo.lam": 0.2, **DYNAMIC},
}
ARMS = {
    "rounds/static": {"rollout.engine": "static"},
    "rounds/paged": {"rollout.engine": "paged"},
    "stream/paged": {"rollout.engine": "paged", "algo.sampling.stream": True},
}


def log(msg: str) -> None:
    print(f"[stream-vs-rounds {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def warm_start(workdir: pathlib.Path) -> pathlib.Path:
    from jaxgrpo.config import load_config
    from jaxgrpo.train import loop

    target = workdir / "sft_model"
    if (target / "config.json").exists():
        return target
    cfg = load_config(None, [f"train.workdir={workdir / 'sft'}"])
    log(f"SFT warm start: {cfg.model.sft.steps} steps")
    su = loop.setup(cfg)
    loop.warm_start(cfg, su, su.params, target)
    return target


def run_arm(args, algo: str, arm: str, model: pathlib.Path) -> dict:
    from jaxgrpo.config import load_config
    from jaxgrpo.train import loop

    workdir = args.workdir / algo / arm.replace("/", "_")
    kv = {"train.workdir": str(workdir), "train.seed": 0, "train.steps": args.steps,
          "train.eval_every": 0, "tasks.eval_prompts": 4, "rollout.eval_samples": 1,
          "model.path": str(model), "model.sft.steps": 0, "logging.progress": False,
          "checkpoint.every": 0, "rollout.max_slots": args.slots, **ALGOS[algo], **ARMS[arm]}
    cfg = load_config(None, [f"{k}={v}" for k, v in kv.items()])
    t0 = time.perf_counter()
    with open(args.workdir / f"{algo}_{arm.replace('/', '_')}.log", "w") as stream:
        loop.run(cfg, stream=stream)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    steps = [r for r in rows if "time/step_s" in r and int(r["step"]) > args.skip]

    def mean(key, default=0.0):
        vals = [r.get(key, default) for r in steps]
        return float(np.mean(vals)) if vals else float("nan")

    out = {"steps_measured": len(steps), "wall_s": wall,
           "step_s": mean("time/step_s"), "rollout_s": mean("time/rollout_s"),
           "verify_s": mean("time/verify_s"), "update_s": mean("time/update_s"),
           "prompts_generated": mean("rps/generated"), "rounds": mean("rps/rounds"),
           "dropped_prompts": mean("rps/dropped"), "hit_cap_frac": mean("rps/hit_cap"),
           "completion_tokens": mean("rollout/tokens")}
    log(f"{algo} {arm}: {out['step_s']:.2f} s/step, {out['prompts_generated']:.0f} prompts/step")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--model", type=pathlib.Path, default=None,
                    help="HF checkpoint after the SFT warm start (default: run it)")
    ap.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("runs/stream_vs_rounds"))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--skip", type=int, default=2, help="first steps left out (compilation)")
    ap.add_argument("--slots", type=int, default=256, help="rollout.max_slots of the paged arms")
    ap.add_argument("--algos", nargs="+", default=list(ALGOS), choices=list(ALGOS))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.steps <= args.skip:
        ap.error(f"--steps ({args.steps}) must exceed --skip ({args.skip})")
    if args.model is not None and not (args.model / "config.json").exists():
        ap.error(f"--model {args.model} has no config.json: give an HF checkpoint directory")
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = args.model.resolve() if args.model else warm_start(args.workdir)
    results = {}
    for algo in args.algos:
        results[algo] = {arm: run_arm(args, algo, arm, model) for arm in ARMS}
        s = results[algo]["stream/paged"]["step_s"]
        results[algo]["step_time_ratio_vs_stream"] = {
            arm: results[algo][arm]["step_s"] / s for arm in ARMS if arm != "stream/paged"}
        g = results[algo]["stream/paged"]["prompts_generated"]
        results[algo]["prompts_ratio_vs_stream"] = {
            arm: results[algo][arm]["prompts_generated"] / g for arm in ARMS
            if arm != "stream/paged"}
    report({"command": " ".join(["python", "benchmarks/stream_vs_rounds.py", *sys.argv[1:]]),
            "machine": f"{platform.machine()}, shared 2-core CPU (timings are noisy)",
            "settings": {"steps": args.steps, "skip": args.skip, "slots": args.slots,
                         "algos": {a: ALGOS[a] for a in args.algos}, "arms": ARMS},
            "results": results}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
