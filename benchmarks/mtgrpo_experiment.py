"""MT-GRPO at CPU scale: the paper's Exp. 1 protocol (arXiv 2602.05547 §6, App. D.2) on the demo mixture.

Usage (from the repository root):
    PYTHONPATH=$PWD python benchmarks/mtgrpo_experiment.py [--out DIR] [--seeds 0 1 2]
        [--steps 200] [--eval-every 25] [--jobs 2] [--arms grpo dapo ...] [--mixture cpu-demo]
    PYTHONPATH=$PWD python benchmarks/mtgrpo_experiment.py --smoke --out /tmp/mt   (CI, ~1 min)

What it does:
1. One SFT warm start on gold completions (the demo's: 800 steps), saved once as an HF
   checkpoint under ``DIR/sft_model`` and shared by every run, so all arms start from the same
   policy.
2. Every arm x seed runs ``jaxgrpo train`` (in its own process, ``--jobs`` at a time) from that
   checkpoint on the demo's mixture (``cpu-demo``: reverse@2, countdown@1, countdown@2; any
   built-in mixture with ``--mixture``) with the demo's hyperparameters, evaluating every ``--eval-every`` steps on held-out prompts
   (``--eval-prompts`` per task x 8 samples at T = 1, mean@8 as in the paper). Arms:

   ==========  =======================================================================
   grpo        uniform batch, no filter, one round; clip 0.2 / 0.2
   dapo        uniform, dynamic sampling (3x oversampling, zero-advantage filter,
               up to 10 rounds), no per-task preservation; clip 0.2 / 0.28
   mtgrpo_l*   IWU task weights (lambda as named) + the ratio-preserving sampler, with
               DAPO's sampling settings; clip 0.2 / 0.28
   grpo_iwu    IWU weights (lambda 0.2) but one unfiltered round: no ratio preservation
   grpo_rps    uniform weights held fixed + the ratio-preserving sampler
   ==========  =======================================================================

3. Writes ``DIR/results.json`` (every run's eval curve with the completion tokens generated up
   to each evaluation, final per-task accuracy, rounds and prompts generated per step, wall
   time), ``DIR/table.md`` (final worst-task and average accuracy, mean ± SE over seeds; each
   arm's worst-task difference to DAPO and to GRPO with its SE; steps and generated tokens to
   worst-task thresholds, as ratios to DAPO's) and
   ``DIR/worst_task.png``; prints the table.

A run whose ``summary.json`` exists is not repeated: rerunning the command after an
interruption continues the experiment.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]

DYNAMIC = {"algo.sampling.oversample": 3.0, "algo.sampling.max_rounds": 10,
           "algo.sampling.filter": "strict", "loss.clip_high": 0.28}
ARMS: dict[str, dict] = {
    "grpo": {"algo.name": "grpo"},
    "dapo": {"algo.name": "dapo", "algo.sampling.enabled": True, **DYNAMIC},
    "mtgrpo_l0.2": {"algo.name": "mt_grpo", "algo.mt_grpo.lam": 0.2, **DYNAMIC},
    "mtgrpo_l1.2": {"algo.name": "mt_grpo", "algo.mt_grpo.lam": 1.2, **DYNAMIC},
    "grpo_iwu": {"algo.name": "mt_grpo", "algo.mt_grpo.lam": 0.2,
                 "algo.sampling.filter": "none", "algo.sampling.oversample": 1.0,
                 "algo.sampling.max_rounds": 1, "algo.mt_grpo.preserve_ratios": False,
                 "algo.mt_grpo.max_inflation": 1.0},
    "grpo_rps": {"algo.name": "mt_grpo", "algo.mt_grpo.adapt_weights": False, **DYNAMIC},
}
SMOKE = {"tasks.eval_prompts": 4, "rollout.eval_samples": 2,
         "tasks.prompts_per_step": 6}


def log(msg: str) -> None:
    print(f"[mtgrpo-exp {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def overrides(args, arm: str, seed: int, workdir: pathlib.Path) -> list[str]:
    kv = {
        "train.workdir": str(workdir),
        "train.seed": seed,
        "train.steps": args.steps,
        "train.eval_every": args.eval_every,
        "tasks.mixture": args.mixture,
        "tasks.eval_prompts": args.eval_prompts,
        "model.path": str(args.out / "sft_model"),  # replaces the demo preset
        "model.sft.steps": 0,
        "logging.progress": False,
        **(SMOKE if args.smoke else {}),
        **ARMS[arm],
    }
    if args.stream and kv.get("algo.sampling.max_rounds", 1) > 1:  # the filtering arms
        kv.update({"rollout.engine": "paged", "algo.sampling.stream": True})
    return [f"{k}={v}" for k, v in kv.items()]


# ---- stage 1: the shared SFT warm start ------------------------------------------------------


def warm_start(args) -> None:
    target = args.out / "sft_model"
    if (target / "config.json").exists():
        log(f"SFT model exists: {target}")
        return
    from jaxgrpo.config import load_config
    from jaxgrpo.train import loop

    extra = [f"train.workdir={args.out / 'sft'}", f"tasks.mixture={args.mixture}"]
    if args.smoke:
        extra += [f"{k}={v}" for k, v in SMOKE.items()] + ["model.sft.steps=20"]
    cfg = load_config(None, extra)
    log(f"SFT warm start: {cfg.model.sft.steps} steps, batch {cfg.model.sft.batch_size}")
    su = loop.setup(cfg)
    params = loop.warm_start(cfg, su, su.params, target)
    acc = loop.evaluate(su.policy, params, su.tasks, su.eval_sets, cfg, su.eval_key)
    (args.out / "sft_eval.json").write_text(json.dumps(acc, indent=1))
    log("SFT model accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))


# ---- stage 2: one arm x seed (run in its own process) ----------------------------------------


def run_one(args, arm: str, seed: int) -> None:
    from jaxgrpo.config import load_config
    from jaxgrpo.train import loop

    workdir = args.out / "runs" / arm / f"seed{seed}"
    cfg = load_config(None, overrides(args, arm, seed, workdir))
    t0 = time.perf_counter()
    if workdir.exists():  # an interrupted run (no summary.json): start it again
        shutil.rmtree(workdir)
    workdir.parent.mkdir(parents=True, exist_ok=True)
    with open(workdir.parent / f"seed{seed}.log", "w") as stream:
        summary = loop.run(cfg, stream=stream)
    seconds = time.perf_counter() - t0
    (workdir / "summary.json").write_text(json.dumps(
        summarise_run(arm, seed, workdir, summary["accuracy_before"], seconds), indent=1))


def summarise_run(arm, seed, workdir: pathlib.Path, before: dict, seconds: float) -> dict:
    """One run's eval curve and sampler statistics, from its ``metrics.jsonl``."""
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    tasks = sorted(before)
    curve = {0: dict(before)}
    tokens = {0: 0.0}  # completion tokens generated (every round) up to and including a step
    total = 0.0
    for r in rows:
        total += r.get("rollout/tokens", 0.0)
        acc = {t: r[f"eval/{t}/accuracy"] for t in tasks if f"eval/{t}/accuracy" in r}
        if len(acc) == len(tasks):
            curve[int(r["step"])] = acc
            tokens[int(r["step"])] = total
    steps = [r for r in rows if "rps/rounds" in r]

    def mean(key):  # over the steps that logged it (a task may be absent from a small batch)
        vals = [r[key] for r in steps if key in r]
        return float(np.mean(vals)) if vals else float("nan")

    return {
        "arm": arm, "seed": seed, "seconds": seconds, "tasks": tasks,
        "curve": [{"step": s, "accuracy": curve[s], "generated_tokens": tokens[s]}
                  for s in sorted(curve)],
        "generated_tokens": total,
        "rounds_per_step": mean("rps/rounds"),
        "generated_per_step": mean("rps/generated"),
        "hit_cap_frac": mean("rps/hit_cap"),
        "weight_mean": {t: mean(f"task/{t}/weight") for t in tasks},
        "realised_share_mean": {t: mean(f"task/{t}/realised_share") for t in tasks},
        "zero_adv_frac_mean": {t: mean(f"task/{t}/zero_adv_frac") for t in tasks},
        "weight_final": {t: steps[-1].get(f"task/{t}/weight") for t in tasks} if steps else {},
    }


