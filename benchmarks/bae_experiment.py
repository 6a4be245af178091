"""The BAE + OCB experiment at CPU scale (the paper's Table 1 protocol, arXiv 2602.10231 §5.2).

    python benchmarks/bae_experiment.py [--smoke] [--seeds 0 1 2] [--out DIR]

Task: one- and two-digit addition in the compact confidence format ``<a>sum</a><c>q</c>``
(``configs/bae_cpu_experiment.yaml``), policy: the 0.4M-parameter ``demo`` character model.

1. **SFT warm start** (shared by every arm): gold sums with a confidence spread uniformly over
   ``0.0, 0.1, ..., 1.0`` by a hash of the prompt, independent of difficulty
   (``gold_confidence=uniform``): the warm start learns the format and a varied confidence but
   nothing about which answers are right. Saved as an HF model and loaded by every arm through
   ``model.path`` with ``model.sft.steps=0``.
2. **RL**, three arms x seeds, identical except for the advantage:
   ``rlcr`` (one scalar ``c - (q - c)^2`` centred by the group mean on all tokens, Dr. GRPO with a
   per-sequence token mean), ``bae_group_mean`` (block 0: group mean of c; block 1: group mean of
   the Brier reward ``-(q - c)^2``) and ``bae_ocb`` (block 1: OCB, strata c).
3. **Evaluation** of the SFT model and every trained policy on the same held-out prompts, k
   samples each at T = 1: accuracy, ECE (the paper's 11 bins), Brier and AUROC over all (q, c)
   pairs, each with a bootstrap SE (1000 resamples). A completion without a parsable confidence
   counts as q = 0 (its share is reported as ``no_conf``). Test-time scaling over the same k
   samples (the paper's §5.3): accuracy of majority vote, MaxConf and confidence-weighted
   majority over the first k' samples, with pass@1 and pass@k', for k' = 1, 2, 4, ..., k
   (answers grouped by whitespace-normalised text; an unparsable answer never wins).
4. **Fidelity study** (the paper's §5.1, Fig. 1) on the RLCR-trained policy of the first seed (the paper's
   reference is RLCR-trained): N prompts, G solutions, M confidence continuations per solution.

Writes ``results.json`` and ``results.md`` to ``--out`` and prints the tables. ``--smoke`` runs
every stage at toy size (CI).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxgrpo.config import load_config  # noqa: E402
from jaxgrpo.evaluation import calibration, scaling  # noqa: E402
from jaxgrpo.evaluation import fidelity as fid  # noqa: E402
from jaxgrpo.tasks import score_many  # noqa: E402
from jaxgrpo.tasks.structured import normalize_answer  # noqa: E402
from jaxgrpo.train import fidelity, loop, rollouts  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "bae_cpu_experiment.yaml"
ARMS = {
    "rlcr": ["loss.estimator=dr_grpo", "loss.agg=seq_mean_token_mean"],
    "bae_group_mean": ["loss.block_baselines=[group_mean,group_mean]"],
    "bae_ocb": ["loss.block_baselines=[group_mean,ocb]"],
}
METRICS = ("accuracy", "ece", "brier", "auroc")

FULL = dict(sft_steps=600, rl_steps=60, eval_prompts=500, eval_k=8, fid_prompts=64, fid_g=8,
            fid_m=32, bootstrap=1000)
SMOKE = dict(sft_steps=10, rl_steps=2, eval_prompts=4, eval_k=2, fid_prompts=2, fid_g=2, fid_m=2,
             bootstrap=20)


@dataclasses.dataclass(frozen=True)
class _Item:
    task: str
    record: dict
    uid: str


def log(msg: str) -> None:
    print(f"[bae_experiment {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_config(workdir: pathlib.Path, extra: list[str], size: dict, *, smoke: bool,
                seed: int = 0, user: tuple[str, ...] = ()):
    """The experiment's config; ``user`` (``--set``) overrides its file, ``extra`` (the stage's
    and the arm's settings) overrides both."""
    over = [
        f"train.workdir={workdir}", f"train.seed={seed}", f"train.steps={size['rl_steps']}",
        "train.eval_every=0", "tasks.eval_prompts=8", "rollout.eval_samples=2",
        "checkpoint.every=0", "checkpoint.asynchronous=false",
        f"model.sft.steps={size['sft_steps']}", *user, *extra,
    ]
    if smoke:
        over += ["tasks.prompts_per_step=8", "rollout.group_size=4", "model.sft.batch_size=16",
                 "logging.progress=false"]
    return load_config(str(CONFIG), over, num_devices=jax.device_count())


