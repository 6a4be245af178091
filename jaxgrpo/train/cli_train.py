"""``jaxgrpo train [CONFIG] [overrides] [--resume [auto]]``: RL training (no config: the built-in demo)."""

from __future__ import annotations

import sys

from jaxgrpo.train.cli_common import add_config_arguments, fail, load


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--resume", nargs="?", const=True, default=False, choices=["auto"],
                        metavar="auto",
                        help="continue from the latest checkpoint in the run's directory; "
                        "'--resume auto' does so when there is one and starts a fresh run "
                        "otherwise (for restarts after a preemption). It may stand anywhere: "
                        "'--resume CONFIG' and 'CONFIG --resume auto key=value' both work")


def prepare_argv(argv: list[str]) -> list[str]:
    """Move every ``--resume`` (with its ``auto``, if any) behind the config and overrides.

    ``--resume`` takes an optional value, so argparse alone reads ``--resume CONFIG`` as the
    value ``CONFIG`` (an invalid choice) and stops at ``CONFIG --resume auto key=value``
    (the override is left over). Only the word ``auto`` right after ``--resume`` is its value;
    everything else keeps its order. Arguments after ``--`` are left alone.
    """
    argv = list(argv)
    end = argv.index("--") if "--" in argv else len(argv)
    kept, resume, i = [], [], 0
    while i < end:
        a = argv[i]
        if a == "--resume":
            resume.append(a)
            if i + 1 < end and argv[i + 1] == "auto":
                resume.append("auto")
                i += 1
        elif a.startswith("--resume="):
            resume.append(a)
        else:
            kept.append(a)
        i += 1
    return kept + resume + argv[end:]


def run(args) -> int:
    from jaxgrpo.metrics import Heartbeat

    # Importing JAX and the trainer takes seconds (more on a busy machine): say so from the
    # first seconds, then at least every 10 s until the run ends.
    with Heartbeat(sys.stderr, first_s=2.0,
                   phase="train: starting (importing JAX and the trainer)") as beat:
        cfg = load(args)
        if cfg is None:
            return 2
        from jaxgrpo.metrics import NonFiniteError
        from jaxgrpo.train import loop

        try:
            summary = loop.run(cfg, resume=args.resume, stream=beat)
        except NonFiniteError as e:
            return fail(str(e))
        if "preempted_at" in summary:  # SIGTERM: a checkpoint of the last step, a clean exit
            print(f"jaxgrpo: stopped after step {summary['preempted_at']} (SIGTERM); checkpoint "
                  f"in {summary['checkpoint_dir']}: rerun the same command with --resume to "
                  "continue", file=sys.stderr)
            return 0
    print(format_summary(summary), file=sys.stdout)
    return 0


def format_summary(summary: dict) -> str:
    """The closing table: per-task accuracy before and after RL (and before SFT, if any)."""
    before, after = summary["accuracy_before"], summary["accuracy_after"]
    init = summary.get("accuracy_init")
    cols = (["before SFT"] if init else []) + ["before RL", "after RL"]
    width = max(len("mean"), *(len(k) for k in after))
    lines = ["", "per-task accuracy (mean over eval prompts x samples)",
             f"{'task':<{width}}  " + "  ".join(f"{c:>10}" for c in cols)]
    rows = list(after) + ["mean"]
    for k in rows:
        def val(d, k=k):
            return sum(d.values()) / len(d) if k == "mean" else d[k]
        vals = ([val(init)] if init else []) + [val(before), val(after)]
        lines.append(f"{k:<{width}}  " + "  ".join(f"{v:>10.3f}" for v in vals))
    lines.append("")
    lines.append(f"run files: {summary['workdir']}  (config.yaml, metrics.jsonl, checkpoints/"
                 + (", sft_model/" if init else "") + ", final_model/)")
    return "\n".join(lines)
