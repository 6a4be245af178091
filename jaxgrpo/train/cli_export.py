"""``jaxgrpo export --run DIR [--step N] --out DIR``: a run's checkpoint as an HF model.

Reads the run's own ``config.yaml`` (architecture, tokenizer) and checkpoint ``N`` (default: the
latest) and writes ``config.json``, ``model.safetensors`` and the tokenizer to ``--out``, which
``transformers.AutoModelForCausalLM.from_pretrained`` and ``jaxgrpo.model.load_hf`` load. A
complete ``jaxgrpo train`` run already wrote its last step to ``<train.workdir>/final_model``.
"""

from __future__ import annotations

import sys

from jaxgrpo import paths
from jaxgrpo.train.cli_common import fail


def add_arguments(parser) -> None:
    parser.add_argument("--run", required=True,
                        help="a training run directory (its train.workdir; local or gs://...)")
    parser.add_argument("--step", type=int, default=None,
                        help="the checkpoint step to export (default: the latest)")
    parser.add_argument("--out", required=True,
                        help="the output directory (local or gs://...); must be new or empty")


def run(args) -> int:
    import yaml

    from jaxgrpo.config import ConfigError, config_from_dict, format_error

    try:
        run_dir, out = paths.as_path(args.run), paths.as_path(args.out)
    except ValueError as e:
        return fail(str(e))
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        return fail(f"{cfg_path} does not exist: --run must be the train.workdir of a "
                    "`jaxgrpo train` run")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        return fail(f"--out {args.out} already exists and is not an empty directory: give a new "
                    "directory")
    if args.step is not None and args.step < 0:
        return fail(f"--step must be >= 0, got {args.step}")
    try:
        cfg = config_from_dict(yaml.safe_load(cfg_path.read_text()))
    except ConfigError as e:
        print(format_error(e), file=sys.stderr)
        return 2
    from jaxgrpo.train import loop

    try:
        step = loop.export_checkpoint(cfg, run_dir, out, step=args.step)
    except FileNotFoundError as e:
        return fail(str(e).splitlines()[0])
    print(f"exported step {step} of {args.run} to {args.out} (HF format: config.json, "
          "model.safetensors, tokenizer)")
    return 0
