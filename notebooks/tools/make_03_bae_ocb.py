"""Writes notebooks/03_bae_ocb.ipynb (run from the repository root)."""

import nbformat as nbf

cells = []


def md(s):
    cells.append(nbf.v4.new_markdown_cell(s.strip()))


def code(s):
    cells.append(nbf.v4.new_code_cell(s.strip()))


md("""
# BAE + OCB on a CPU: calibration, block advantages, one group up close

This notebook draws from the results of the CPU experiment
(`python benchmarks/bae_experiment.py`, results committed under `benchmarks/results/bae/`):
a 0.4M-parameter character model adds one- and two-digit numbers and reports a confidence,
`<a>sum</a><c>q</c>`. After an SFT warm start whose confidences carry no information, three RL
arms differ only in the advantage: RLCR (one scalar `c - (q - c)^2` on all tokens), BAE with a
group-mean baseline on the confidence block, and BAE with the Outcome-Conditioned Baseline (OCB).

It shows (1) reliability diagrams of the held-out evaluation, (2) the distributions of the
per-block advantages each estimator would assign to those evaluation samples, and (3) OCB against
the group mean on one group. Set `JAXGRPO_BAE_RESULTS` to read another `results.json`.
""")
code("""
import json
import os
import pathlib

import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from jaxgrpo.core import advantages
from jaxgrpo.evaluation import calibration

path = pathlib.Path(os.environ.get("JAXGRPO_BAE_RESULTS", "benchmarks/results/bae/results.json"))
res = json.loads(path.read_text())
arms = [a for a in ("sft", "rlcr", "bae_group_mean", "bae_ocb") if a in res["eval_samples"]]
print(f"{path}: seeds {res['settings']['seeds']}, {res['settings']['rl_steps']} RL steps, "
      f"{res['settings']['eval_prompts']} eval prompts x {res['settings']['eval_k']} samples")
for a in arms:
    r = res["pooled"][a]
    print(f"{a:15s} acc {r['accuracy']:.3f}  ECE {r['ece']:.3f}  Brier {r['brier']:.3f}  "
          f"AUROC {r['auroc']:.3f}  mean q {r['mean_conf']:.3f}")
""")
md("""
## 1. Reliability diagrams

The paper's 11 fixed-width bins; each point is one bin's mean confidence against its accuracy,
its area proportional to the bin's size. The diagonal is perfect calibration. The SFT model's
confidences are spread over 0..1 independently of correctness, so its curve is flat at the
accuracy; RL has to move it onto the diagonal. (First seed of each arm.)
""")
code("""
fig, axes = plt.subplots(1, len(arms), figsize=(3.2 * len(arms), 3.2), sharey=True)
for ax, a in zip(np.atleast_1d(axes), arms):
    s = res["eval_samples"][a]
    q, c = np.asarray(s["confidence"]).ravel(), np.asarray(s["correct"]).ravel()
    count, acc, conf = calibration.calibration_bins(q, c)
    ok = count > 0
    ax.plot([0, 1], [0, 1], color="0.7", lw=1)
    ax.scatter(conf[ok], acc[ok], s=400 * count[ok] / count.sum() + 5)
    ax.plot(conf[ok], acc[ok], lw=1)
    ax.set_title(f"{a}\\nECE {calibration.ece(q, c):.3f}", fontsize=9)
    ax.set_xlabel("confidence q")
np.atleast_1d(axes)[0].set_ylabel("accuracy")
fig.tight_layout()
""")
md("""
## 2. Per-block advantages

Each evaluation prompt's k samples form a group. Block 0 (the answer) gets `c - mean(c)` under
every BAE variant; block 1 (the confidence) gets the Brier reward `-(q - c)^2` minus either the
group mean or the OCB stratum mean (strata: correct / incorrect). RLCR puts one advantage,
`R - mean(R)` with `R = c - (q - c)^2`, on every token. The histograms use the samples of the BAE
+ OCB policy.
""")
code("""
def groups(arm):
    s = res["eval_samples"][arm]
    q = np.asarray(s["confidence"], np.float64)
    c = np.asarray(s["correct"], np.int32)
    return q, c

def block_advantages(q, c, baseline):
    r = np.stack([c.astype(np.float32), -(q - c) ** 2], -1)  # [P, k, 2]
    out = np.stack([c, c], -1)  # OCB strata: the answer's correctness
    return np.asarray(advantages.blockwise(jnp.asarray(r), jnp.asarray(out),
                                           baselines=("group_mean", baseline)))

q, c = groups("bae_ocb" if "bae_ocb" in arms else arms[-1])
a_gm, a_ocb = block_advantages(q, c, "group_mean"), block_advantages(q, c, "ocb")
R = c - (q - c) ** 2
a_rlcr = np.asarray(advantages.group_relative(jnp.asarray(R), scale="none"))
fig, axes = plt.subplots(1, 3, figsize=(11, 3))
bins = np.linspace(-1, 1, 41)
axes[0].hist(a_ocb[..., 0].ravel(), bins=bins)
axes[0].set_title("block 0 (answer): c - mean(c)", fontsize=9)
for k, (name, sel) in enumerate((("correct", c == 1), ("incorrect", c == 0))):
    for lab, a in (("BAE group mean", a_gm[..., 1]), ("BAE OCB", a_ocb[..., 1]),
                   ("RLCR scalar (all tokens)", a_rlcr)):
        axes[1 + k].hist(a[sel], bins=bins, alpha=0.5, label=lab)
    axes[1 + k].set_title(f"block 1 (confidence), {name} answers", fontsize=9)
axes[1].legend(fontsize=8); axes[2].legend(fontsize=8)
fig.tight_layout()
for name, sel in (("correct", c == 1), ("incorrect", c == 0)):
    print(f"{name:9s} n={int(sel.sum()):4d}  mean block-1 advantage: group mean "
          f"{a_gm[..., 1][sel].mean():+.4f}, OCB {a_ocb[..., 1][sel].mean():+.4f}")
""")
md("""
The group mean subtracts one mean over both strata, so the confidence block of a correct answer
inherits part of the gap between correct and incorrect answers' Brier rewards (a systematic
offset per stratum); OCB centres each stratum on its own mean, so its block-1 advantages average
to exactly 0 within every stratum of every group.

## 3. One group up close

A group with both correct and incorrect answers: rewards, and the confidence-block advantage
under each baseline.
""")
code("""
mixed = [p for p in range(c.shape[0]) if 0 < c[p].sum() < c.shape[1]]
p = mixed[0] if mixed else 0
print(f"prompt {p}: c = {c[p].tolist()}")
print(f"           q = {np.round(q[p], 2).tolist()}")
print(f"Brier r_1    = {np.round(-(q[p] - c[p]) ** 2, 3).tolist()}")
print(f"A_1 group mean = {np.round(a_gm[p, :, 1].astype(float), 3).tolist()}")
print(f"A_1 OCB        = {np.round(a_ocb[p, :, 1].astype(float), 3).tolist()}")
x = np.arange(c.shape[1])
fig, ax = plt.subplots(figsize=(6, 3))
ax.bar(x - 0.2, a_gm[p, :, 1], 0.4, label="group mean")
ax.bar(x + 0.2, a_ocb[p, :, 1], 0.4, label="OCB")
for i in x:
    ax.text(i, ax.get_ylim()[1] * 0.9, "✓" if c[p, i] else "✗", ha="center")
ax.axhline(0, color="0.5", lw=0.8)
ax.set_xlabel("sample in the group"); ax.set_ylabel("confidence-block advantage")
ax.legend(fontsize=8)
fig.tight_layout()
""")
md("""
## 4. The fidelity study

RMSE of each baseline's confidence-block advantage against the Monte-Carlo advantage, from M
continuations of every fixed solution prefix (`jaxgrpo fidelity`, the paper's §5.1), on the RLCR-trained
policy. "MC noise floor" is the RMSE that the MC estimate's own noise leaves even for a perfect
baseline.
""")
code("""
print(res["fidelity"]["markdown"])
""")
md("""
## 5. A task where accuracy moves

The same three arms on countdown@1 in the same confidence format (`benchmarks/results/bae_countdown/`,
made by `benchmarks/bae_experiment.py --set ...`, the command is in its `results.json`): here RL
raises accuracy from about one half, so calibration is compared at similar accuracy. Accuracy and
ECE of every arm, pooled over seeds with bootstrap SE, and each seed's ECE.
""")
code("""
cd_path = pathlib.Path("benchmarks/results/bae_countdown/results.json")
if cd_path.exists():
    cd = json.loads(cd_path.read_text())
    names = [a for a in ("sft", "rlcr", "bae_group_mean", "bae_ocb") if a in cd["pooled"]]
    print(cd["command"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for ax, m in zip(axes, ("accuracy", "ece")):
        vals = [cd["pooled"][a][m] for a in names]
        errs = [cd["pooled"][a][f"{m}_se"] for a in names]
        ax.bar(names, vals, yerr=errs, capsize=4, color="0.75")
        for i, a in enumerate(names[1:], start=1):
            per = [cd["per_seed"][a][str(s)][m] for s in cd["settings"]["seeds"]]
            ax.plot([i] * len(per), per, "o", color="C1", ms=4)
        ax.set_title(f"{m} (bars: pooled ± bootstrap SE; dots: seeds)", fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    for a in names:
        r = cd["pooled"][a]
        print(f"{a:15s} acc {r['accuracy']:.3f} ± {r['accuracy_se']:.3f}  "
              f"ECE {r['ece']:.3f} ± {r['ece_se']:.3f}  AUROC {r['auroc']:.3f}  "
              f"mean q {r['mean_conf']:.3f}")
else:
    print(f"no {cd_path}")
""")

nb = nbf.v4.new_notebook()
nb["cells"] = cells
nb["metadata"]["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
nbf.write(nb, "notebooks/03_bae_ocb.ipynb")