def run_all(args) -> None:
    todo = [(a, s) for s in args.seeds for a in args.arms  # seed-major: every arm, then again
            if not (args.out / "runs" / a / f"seed{s}" / "summary.json").exists()]
    log(f"{len(todo)} runs to do ({len(args.arms)} arms x {len(args.seeds)} seeds, "
        f"{args.jobs} at a time)")
    if args.jobs == 1:
        for i, (arm, seed) in enumerate(todo):
            t0 = time.perf_counter()
            (args.out / "runs" / arm).mkdir(parents=True, exist_ok=True)
            run_one(args, arm, seed)
            log(f"[{i + 1}/{len(todo)}] {arm} seed {seed} done ({time.perf_counter() - t0:.0f} s)")
        return
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           # Every run compiles the same rollout and train-step programs: compile them once.
           "JAX_COMPILATION_CACHE_DIR": str(args.out / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}
    running: list[tuple[subprocess.Popen, str, int, float]] = []
    queue, done, failed = list(todo), 0, []
    while queue or running:
        while queue and len(running) < args.jobs:
            arm, seed = queue.pop(0)
            (args.out / "runs" / arm).mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, __file__, "--worker", arm, str(seed), *_passthrough(args)]
            running.append((subprocess.Popen(cmd, env=env), arm, seed, time.perf_counter()))
        time.sleep(2)
        for item in list(running):
            proc, arm, seed, t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            done += 1
            status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
            if proc.returncode:
                failed.append((arm, seed))
            log(f"[{done}/{len(todo)}] {arm} seed {seed} {status} ({time.perf_counter() - t0:.0f} s)")
    if failed:
        raise SystemExit(f"runs failed: {failed}; see runs/<arm>/seed<k>.log under {args.out}")


