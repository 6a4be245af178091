"""``jaxgrpo tasks list`` and ``jaxgrpo tasks sample NAME -n N [--seed S]``."""

from __future__ import annotations

import argparse
import json
import sys


def parse_options(pairs: list[str] | None) -> dict:
    """``["level=2", "base=addition@1"]`` -> ``{"level": 2, "base": "addition@1"}`` (JSON values)."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--opt must be KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def add_task_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--level", type=int, default=None, help="difficulty level")
    p.add_argument("--opt", action="append", metavar="KEY=VALUE",
                   help="a task option (JSON value or string); repeatable")


def build_task(name: str, args: argparse.Namespace):
    from jaxgrpo.tasks import get_task

    options = parse_options(args.opt)
    if args.level is not None:
        options["level"] = args.level
    return get_task(name, **options)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="tasks_command", metavar="{list,sample}")
    sub.add_parser("list", help="one task per line: its name, then a short description",
                   allow_abbrev=False)
    p = sub.add_parser("sample", allow_abbrev=False, help="print N records of a task as JSONL")
    p.add_argument("name", help="task name or spec, e.g. addition or addition@2")
    p.add_argument("-n", type=int, default=5, help="number of records (default 5)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    p.add_argument("--split", choices=("train", "eval"), default="train")
    add_task_options(p)


def run(args: argparse.Namespace) -> int:
    from jaxgrpo.tasks import list_tasks

    if args.tasks_command == "list":
        for name, desc in list_tasks():
            print(f"{name}\t{desc}")
        return 0
    if args.tasks_command == "sample":
        if args.n < 0:
            print("jaxgrpo tasks sample: -n must be >= 0", file=sys.stderr)
            return 2
        try:
            task = build_task(args.name, args)
            ds = task.dataset(split=args.split, seed=args.seed)
        except (ValueError, TypeError, ImportError) as e:
            print(f"jaxgrpo tasks sample: {e}", file=sys.stderr)
            return 2
        for i in range(min(args.n, len(ds))):
            print(json.dumps(ds[i]))
        return 0
    print("usage: jaxgrpo tasks {list,sample} ...", file=sys.stderr)
    return 2
