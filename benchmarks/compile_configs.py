"""Deviceless TPU compiles of the shipped pod-scale configs: `jaxgrpo compile` for each, one JSON each.

Runs ``jaxgrpo compile CONFIG [overrides] --topology T --json benchmarks/results/compile/NAME.json``
for every entry of :data:`RUNS` (or those named with ``--only``), one after the other, and writes
``benchmarks/results/compile/summary.json``: per run the command, its exit status, wall time and
the headline figures (largest per-chip HBM total and its program, train-step FLOPs per chip
against global / chips, parameter and optimiser dtypes, step estimate). Prints that summary as
JSON. Needs libtpu (``pip install 'jaxgrpo[tpu]'``); no TPU. A full 36-layer compile takes
minutes on a 2-core CPU.

    PYTHONPATH=$PWD python benchmarks/compile_configs.py [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

OUT = pathlib.Path(__file__).parent / "results" / "compile"

# name -> (config, topology, overrides, why this topology)
RUNS = {
    "pod_v5p64_mtgrpo_3task": (
        "configs/pod_v5p64_mtgrpo_3task.yaml", "v5p:2x4x4", [],
        "the pod config's own slice (v5p-64, 32 chips)"),
    "pod_v5p64_qwen2p5_7b": (
        "configs/pod_v5p64_qwen2p5_7b.yaml", "v5p:2x4x4", [], "v5p-64, 32 chips"),
    "pod_v5p64_llama3p1_8b": (
        "configs/pod_v5p64_llama3p1_8b.yaml", "v5p:2x4x4", [], "v5p-64, 32 chips"),
    "mtgrpo_3task_qwen2p5_3b_v5p32": (
        "configs/mtgrpo_3task_qwen2p5_3b.yaml", "v5p:2x2x4", ["mesh.fsdp=8", "mesh.tensor=2"],
        "v5p-32 (16 chips): fsdp 8 x tensor 2, the largest data-parallel size that divides the "
        "8-prompt minibatch"),
    "mtgrpo_3task_qwen2p5_3b_v5p16": (
        "configs/mtgrpo_3task_qwen2p5_3b.yaml", "v5p:2x2x2", [],
        "v5p-16 (8 chips), the config's own mesh (fsdp over every chip; 8 divides the 8-prompt "
        "minibatch)"),
    "mtgrpo_9task_qwen2p5_3b_v5p32": (
        "configs/mtgrpo_9task_qwen2p5_3b.yaml", "v5p:2x2x4", [],
        "v5p-32 (16 chips), the config's own mesh (fsdp over every chip)"),
    "mtgrpo_9task_qwen2p5_3b_v5p64": (
        "configs/mtgrpo_9task_qwen2p5_3b.yaml", "v5p:2x4x4", [],
        "v5p-64 (32 chips), the config's own mesh (fsdp over every chip)"),
    "bae_qwen2p5_3b_math_v5p16": (
        "configs/bae_qwen2p5_3b_math.yaml", "v5p:2x2x2", [],
        "v5p-16 (8 chips), the config's own mesh (fsdp over every chip)"),
    "bae_qwen2p5_3b_math_v5p8": (
        "configs/bae_qwen2p5_3b_math.yaml", "v5p:2x2x1", [],
        "v5p-8 (4 chips), the config's own mesh (fsdp over every chip)"),
}


def headline(rep: dict) -> dict:
    progs = rep.get("programs", {})
    totals = {k: v.get("total_bytes_per_chip") for k, v in progs.items()
              if v.get("total_bytes_per_chip") is not None}
    worst = max(totals, key=totals.get) if totals else None
    ts = progs.get("train_step", {})
    chips = rep.get("chips")
    ratio = None
    if ts.get("flops_per_chip") and ts.get("global_flops") and chips:
        ratio = ts["flops_per_chip"] / (ts["global_flops"] / chips)
    return {
        "chips": chips,
        "hbm_bytes_per_chip": rep.get("hbm_bytes_per_chip"),
        "largest_program": worst,
        "largest_total_bytes_per_chip": totals.get(worst),
        "largest_fraction_of_hbm": (totals[worst] / rep["hbm_bytes_per_chip"]
                                    if worst and rep.get("hbm_bytes_per_chip") else None),
        "total_bytes_per_chip": totals,
        "train_step_flops_per_chip_over_share": ratio,
        "param_dtypes": rep.get("param_dtypes"),
        "opt_state_dtypes": rep.get("opt_state_dtypes"),
        "step_estimate": rep.get("step_estimate"),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--only", nargs="*", default=None, help="run names (default: all)")
    args = ap.parse_args(argv)
    names = args.only or list(RUNS)
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        ap.error(f"unknown run names {unknown}; known: {', '.join(RUNS)}")
    OUT.mkdir(parents=True, exist_ok=True)
    summary_file = OUT / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    for name in names:
        config, topology, overrides, why = RUNS[name]
        out = OUT / f"{name}.json"
        cmd = ["jaxgrpo", "compile", config, *overrides, "--topology", topology,
               "--json", str(out.relative_to(pathlib.Path.cwd()) if out.is_relative_to(
                   pathlib.Path.cwd()) else out)]
        print(f"[compile_configs] {' '.join(cmd)}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "jaxgrpo.cli", *cmd[1:]],
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        last = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
        entry = {"command": " ".join(cmd), "topology": topology, "why": why,
                 "exit_status": proc.returncode, "wall_s": round(wall, 1)}
        if out.exists() and proc.returncode in (0, 1):
            entry.update(headline(json.loads(out.read_text())))
        if proc.returncode != 0:
            entry["message"] = next((ln for ln in reversed(last) if "jaxgrpo" in ln),
                                    last[-1] if last else "")
        summary[name] = entry
        summary_file.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        print(f"[compile_configs] {name}: exit {proc.returncode} in {wall:.0f} s",
              file=sys.stderr, flush=True)
    print(json.dumps({n: summary[n] for n in names}, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