def _passthrough(args) -> list[str]:
    out = ["--out", str(args.out), "--mixture", args.mixture, *(["--stream"] if args.stream else []),
           "--steps", str(args.steps), "--eval-every",
           str(args.eval_every), "--eval-prompts", str(args.eval_prompts)]
    return out + (["--smoke"] if args.smoke else [])


# ---- stage 3: tables and plot ------------------------------------------------------------------


def worst(acc: dict) -> float:
    return min(acc.values())


def average(acc: dict) -> float:
    return float(np.mean(list(acc.values())))


def steps_to(curve: list[dict], threshold: float, key: str = "step") -> float | None:
    """``key`` ("step" or "generated_tokens") at the first evaluation whose worst-task accuracy
    reaches ``threshold`` (None: never)."""
    for point in curve:
        if worst(point["accuracy"]) >= threshold:
            return point[key]
    return None


def se(x) -> float:
    x = np.asarray(x, float)
    return float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


def aggregate(runs: list[dict], arms, thresholds) -> dict:
    out = {}
    for arm in arms:
        rs = sorted((r for r in runs if r["arm"] == arm), key=lambda r: r["seed"])
        if not rs:
            continue
        finals = [r["curve"][-1]["accuracy"] for r in rs]
        w = np.array([worst(a) for a in finals])
        avg = np.array([average(a) for a in finals])
        tasks = rs[0]["tasks"]
        out[arm] = {
            "seeds": [r["seed"] for r in rs],
            "final_step": rs[0]["curve"][-1]["step"],
            "worst_mean": float(w.mean()), "worst_min": float(w.min()), "worst_max": float(w.max()),
            "worst_std": float(w.std(ddof=1)) if len(w) > 1 else 0.0,
            "avg_mean": float(avg.mean()), "avg_min": float(avg.min()), "avg_max": float(avg.max()),
            "avg_std": float(avg.std(ddof=1)) if len(avg) > 1 else 0.0,
            "per_task_mean": {t: float(np.mean([a[t] for a in finals])) for t in tasks},
            "worst_task_counts": {t: sum(min(a, key=a.get) == t for a in finals) for t in tasks},
            "worst_se": se(w), "avg_se": se(avg),
            "worst": w.tolist(),
            "steps_to": {str(th): [steps_to(r["curve"], th) for r in rs] for th in thresholds},
            "tokens_to": {str(th): [steps_to(r["curve"], th, "generated_tokens") for r in rs]
                          for th in thresholds},
            "generated_tokens_mean": float(np.mean([r.get("generated_tokens", np.nan)
                                                    for r in rs])),
            "rounds_per_step": float(np.mean([r["rounds_per_step"] for r in rs])),
            "generated_per_step": float(np.mean([r["generated_per_step"] for r in rs])),
            "seconds_mean": float(np.mean([r["seconds"] for r in rs])),
            "weight_mean": {t: float(np.mean([r["weight_mean"][t] for r in rs])) for t in tasks},
            "realised_share_mean": {
                t: float(np.mean([r["realised_share_mean"][t] for r in rs])) for t in tasks},
        }
    return out


def _median_reached(values: list) -> float | None:
    reached = [v for v in values if v is not None]
    return float(np.median(reached)) if reached else None