def evaluate(policy, params, task, records, *, k: int, cfg, key, chunk: int = 64) -> dict:
    """``correct``, ``confidence`` (q, 0 where missing), ``has_conf``, ``format_ok`` and
    ``answer`` (str, None where missing; object array): ``[P, k]``."""
    rc = cfg.rollout
    gen = policy.generator(num_samples=k, max_new_tokens=rc.max_new_tokens,
                           temperature=rc.eval_temperature, top_k=rc.top_k, top_p=rc.top_p,
                           buckets=rc.prompt_buckets)
    out = {"correct": [], "confidence": [], "has_conf": [], "format_ok": [], "answer": []}
    for c0 in range(0, len(records), chunk):
        part = records[c0:c0 + chunk]
        if len(part) < chunk and c0 > 0:  # keep one compiled shape: pad with earlier prompts
            part = part + records[: chunk - len(part)]
        items = [_Item("t", r, f"eval/{c0 + i}") for i, r in enumerate(part)]
        g = rollouts.collect(items, tasks={"t": task}, task_index={"t": 0},
                             tokenizer=policy.tokenizer,
                             generate=lambda t, m, kk: gen(params, t, m, kk),
                             key=jax.random.fold_in(key, c0), prompt_buckets=rc.prompt_buckets,
                             pad_id=policy.pad_id, score_fn=score_many)
        n = min(chunk, len(records) - c0)
        for i in range(n):
            parses = [task.parse(t, truncated=bool(tr))
                      for t, tr in zip(g.texts[i], g.truncated[i], strict=True)]
            out["correct"].append(g.correct[i].tolist())
            out["confidence"].append([p.confidence if p.confidence is not None else 0.0
                                      for p in parses])
            out["has_conf"].append([p.confidence is not None for p in parses])
            out["format_ok"].append([p.format_ok for p in parses])
            out["answer"].append([p.answers[0] for p in parses])
    return {k_: np.asarray(v, dtype=object if k_ == "answer" else None) for k_, v in out.items()}


def budgets(k: int) -> list[int]:
    """The sampling budgets of the scaling curves: 1, 2, 4, ... up to ``k``, and ``k``."""
    return sorted({2 ** i for i in range(k.bit_length()) if 2 ** i <= k} | {k})


def report(ev: dict, *, n_bootstrap: int, seed: int = 0) -> dict:
    rep = calibration.calibration_report(ev["confidence"].ravel(), ev["correct"].ravel(),
                                         n_bootstrap=n_bootstrap, seed=seed)
    rep["no_conf"] = float(1 - ev["has_conf"].mean())
    rep["format_ok"] = float(ev["format_ok"].mean())
    rep["mean_conf"] = float(ev["confidence"].mean())
    cnt, acc, conf = calibration.calibration_bins(ev["confidence"].ravel(), ev["correct"].ravel())
    rep["bins"] = {"count": cnt.tolist(), "accuracy": _nan_none(acc), "confidence": _nan_none(conf)}
    ks = budgets(ev["correct"].shape[1])
    sc = scaling.scaling_curves(ev["answer"].tolist(), ev["confidence"], ev["correct"], ks,
                                     key=normalize_answer)
    rep["scaling"] = {"k": ks, **{m: v.tolist() for m, v in sc.items()}}
    return rep


def _nan_none(a) -> list:
    return [None if not np.isfinite(x) else float(x) for x in np.asarray(a)]


def _cell(v, se) -> str:
    return f"{v:.3f} ± {se:.3f}" if np.isfinite(v) else "n/a"


