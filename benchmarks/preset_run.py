"""Run a shipped CPU preset as a user would and record what it learns, for its config header.

``python benchmarks/preset_run.py configs/dapo_single_task.yaml [key=value ...] --out FILE``
runs ``jaxgrpo train`` on the config (through :func:`jaxgrpo.train.loop.run`, the same code as
the command) and writes one JSON object: the command, wall-clock seconds (SFT, evaluations and
RL included), the per-task accuracy before and after RL (and before SFT), and from
``metrics.jsonl`` the mean step time, the fraction of steps that hit the dynamic-sampling round
cap and the mean number of padded groups per batch. Timings come from whatever machine runs it
(note when it was shared).

Every evaluation (before SFT, before RL, the periodic ones, after RL) is recorded per prompt, so
each accuracy comes with its standard error over the held-out prompts (the std of the per-prompt
means / sqrt(P): the samples of one prompt are not independent), and the change from before to
after RL with its paired standard error (the same prompts are evaluated both times). The mean
reward and, for structured tasks, each block's mean reward are recorded the same way (for the
confidence tasks block 1 is the Brier reward -(q - c)^2).
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

    calls = []  # one {task: per-prompt arrays} per evaluation, in order
    evaluate = loop.evaluate

    def recording_evaluate(*a, **kw):
        seen = {}
        collect = loop.rollouts.collect

        def recording_collect(items, **ckw):
            groups = collect(items, **ckw)
            seen[next(iter(ckw["task_index"]))] = groups
            return groups

        loop.rollouts.collect = recording_collect
        try:
            out = evaluate(*a, **kw)
        finally:
            loop.rollouts.collect = collect
        calls.append({name: _per_prompt(g) for name, g in seen.items()})
        return out

    loop.evaluate = recording_evaluate
    with tempfile.TemporaryDirectory() as tmp:
        workdir = os.path.join(tmp, "run")
        cfg = load_config(args.config, [*args.overrides, f"train.workdir={workdir}"])
        t0 = time.perf_counter()
        try:
            summary = loop.run(cfg)
        finally:
            loop.evaluate = evaluate
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
    sft = cfg.model.sft.steps > 0
    names = ["before_sft"] * sft + ["before_rl"] + ["periodic"] * (len(calls) - 2 - sft) + [
        "after_rl"]
    out["evals"] = [{"at": at, "tasks": {k: _stats(v) for k, v in c.items()}}
                    for at, c in zip(names, calls, strict=True)]
    out["change"] = _change(calls[sft], calls[-1])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out, indent=1))
    return 0


def _per_prompt(groups) -> dict:
    """Per-prompt means of one task's evaluation: correctness, reward, each block's reward."""
    out = {"accuracy": groups.correct.mean(axis=1), "reward": groups.rewards.mean(axis=1),
           "samples": int(groups.correct.size)}
    for k in range(groups.blocks.shape[-1]):
        out[f"block{k}_reward"] = groups.blocks[..., k].mean(axis=1)
    return out


def _se(x) -> float:
    import numpy as np

    return float(np.std(x, ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


def _stats(per_prompt: dict) -> dict:
    out = {"prompts": len(per_prompt["accuracy"]), "samples": per_prompt["samples"]}
    for k, v in per_prompt.items():
        if k != "samples":
            out[k] = float(v.mean())
            out[k + "_se"] = _se(v)
    return out


def _change(before: dict, after: dict) -> dict:
    """After minus before, per task and metric, with the paired SE over the shared prompts."""
    out = {}
    for task, b in before.items():
        a = after[task]
        out[task] = {}
        for k in b:
            if k != "samples":
                d = a[k] - b[k]
                out[task][k] = {"before": float(b[k].mean()), "after": float(a[k].mean()),
                                "diff": float(d.mean()), "diff_se": _se(d),
                                "z": float(d.mean() / _se(d)) if _se(d) > 0 else None}
    return out


if __name__ == "__main__":
    sys.exit(main())