def comparisons(agg: dict, thresholds, refs=("dapo", "grpo")) -> dict:
    """Worst-task differences to each reference arm (unpaired over seeds: SE = the two SEs in
    quadrature) and each arm's steps- and tokens-to-threshold as a ratio to DAPO's."""
    out: dict = {"worst_diff": {}, "to_threshold_ratio_vs_dapo": {}}
    for ref in refs:
        if ref not in agg:
            continue
        for arm, a in agg.items():
            if arm == ref:
                continue
            d = a["worst_mean"] - agg[ref]["worst_mean"]
            e = float(np.hypot(a["worst_se"], agg[ref]["worst_se"]))
            out["worst_diff"][f"{arm} - {ref}"] = {"diff": d, "se": e,
                                                   "z": d / e if e > 0 else float("nan")}
    if "dapo" in agg:
        for arm, a in agg.items():
            row = {}
            for th in thresholds:
                for key, name in (("steps_to", "steps"), ("tokens_to", "tokens")):
                    mine = _median_reached(a[key][str(th)])
                    theirs = _median_reached(agg["dapo"][key][str(th)])
                    row[f"{name}@{th:g}"] = (mine / theirs if mine is not None and theirs
                                             else None)
            out["to_threshold_ratio_vs_dapo"][arm] = row
    return out


def _steps_cell(values: list) -> str:
    reached = [v for v in values if v is not None]
    if not reached:
        return f"n.r. (0/{len(values)})"
    return f"{np.median(reached):.0f} ({len(reached)}/{len(values)})"


