"""Writes notebooks/02_mt_grpo.ipynb (run from the repository root)."""

import nbformat as nbf

cells = []
md = lambda s: cells.append(nbf.v4.new_markdown_cell(s.strip()))  # noqa: E731
code = lambda s: cells.append(nbf.v4.new_code_cell(s.strip()))  # noqa: E731

md("""
# Inside an MT-GRPO run: task weights, realised shares, worst-task accuracy

MT-GRPO (arXiv 2602.05547) keeps task logits `xi`; `z = softmax(xi)` asks for per-task counts in
each post-filter training batch, and the ratio-preserving sampler regenerates until the batch
holds them, even though tasks lose different shares of prompts to zero-advantage groups.

This notebook reads a run's `metrics.jsonl` (what `jaxgrpo train` writes). By default it reads
the trimmed metrics of the MT-GRPO run (lambda 0.2, seed 0) of the CPU experiment committed
under `benchmarks/results/mtgrpo/`; set the environment variable `JAXGRPO_RUN` to a run
directory (or a metrics file) of your own to inspect that instead. The last section compares
every arm of the experiment from its `results.json`.
""")
code("""
import json
import os
import pathlib

import matplotlib.pyplot as plt
import numpy as np

RESULTS = pathlib.Path("benchmarks/results/mtgrpo")
run = pathlib.Path(os.environ.get("JAXGRPO_RUN") or sorted(RESULTS.glob("example_*.jsonl"))[0])
path = run / "metrics.jsonl" if run.is_dir() else run
rows = [json.loads(line) for line in open(path)]
steps_rows = [r for r in rows if "rps/rounds" in r]
tasks = sorted({k.split("/")[1] for r in steps_rows for k in r if k.endswith("/weight")})
print(f"{path}: {len(steps_rows)} training steps, tasks {tasks}")


def series(key, rs=steps_rows):
    return np.array([r.get(key, np.nan) for r in rs], float)


step = series("step")
""")
md("""
## 1. Weights against realised post-filter shares

Solid: the weight `z_k` the sampler was given at each step. Dashed: the share of the training batch
task k actually got after filtering. With ratio preservation the two agree whenever the round cap
is not hit (the sampler's targets are a multinomial draw from `z`, so single steps scatter around
`z`; the lines are 10-step moving averages).
""")
code("""
def smooth(x, n=10):
    x = np.asarray(x, float)
    out = np.full_like(x, np.nan)
    for i in range(len(x)):
        w = x[max(0, i - n + 1): i + 1]
        w = w[~np.isnan(w)]
        out[i] = w.mean() if w.size else np.nan
    return out


fig, ax = plt.subplots(figsize=(9, 4))
for t in tasks:
    (line,) = ax.plot(step, series(f"task/{t}/weight"), label=f"{t} weight")
    ax.plot(step, smooth(series(f"task/{t}/realised_share")), "--", color=line.get_color(),
            label=f"{t} realised share")
ax.set_xlabel("RL step"); ax.set_ylabel("share of the batch"); ax.grid(alpha=0.3)
ax.legend(fontsize=7, ncol=2); plt.show()

ok = series("rps/hit_cap") == 0
match = np.mean([all(r.get(f"task/{t}/realised_count") == r.get(f"task/{t}/target_count")
                     for t in tasks) for r, k in zip(steps_rows, ok) if k]) if ok.any() else np.nan
print(f"steps where the round cap was not hit: {ok.mean():.0%}; of those, realised counts equal "
      f"the targets in {match:.0%}")
""")
md("""
## 2. Why the sampler works hard: zero-advantage rates and rounds

`rho_k` is the sampler's running estimate of the share of task k's groups that carry no learning
signal (all completions scored alike); it inflates the task's request by `1/(1 - rho_k)`.
""")
code("""
fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
for t in tasks:
    axes[0].plot(step, series(f"task/{t}/rho"), label=t)
axes[0].set_title("rho_k (EMA of the zero-advantage rate)"); axes[0].legend(fontsize=8)
axes[1].plot(step, series("rps/rounds"), ".", ms=3)
axes[1].set_title("generation rounds per step")
for ax in axes:
    ax.set_xlabel("RL step"); ax.grid(alpha=0.3)
plt.show()
""")
md("""
## 3. Per-task accuracy: rollouts (every step) and held-out evaluation

Rollout accuracy is measured on the step's training prompts before filtering (`J_k` in the
paper is its EMA); the markers are the periodic held-out evaluations (mean over 8 samples at
temperature 1, as in the paper). The black line is the worst task's held-out accuracy.
""")
code("""
evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
fig, ax = plt.subplots(figsize=(9, 4))
for t in tasks:
    (line,) = ax.plot(step, smooth(series(f"task/{t}/accuracy")), alpha=0.6, label=f"{t} rollouts")
    es = [(r["step"], r[f"eval/{t}/accuracy"]) for r in evals if f"eval/{t}/accuracy" in r]
    if es:
        ax.plot(*zip(*es), "o", color=line.get_color(), label=f"{t} held-out")
if evals:
    worst = [(r["step"], min(r[f"eval/{t}/accuracy"] for t in tasks)) for r in evals
             if all(f"eval/{t}/accuracy" in r for t in tasks)]
    ax.plot(*zip(*worst), "k-", lw=2, label="worst task (held-out)")
ax.set_xlabel("RL step"); ax.set_ylabel("accuracy"); ax.grid(alpha=0.3); ax.legend(fontsize=7)
plt.show()
""")
md("""
## 4. Every arm of the experiment

`benchmarks/mtgrpo_experiment.py` runs GRPO, DAPO, MT-GRPO (lambda 0.2), GRPO+IWU and GRPO+RPS
from one shared SFT model over several seeds. Worst-task held-out accuracy over steps, mean over
seeds with the min-max band, and the table the script printed.
""")
code("""
res_path = RESULTS / "results.json"
if res_path.exists():
    res = json.loads(res_path.read_text())
    fig, ax = plt.subplots(figsize=(9, 4))
    for arm in res["aggregate"]:
        rs = [r for r in res["runs"] if r["arm"] == arm]
        xs = [p["step"] for p in rs[0]["curve"]]
        ys = np.array([[min(p["accuracy"].values()) for p in r["curve"]] for r in rs])
        (line,) = ax.plot(xs, ys.mean(0), label=arm)
        ax.fill_between(xs, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.12)
    ax.set_xlabel("RL step"); ax.set_ylabel("worst-task accuracy"); ax.grid(alpha=0.3)
    ax.legend(fontsize=8); plt.show()
    table = RESULTS / "table.md"
    print(table.read_text() if table.exists() else "")
else:
    print(f"no {res_path}: run benchmarks/mtgrpo_experiment.py first")
""")

nb = nbf.v4.new_notebook()
nb["cells"] = cells
nb["metadata"]["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
nbf.write(nb, "notebooks/02_mt_grpo.ipynb")
