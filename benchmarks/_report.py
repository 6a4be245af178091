"""The benchmarks' common ending: print the result as JSON and, with ``--out``, write it there."""

from __future__ import annotations

import json
import pathlib


def report(out: dict, path: str | None) -> None:
    """Prints ``out`` as indented JSON; writes the same text to ``path`` (its folder made) if set."""
    text = json.dumps(out, indent=1)
    print(text)
    if path:
        p = pathlib.Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text + "\n")
