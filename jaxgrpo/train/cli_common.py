"""Shared pieces of the ``train``/``sft``/``eval`` sub-commands: config loading and errors."""

from __future__ import annotations

import sys


def add_config_arguments(parser) -> None:
    parser.add_argument(
        "config_args", nargs="*", metavar="[CONFIG.yaml] [key=value ...]",
        help="a YAML file under configs/ (none: the built-in demo), then dotted overrides "
        "such as optim.lr=1e-6",
    )


def load(args):
    """The validated config, or ``None`` after printing a one-line error (exit code 2)."""
    from jaxgrpo.config import ConfigError, format_error, load_config, split_cli_args, validate

    try:
        path, overrides = split_cli_args(args.config_args)
        cfg = load_config(path, overrides)
        import jax

        from jaxgrpo.sharding import initialize_distributed

        # A multi-host run joins its processes before anything asks JAX for devices.
        initialize_distributed(cfg.distributed)
        return validate(cfg, num_devices=jax.device_count(), check_paths=False)
    except ConfigError as e:
        print(format_error(e), file=sys.stderr)
        return None


def fail(message: str) -> int:
    print(f"jaxgrpo: error: {message}", file=sys.stderr)
    return 2
