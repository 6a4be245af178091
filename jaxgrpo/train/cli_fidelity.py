"""``jaxgrpo fidelity CONFIG [overrides] --model PATH --prompts N --G G --M M --out FILE.json``.

The BAE fidelity study (BAE, arXiv 2602.10231 §5.1): for N held-out prompts of the config's (first) task,
which must be a structured ``confidence`` task, sample G solutions, then M confidence-block
continuations from each fixed solution prefix, and print the RMSE (and bias) of each baseline's
confidence-block advantage (none, batch mean, group mean, OCB, and the extensions ocb_loo /
ocb_shrink) against the Monte-Carlo advantage, split by correct and incorrect solutions. Sampling
uses ``rollout.temperature``/``top_k``/``top_p``/``max_new_tokens``/``prompt_buckets``.
"""

from __future__ import annotations

import json

from jaxgrpo import paths
from jaxgrpo.train.cli_common import add_config_arguments, fail, load


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--model", default=None,
                        help="an HF checkpoint directory (sets model.path; default: the config's)")
    parser.add_argument("--prompts", type=int, default=100, help="held-out prompts N (100)")
    parser.add_argument("--G", type=int, default=8, dest="group_size",
                        help="solutions per prompt G (8)")
    parser.add_argument("--M", type=int, default=32, dest="num_mc",
                        help="confidence-block continuations per solution M (32)")
    parser.add_argument("--kappa", type=float, default=1.0, help="ocb_shrink strength (1.0)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
    parser.add_argument("--out", default=None, help="write the table and settings as JSON here")


def run(args) -> int:
    if args.model is not None:
        args.config_args = [*args.config_args, f"model.path={args.model}", "model.preset=null",
                            "model.sft.steps=0"]
    for name in ("prompts", "group_size", "num_mc"):
        if getattr(args, name) < 1 or (name == "num_mc" and args.num_mc < 2):
            flag = {"prompts": "--prompts", "group_size": "--G", "num_mc": "--M"}[name]
            return fail(f"{flag} must be at least {2 if name == 'num_mc' else 1}")
    if not args.kappa >= 0 or args.kappa == float("inf"):
        return fail(f"--kappa must be a finite number >= 0, got {args.kappa}")
    if args.out:
        try:
            paths.as_path(args.out)  # an unknown scheme fails before the study runs
        except ValueError as e:
            return fail(f"--out: {e}")
    cfg = load(args)
    if cfg is None:
        return 2
    import jax

    from jaxgrpo.evaluation import fidelity as fid
    from jaxgrpo.train import fidelity, loop

    su = loop.setup(cfg)
    name = su.names[0]
    task = su.tasks[name]
    ds = task.dataset("eval", cfg.tasks.seed)
    records = [ds[i] for i in range(min(args.prompts, len(ds)))]
    rc = cfg.rollout
    nr = fidelity.nested_rollouts(
        su.policy, su.params, task, records, group_size=args.group_size,
        num_mc=args.num_mc, max_new_tokens=rc.max_new_tokens,
        key=jax.random.key(args.seed), prompt_buckets=rc.prompt_buckets,
        temperature=rc.temperature, top_k=rc.top_k, top_p=rc.top_p,
    )
    table = nr.table(kappa=args.kappa)
    text = fid.format_table(table)
    print(f"fidelity study: task {name}, {len(records)} prompts, G={args.group_size}, "
          f"M={args.num_mc}; RMSE (bias) of each baseline's confidence-block advantage "
          "against the Monte-Carlo advantage")
    print(text)
    if args.out:
        out = paths.as_path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({
            "task": name, "prompts": len(records), "G": args.group_size, "M": args.num_mc,
            "kappa": args.kappa, "seed": args.seed, "model": cfg.model.path or cfg.model.preset,
            "valid_frac": float(nr.valid.mean()), "table": table, "markdown": text,
        }, indent=2))
    return 0
