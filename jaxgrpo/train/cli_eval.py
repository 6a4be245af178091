"""``jaxgrpo eval [CONFIG] [overrides] [--run DIR]``: per-task accuracy of a policy.

Evaluates the configured model (``model.path`` or the preset) or, with ``--run``, the latest
checkpoint of a training run directory: mean correctness over ``rollout.eval_samples``
completions of each of ``tasks.eval_prompts`` held-out prompts per task.
"""

from __future__ import annotations

from jaxgrpo import paths
from jaxgrpo.train.cli_common import add_config_arguments, fail, load


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--run", default=None,
                        help="a training run directory (local or gs://...): evaluate its latest "
                        "checkpoint")


def run(args) -> int:
    cfg = load(args)
    if cfg is None:
        return 2
    import jax
    import numpy as np

    from jaxgrpo.checkpoint import Checkpointer
    from jaxgrpo.train import loop

    try:
        su = loop.setup(cfg)
        params = su.params
        if args.run:
            ckdir = paths.as_path(args.run) / "checkpoints"  # local or gs://...
            if not ckdir.is_dir():
                return fail(f"{ckdir} does not exist: give the run's train.workdir")
            ck = Checkpointer(ckdir, create=False)
            abstract = jax.eval_shape(lambda: loop.initial_state(cfg, params))
            state, _ = ck.restore(abstract_state=abstract)
            params = state.params
        acc = loop.evaluate(su.policy, params, su.tasks, su.eval_sets, cfg, su.eval_key)
    except (FileNotFoundError, ValueError) as e:
        return fail(str(e).splitlines()[0])
    width = max(len(k) for k in acc)
    for k, v in acc.items():
        print(f"{k:<{width}}  {v:.3f}")
    print(f"{'mean':<{width}}  {np.mean(list(acc.values())):.3f}")
    return 0
