"""Every public function, class and method of the package is used outside its own tests.

A name counts as used when it appears as a code token (not in a string or comment) anywhere in
``jaxgrpo/``, ``benchmarks/`` or ``notebooks/tools/`` other than its own definition, or in
``scripts/``; re-exports in ``__init__.py`` files do not count.
"""

import ast
import collections
import io
import pathlib
import re
import tokenize

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Public names allowed to be unused: none. Do not add to this.
KNOWN_UNUSED: set[str] = set()


def unused_public_names() -> set[str]:
    sources = [*ROOT.glob("jaxgrpo/**/*.py"), *ROOT.glob("benchmarks/**/*.py"),
               *ROOT.glob("notebooks/tools/*.py")]
    counts: collections.Counter = collections.Counter()
    for path in sources:
        if path.name == "__init__.py":
            continue
        for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
            if tok.type == tokenize.NAME:
                counts[tok.string] += 1
    for path in ROOT.glob("scripts/*"):
        counts.update(re.findall(r"\w+", path.read_text()))
    defs = []
    for path in sorted(ROOT.glob("jaxgrpo/**/*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.parse(path.read_text()).body:
            if not isinstance(node, ast.FunctionDef | ast.ClassDef) or node.name.startswith("_"):
                continue
            defs.append((rel, node.name, node.name))
            if isinstance(node, ast.ClassDef):
                defs += [(rel, f"{node.name}.{m.name}", m.name) for m in node.body
                         if isinstance(m, ast.FunctionDef) and not m.name.startswith("_")]
    times_defined = collections.Counter(short for _, _, short in defs)
    return {f"{rel}: {name}" for rel, name, short in defs
            if counts[short] <= times_defined[short]}


def test_no_public_function_or_class_is_used_only_by_its_tests():
    assert unused_public_names() - KNOWN_UNUSED == set()


def test_the_known_unused_list_only_shrinks():
    assert KNOWN_UNUSED <= unused_public_names(), "remove the used names from KNOWN_UNUSED"
