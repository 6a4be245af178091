"""The ``jaxgrpo`` command line: a thin dispatcher.

Each sub-command lives with the code it drives and is imported only when used, so
``jaxgrpo tasks list`` never loads the trainer, and ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

# sub-command -> (module that defines ``add_arguments(parser)`` and ``run(args) -> int``, and
# optionally ``prepare_argv(argv) -> argv`` to reorder its arguments before parsing; help)
COMMANDS = {
    "train": ("jaxgrpo.train.cli_train", "train a policy (no config: the built-in demo)"),
    "sft": ("jaxgrpo.train.cli_sft", "supervised warm start on gold answers"),
    "eval": ("jaxgrpo.train.cli_eval", "per-task accuracy of a checkpoint"),
    "export": ("jaxgrpo.train.cli_export",
               "write a run's checkpoint as a Hugging Face model directory"),
    "tasks": ("jaxgrpo.tasks.cli", "list built-in tasks, or sample records from one"),
    "score": ("jaxgrpo.tasks.cli_score", "score JSONL completions offline with a task's verifier"),
    "compile": ("jaxgrpo.train.cli_compile",
                "compile a config's step programs for a TPU topology, on this machine: memory, "
                "FLOPs, collectives, roofline"),
    "fidelity": ("jaxgrpo.train.cli_fidelity",
                 "BAE fidelity study: each baseline's advantage vs Monte-Carlo advantages"),
}


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, object | None]:
    parser = argparse.ArgumentParser(prog="jaxgrpo", description=__doc__.splitlines()[0],
                                     allow_abbrev=False)  # `--resum` is not `--resume`
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = argv[0] if argv else None
    module = None
    for name, (mod_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        if name == chosen:
            try:
                module = importlib.import_module(mod_name)
            except ModuleNotFoundError as e:
                if e.name and e.name.startswith("jaxgrpo"):
                    parser.exit(2, f"jaxgrpo: '{name}' is not available in this build ({e.name}).\n")
                raise
            module.add_arguments(p)
    return parser, module


def main(argv: list[str] | None = None) -> int:
    # transformers announces at import that torch is absent; the trainer never needs torch.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, module = build_parser(argv)
    if hasattr(module, "prepare_argv"):  # a command may reorder its own arguments
        argv = [argv[0], *module.prepare_argv(argv[1:])]
    args = parser.parse_args(argv)
    if module is None:
        parser.print_help()
        return 0 if not argv else 2
    from jaxgrpo.config import InputError, format_error

    try:
        return int(module.run(args) or 0)
    except (InputError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
        # What the user gave (a config, a file or directory it names): one line, what to fix.
        print(format_error(e), file=sys.stderr)
        return 2
    except Exception:
        # Anything else is a fault in jaxgrpo itself: keep the traceback, and say so.
        traceback.print_exc()
        print(f"jaxgrpo: internal error in `jaxgrpo {args.command}`: this is a bug in jaxgrpo, "
              "not in your config or input; please report it with the command line and the "
              "traceback above", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
