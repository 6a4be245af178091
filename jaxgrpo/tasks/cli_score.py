"""``jaxgrpo score --task NAME --input FILE [--output FILE]``: offline scoring of completions.

Each non-blank input line is ``{"example": <record>, "completion": "<text>"}``; each output line
is ``{"reward": float, "correct": bool, "error": str | null}`` (plus ``blocks`` and
``confidence`` for structured tasks), in input order. A line that is not valid input gets
reward 0 and an error (and a count on standard error); scoring errors never stop the run.
Exit status 0, or 2 (nothing written) when the task or the files cannot be opened, or the input
holds no valid line at all (an empty file, not JSONL, the wrong file).
"""

from __future__ import annotations

import argparse
import json
import sys

from jaxgrpo.tasks.cli import add_task_options, build_task


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, help="task name or spec, e.g. countdown@2")
    parser.add_argument("--input", required=True, help="JSONL file ('-' for standard input)")
    parser.add_argument("--output", default=None, help="JSONL file (default: standard output)")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds per verifier call")
    parser.add_argument("--workers", type=int, default=2, help="verifier processes (0: inline)")
    add_task_options(parser)


def _read(path: str) -> list[str]:
    if path == "-":
        return sys.stdin.read().splitlines()
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read().splitlines()


def run(args: argparse.Namespace) -> int:
    from jaxgrpo.tasks import Score, score_many

    try:
        task = build_task(args.task, args)
        lines = [line for line in _read(args.input) if line.strip()]
    except (OSError, ValueError, TypeError, ImportError) as e:
        print(f"jaxgrpo score: {e}", file=sys.stderr)
        return 2
    if args.workers < 0 or not args.timeout > 0:
        print("jaxgrpo score: --workers must be >= 0 and --timeout > 0", file=sys.stderr)
        return 2
    results: list[Score | None] = [None] * len(lines)
    idx, records, completions = [], [], []
    for i, line in enumerate(lines):
        try:
            item = json.loads(line)
            record, completion = item["example"], item["completion"]
            if not isinstance(record, dict) or not isinstance(completion, str):
                raise TypeError("'example' must be an object and 'completion' a string")
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            results[i] = Score(0.0, False, False, f"bad input line: {type(e).__name__}")
            continue
        idx.append(i)
        records.append(record)
        completions.append(completion)
    bad = len(lines) - len(idx)
    if not idx:
        first = results[0].error if results else "no non-blank lines"
        print(f"jaxgrpo score: error: {args.input}: no valid input line ({first}); each line "
              'must be {"example": {...}, "completion": "..."}', file=sys.stderr)
        return 2
    if bad:
        print(f"jaxgrpo score: warning: {bad} of {len(lines)} input lines are not valid input "
              "(scored 0 with an error)", file=sys.stderr)
    if idx:
        scores = score_many(task, records, completions, timeout_s=args.timeout,
                            workers=args.workers)
        for i, s in zip(idx, scores, strict=True):
            results[i] = s
    out = sys.stdout if args.output is None else open(args.output, "w", encoding="utf-8")
    try:
        for s in results:
            out.write(json.dumps(s.to_json()) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return 0