def table(agg: dict, thresholds, sft: dict | None) -> str:
    lines = []
    if sft:
        lines.append("Start (shared SFT model): " + ", ".join(f"{k} {v:.3f}" for k, v in sft.items())
                     + f"; worst {worst(sft):.3f}, average {average(sft):.3f}.")
        lines.append("")
    tasks = list(next(iter(agg.values()))["per_task_mean"])
    n = len(next(iter(agg.values()))["seeds"])
    lines.append(f"Final accuracy after {next(iter(agg.values()))['final_step']} RL steps, mean ± SE "
                 f"over {n} seeds (worst task = the lowest of the tasks at the final evaluation):")
    lines.append("")
    head = ["arm", "worst-task acc", "average acc", *tasks, "rounds/step", "prompts generated/step",
            "generated tokens/run", "s/run"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for arm, a in agg.items():
        cells = [arm, f"{a['worst_mean']:.3f} ± {a['worst_se']:.3f}",
                 f"{a['avg_mean']:.3f} ± {a['avg_se']:.3f}",
                 *(f"{a['per_task_mean'][t]:.3f}" for t in tasks),
                 f"{a['rounds_per_step']:.2f}", f"{a['generated_per_step'] * 1:.0f}",
                 f"{a['generated_tokens_mean']:.3g}", f"{a['seconds_mean']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Steps to reach a worst-task accuracy (median over the seeds that reached it; "
                 "reached/seeds; evaluated every eval step):")
    lines.append("")
    lines.append("| arm | " + " | ".join(f">= {th:g}" for th in thresholds) + " |")
    lines.append("|---|" + "---|" * len(thresholds))
    for arm, a in agg.items():
        lines.append(f"| {arm} | " + " | ".join(_steps_cell(a["steps_to"][str(th)])
                                               for th in thresholds) + " |")
    comp = comparisons(agg, thresholds)
    if comp["worst_diff"]:
        lines += ["", "Worst-task differences (SE of the difference; z = diff / SE):", "",
                  "| comparison | diff | SE | z |", "|---|---|---|---|"]
        for name, c in comp["worst_diff"].items():
            lines.append(f"| {name} | {c['diff']:+.3f} | {c['se']:.3f} | {c['z']:+.1f} |")
    if comp["to_threshold_ratio_vs_dapo"]:
        cols = [f"{k}@{th:g}" for th in thresholds for k in ("steps", "tokens")]
        lines += ["", "Steps and generated tokens to each worst-task threshold, as a ratio to "
                  "DAPO's (medians over the seeds that reached it; - : not reached):", "",
                  "| arm | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for arm, row in comp["to_threshold_ratio_vs_dapo"].items():
            lines.append(f"| {arm} | " + " | ".join("-" if row[c] is None else f"{row[c]:.2f}"
                                                   for c in cols) + " |")
    return "\n".join(lines)


def plot(runs: list[dict], arms, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for arm in arms:
        rs = [r for r in runs if r["arm"] == arm]
        if not rs:
            continue
        steps = [p["step"] for p in rs[0]["curve"]]
        for ax, f in zip(axes, (worst, average), strict=True):
            ys = np.array([[f(p["accuracy"]) for p in r["curve"]] for r in rs])
            (line,) = ax.plot(steps, ys.mean(0), label=arm)
            ax.fill_between(steps, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.15)
    for ax, title in zip(axes, ("worst-task accuracy", "average accuracy"), strict=True):
        ax.set_xlabel("RL step")
        ax.set_title(f"{title} (mean over seeds; band: min-max)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


EXAMPLE_KEYS = ("step", "rps/rounds", "rps/generated", "rps/hit_cap", "accuracy/generated",
                "accuracy/batch")
EXAMPLE_TASK_KEYS = ("weight", "target_count", "realised_count", "realised_share", "rho",
                     "accuracy", "acc_ema", "zero_adv_frac")


def export_example(args, arm: str, seed: int) -> pathlib.Path | None:
    """A trimmed copy of one run's metrics (the MT-GRPO keys and evals), for the notebook."""
    src = args.out / "runs" / arm / f"seed{seed}" / "metrics.jsonl"
    if not src.exists():
        return None
    dst = args.out / f"example_{arm}_seed{seed}.jsonl"
    with open(src) as f, open(dst, "w") as g:
        for line in f:
            r = json.loads(line)
            keep = {k: v for k, v in r.items() if k in EXAMPLE_KEYS or k.startswith("eval/") or (
                k.startswith("task/") and k.rsplit("/", 1)[-1] in EXAMPLE_TASK_KEYS)}
            if len(keep) > 1:
                g.write(json.dumps(keep) + "\n")
    return dst


def report(args) -> dict:
    runs = [json.loads(p.read_text()) for p in sorted((args.out / "runs").glob("*/seed*/summary.json"))]
    runs = [r for r in runs if r["arm"] in args.arms and r["seed"] in args.seeds]
    agg = aggregate(runs, args.arms, args.thresholds)
    sft_path = args.out / "sft_eval.json"
    sft = json.loads(sft_path.read_text()) if sft_path.exists() else None
    text = table(agg, args.thresholds, sft)
    results = {"command": " ".join(["python", "benchmarks/mtgrpo_experiment.py", *sys.argv[1:]]),
               "settings": {"steps": args.steps, "eval_every": args.eval_every,
                            "eval_prompts": args.eval_prompts, "seeds": args.seeds,
                            "arms": {a: ARMS[a] for a in args.arms}, "smoke": args.smoke,
                            "stream": args.stream},
               "sft_accuracy": sft, "aggregate": agg,
               "comparisons": comparisons(agg, args.thresholds), "runs": runs}
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "table.md").write_text(text + "\n")
    plot(runs, args.arms, args.out / "worst_task.png")
    mt_arms = [a for a in args.arms if a.startswith("mtgrpo")]
    if mt_arms:
        export_example(args, mt_arms[0], args.seeds[0])
    print(text)
    return results


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/mtgrpo_experiment"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=[a for a in ARMS if a != "mtgrpo_l1.2"],
                    choices=list(ARMS))
    ap.add_argument("--steps", type=int, default=200, help="RL steps per run")
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--eval-prompts", type=int, default=128, help="held-out prompts per task")
    ap.add_argument("--stream", action="store_true",
                    help="the filtering arms stream finished groups from the paged engine into "
                    "the batch sampler (algo.sampling.stream) instead of generating in rounds")
    ap.add_argument("--mixture", default="cpu-demo",
                    help="task mixture (a name in jaxgrpo.tasks.MIXTURES); default: the demo's")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.10, 0.15, 0.20, 0.25])
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    ap.add_argument("--smoke", action="store_true",
                    help="CI mode: 20 SFT steps, 3 RL steps, tiny eval, one seed")
    ap.add_argument("--worker", nargs=2, metavar=("ARM", "SEED"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps, args.eval_every, args.seeds = 3, 2, args.seeds[:1]
        args.eval_prompts = SMOKE["tasks.eval_prompts"]
    if args.eval_every <= 0 or args.steps <= 0:
        ap.error("--steps and --eval-every must be positive")
    from jaxgrpo.tasks import MIXTURES

    if args.mixture not in MIXTURES:
        ap.error(f"--mixture {args.mixture!r} is not a built-in mixture; choose one of "
                 f"{', '.join(sorted(MIXTURES))}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out = args.out.resolve()
    if args.worker:
        run_one(args, args.worker[0], int(args.worker[1]))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    warm_start(args)
    run_all(args)
    report(args)
    log(f"wrote {args.out / 'results.json'}, {args.out / 'table.md'}, {args.out / 'worst_task.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