def tables(res: dict) -> str:
    arms = ["sft", *ARMS]
    lines = ["Pooled over seeds (each cell: value ± bootstrap SE over (q, c) pairs, as the paper):",
             "", "| policy | accuracy | ECE | Brier | AUROC | mean q | no conf |",
             "|---|---|---|---|---|---|---|"]
    for arm in arms:
        r = res["pooled"][arm]
        lines.append(f"| {arm} | " + " | ".join(_cell(r[m], r[f'{m}_se']) for m in METRICS)
                     + f" | {r['mean_conf']:.3f} | {r['no_conf']:.3f} |")
    seeds = res["settings"]["seeds"]
    lines += ["", f"Mean over seeds {seeds} ± SE across seeds (std / sqrt(#seeds)):", "",
              "| policy | accuracy | ECE | Brier | AUROC |", "|---|---|---|---|---|"]
    for arm in ARMS:
        per = res["per_seed"][arm]
        cells = []
        for m in METRICS:
            v = np.array([per[str(s)][m] for s in seeds], float)
            se = v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float("nan")
            cells.append(f"{v.mean():.3f} ± {se:.3f}" if len(v) > 1 else f"{v.mean():.3f}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "Test-time scaling, pooled over seeds: accuracy of the answer each rule picks "
              "from the first k samples (pass@1: mean sample accuracy; pass@k: unbiased, over all "
              "samples):", "", "| policy | k | " + " | ".join(scaling.METHODS) + " |",
              "|---|---|" + "---|" * len(scaling.METHODS)]
    for arm in arms:
        sc = res["pooled"][arm]["scaling"]
        for j, k in enumerate(sc["k"]):
            lines.append(f"| {arm} | {k} | "
                         + " | ".join(f"{sc[m][j]:.3f}" for m in scaling.METHODS) + " |")
    f = res["fidelity"]
    lines += ["", f"Fidelity study on the {f['policy']} policy: {f['prompts']} held-out prompts, "
              f"G={f['G']}, M={f['M']}; RMSE (bias) of the confidence-block advantage against "
              "the Monte-Carlo advantage:", "", f["markdown"]]
    return "\n".join(lines)


