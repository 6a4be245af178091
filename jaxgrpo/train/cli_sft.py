"""``jaxgrpo sft [CONFIG] [overrides] [--output DIR]``: supervised warm start on gold answers.

Saves the result as an HF checkpoint directory (safetensors + config.json + tokenizer) that
``jaxgrpo.model.load_hf`` and ``transformers`` both load, and prints per-task accuracy before
and after.
"""

from __future__ import annotations

import sys

from jaxgrpo import paths
from jaxgrpo.train.cli_common import add_config_arguments, fail, load


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--output", default=None,
                        help="where to write the HF checkpoint, local or gs://... (default: "
                        "<train.workdir>/sft_model)")


def run(args) -> int:
    cfg = load(args)
    if cfg is None:
        return 2
    if cfg.model.sft.steps <= 0:
        return fail("model.sft.steps is 0: nothing to train (set model.sft.steps=200)")
    from jaxgrpo.train import loop
    from jaxgrpo.train.cli_train import format_summary

    loop.check_resources(cfg)
    su = loop.setup(cfg)
    out = paths.as_path(args.output) if args.output else su.workdir / "sft_model"
    before = loop.evaluate(su.policy, su.params, su.tasks, su.eval_sets, cfg, su.eval_key)
    params = loop.warm_start(cfg, su, su.params, out)
    after = loop.evaluate(su.policy, params, su.tasks, su.eval_sets, cfg, su.eval_key)
    table = format_summary({"accuracy_before": before, "accuracy_after": after,
                            "workdir": str(out)})
    print(table.replace("before RL", "before SFT").replace("after RL", "after SFT"))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(0)
