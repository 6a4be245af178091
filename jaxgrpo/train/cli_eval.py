"""``jaxgrpo eval [CONFIG] [overrides] [--run DIR]``: per-task accuracy of a policy.

Evaluates the configured model (``model.path`` or the preset) or, with ``--run``, the latest
checkpoint of a training run directory under the run's own ``config.yaml`` (``key=value``
overrides still apply, e.g. ``tasks.eval_prompts=200``): mean correctness over
``rollout.eval_samples`` completions of each of ``tasks.eval_prompts`` held-out prompts per task.
"""

from __future__ import annotations

import sys

from jaxgrpo import paths
from jaxgrpo.train.cli_common import add_config_arguments, fail, load


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--run", default=None,
                        help="a training run directory (local or gs://...): evaluate its latest "
                        "checkpoint with the run's own config.yaml")


def run(args) -> int:
    if args.run:
        from jaxgrpo.config import split_cli_args

        run_dir = paths.as_path(args.run)  # local or gs://...
        cfg_file = run_dir / "config.yaml"
        if not cfg_file.is_file():
            return fail(f"--run {args.run}: no config.yaml there: give a training run's "
                        "directory (its train.workdir)")
        path, overrides = split_cli_args(args.config_args)
        if path is not None:
            return fail(f"--run evaluates with the run's own config.yaml: give only key=value "
                        f"overrides, not the config file {path!r}")
        # The run's directory is where it is now, whatever its config says.
        args.config_args = [str(cfg_file), f"train.workdir={args.run}", *overrides]
    cfg = load(args)
    if cfg is None:
        return 2
    import jax
    import numpy as np

    from jaxgrpo.checkpoint import Checkpointer, committed_steps
    from jaxgrpo.train import loop

    step = None
    if args.run:
        ckdir = paths.as_path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir / "checkpoints"
        steps = committed_steps(ckdir)
        if not steps:
            return fail(f"--run {args.run}: no committed checkpoint in {ckdir}")
        step = steps[-1]
    loop.check_resources(cfg)
    su = loop.setup(cfg)
    params = su.params
    if step is not None:
        ck = Checkpointer(ckdir, create=False)
        abstract = jax.eval_shape(lambda: loop.initial_state(cfg, params))
        state, _ = ck.restore(step, abstract_state=abstract)
        params = state.params
    acc = loop.evaluate(su.policy, params, su.tasks, su.eval_sets, cfg, su.eval_key)
    what = (f"checkpoint step {step} of {args.run}" if step is not None
            else f"model {cfg.model.path or 'preset ' + str(cfg.model.preset)} (no training)")
    print(f"evaluated: {what}, {cfg.tasks.eval_prompts} prompts x {cfg.rollout.eval_samples} "
          "samples per task", file=sys.stdout)
    width = max(len(k) for k in acc)
    for k, v in acc.items():
        print(f"{k:<{width}}  {v:.3f}")
    print(f"{'mean':<{width}}  {np.mean(list(acc.values())):.3f}")
    return 0