def curves(workdir: pathlib.Path) -> dict:
    keys = ("accuracy/batch", "blocks/1/reward_mean", "reward/mean", "loss/entropy_mean")
    out = {k: [] for k in keys}
    path = workdir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if "accuracy/batch" in row:
                for k in keys:
                    out[k].append(round(float(row.get(k, float("nan"))), 4))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--smoke", action="store_true", help="toy sizes, every stage (CI)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="benchmarks/results/bae", help="output directory")
    ap.add_argument("--workdir", default=None, help="run directories (default: OUT/runs)")
    ap.add_argument("--sft-model", default=None,
                    help="reuse this saved warm start (an HF directory written by stage 1 of an "
                    "earlier run with the same settings) instead of training one")
    for k, v in FULL.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=None,
                        help=f"(full run: {v})")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every stage (repeatable), e.g. the task: "
                    "--set 'tasks.mixture=[{name: confidence, options: {base: countdown@1, "
                    "tags: short, gold_confidence: uniform, on_malformed: worst_score}}]'")
    args = ap.parse_args(argv)
    user = tuple(args.overrides)
    bad = [o for o in user if "=" not in o]
    if bad:
        ap.error(f"--set takes KEY=VALUE, got {bad[0]!r}")
    size = dict(SMOKE if args.smoke else FULL)
    for k in FULL:
        if getattr(args, k) is not None:
            size[k] = getattr(args, k)
    out = pathlib.Path(args.out)
    runs = pathlib.Path(args.workdir) if args.workdir else out / "runs"
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    timing = {}

    # ---- 1. SFT warm start ---------------------------------------------------------------
    cfg0 = make_config(runs / "sft", [], size, smoke=args.smoke, user=user)
    if args.sft_model:
        sft_dir = pathlib.Path(args.sft_model)
        task = loop.resolve_tasks(cfg0)[1][cfg0.tasks.mixture[0].spec]
        log(f"SFT warm start: reusing {sft_dir}")
    else:
        sft_dir = runs / "sft_model"
        su = loop.setup(cfg0, stream=sys.stderr)
        task = su.tasks[su.names[0]]
        log(f"SFT warm start: {size['sft_steps']} steps")
        loop.warm_start(cfg0, su, su.params, sft_dir)
    timing["sft_s"] = time.perf_counter() - t_start

    path_over = [f"model.path={sft_dir}", "model.preset=null", "model.sft.steps=0"]
    cfg_eval = make_config(runs / "eval", path_over, size, smoke=args.smoke, user=user)
    su_eval = loop.setup(cfg_eval, stream=sys.stderr)
    policy, sft_params = su_eval.policy, su_eval.params
    ds = task.dataset("eval", cfg_eval.tasks.seed)
    records = [ds[i] for i in range(min(size["eval_prompts"], len(ds)))]
    eval_key = jax.random.key(12345)
    res = {"command": " ".join(["python", "benchmarks/bae_experiment.py", *(argv or sys.argv[1:])]),
           "settings": {**size, "seeds": args.seeds, "smoke": args.smoke,
                        "sft_model": str(sft_dir) if args.sft_model else None,
                        "config": str(CONFIG.relative_to(ROOT)), "overrides": list(user),
                        "arms": ARMS},
           "pooled": {}, "per_seed": {}, "eval_samples": {}, "curves": {}}
    t0 = time.perf_counter()
    ev = evaluate(policy, sft_params, task, records, k=size["eval_k"], cfg=cfg_eval, key=eval_key)
    res["pooled"]["sft"] = report(ev, n_bootstrap=size["bootstrap"])
    res["eval_samples"]["sft"] = _samples(ev)
    log("SFT model: " + _short(res["pooled"]["sft"]) + f" ({time.perf_counter() - t0:.0f} s)")

    # ---- 2-3. RL arms x seeds, evaluation ---------------------------------------------------
    trained = {}
    for arm, extra in ARMS.items():
        pooled = {"correct": [], "confidence": [], "has_conf": [], "format_ok": [], "answer": []}
        res["per_seed"][arm] = {}
        for seed in args.seeds:
            t0 = time.perf_counter()
            wd = runs / f"{arm}_s{seed}"
            cfg = make_config(wd, [*path_over, *extra], size, smoke=args.smoke, seed=seed,
                              user=user)
            log(f"RL {arm} seed {seed}: {cfg.train.steps} steps")
            summary = loop.run(cfg, stream=sys.stderr)
            params = summary["params"]
            if seed == args.seeds[0]:
                trained[arm] = params
            t1 = time.perf_counter()
            ev = evaluate(policy, params, task, records, k=size["eval_k"], cfg=cfg_eval,
                          key=eval_key)
            rep = report(ev, n_bootstrap=size["bootstrap"])
            rep["train_s"], rep["eval_s"] = t1 - t0, time.perf_counter() - t1
            res["per_seed"][arm][str(seed)] = rep
            res["curves"][f"{arm}_s{seed}"] = curves(wd)
            if seed == args.seeds[0]:
                res["eval_samples"][arm] = _samples(ev)
            for k_ in pooled:
                pooled[k_].append(ev[k_])
            log(f"{arm} seed {seed}: " + _short(rep) + f" (train {rep['train_s']:.0f} s, "
                f"eval {rep['eval_s']:.0f} s)")
        res["pooled"][arm] = report({k_: np.concatenate(v) for k_, v in pooled.items()},
                                    n_bootstrap=size["bootstrap"])
    timing["rl_and_eval_s"] = time.perf_counter() - t_start - timing["sft_s"]
    res["timing"] = timing
    (out / "results.json").write_text(json.dumps(res, separators=(",", ":"), default=_json_default))
    from jaxgrpo.model import save_hf

    rlcr_dir = runs / "rlcr_model"  # the fidelity study's policy, for `jaxgrpo fidelity --model`
    save_hf(policy.parts.merge(trained["rlcr"]), rlcr_dir)
    policy.tokenizer.save_pretrained(str(rlcr_dir))

    # ---- 4. Fidelity study on the RLCR-trained policy ----------------------------------------
    t0 = time.perf_counter()
    fid_records = [ds[len(ds) - 1 - i] for i in range(size["fid_prompts"])]
    rc = cfg_eval.rollout
    nr = fidelity.nested_rollouts(policy, trained["rlcr"], task, fid_records,
                                  group_size=size["fid_g"], num_mc=size["fid_m"],
                                  max_new_tokens=rc.max_new_tokens, key=jax.random.key(777),
                                  prompt_buckets=rc.prompt_buckets,
                                  temperature=rc.temperature)
    table = nr.table()
    res["fidelity"] = {"policy": f"rlcr (seed {args.seeds[0]})", "prompts": len(fid_records),
                       "G": size["fid_g"], "M": size["fid_m"],
                       "valid_frac": float(nr.valid.mean()), "table": table,
                       "markdown": fid.format_table(table)}
    timing["fidelity_s"] = time.perf_counter() - t0
    timing["total_s"] = time.perf_counter() - t_start
    res["timing"] = timing

    text = tables(res)
    (out / "results.json").write_text(json.dumps(res, separators=(",", ":"), default=_json_default))
    (out / "results.md").write_text(text + f"\n\nTotal wall time {timing['total_s']:.0f} s.\n")
    print(text)
    print(f"\nwall time {timing['total_s']:.0f} s; wrote {out / 'results.json'} and "
          f"{out / 'results.md'}")
    return 0


def _samples(ev: dict) -> dict:
    """The per-completion (q, c) pairs ``[P, k]`` for plots (q to 3 decimals)."""
    return {"confidence": np.round(ev["confidence"], 3).tolist(),
            "correct": ev["correct"].astype(int).tolist()}


def _short(rep: dict) -> str:
    return ", ".join(f"{m} {rep[m]:.3f}" for m in METRICS) + f", mean q {rep['mean_conf']:.2f}"


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)


if __name__ == "__main__":
    sys.exit(main())
