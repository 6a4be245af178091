"""No dead configuration keys: every key of every shipped config is read by the package.

A static check over ``jaxgrpo/`` outside ``config.py``: a field ``f`` of a config section counts as
read where the code accesses ``<...>.<section>.f``, or ``x.f`` with ``x`` bound to that section
(``lc = cfg.loss``, ``lc, rc = cfg.loss, cfg.rollout``, ``for t in cfg.tasks.mixture``, or a
parameter annotated with the section's class), or where a method or property of the section
that reads ``self.f`` is used outside ``config.py``. Validation in ``__post_init__`` does not count.
"""

import ast
import dataclasses
import pathlib
import typing

import pytest
import yaml

from jaxgrpo import config as C

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "jaxgrpo"


def _sections():
    """``{class: {attribute names it is reached by}}`` for every nested config dataclass."""
    out: dict[type, set[str]] = {}

    def walk(cls, attr):
        out.setdefault(cls, set()).add(attr)
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            for cand in (tp, *typing.get_args(tp)):
                for inner in (cand, *typing.get_args(cand)):
                    if dataclasses.is_dataclass(inner):
                        walk(inner, f.name)

    walk(C.ExperimentConfig, "")
    return out


SECTIONS = _sections()
BY_NAME = {cls.__name__: cls for cls in SECTIONS}


def _dotted(node):
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return None if inner is None else f"{inner}.{node.attr}"
    return None


def _section_of(node, aliases):
    """The section attribute an expression denotes, if it can tell."""
    if isinstance(node, ast.BoolOp):  # config or DistributedConfig()
        return next((s for s in (_section_of(v, aliases) for v in node.values) if s), None)
    if isinstance(node, ast.Call):
        return _annotation_section(node.func)
    name = _dotted(node)
    if name in aliases:
        return aliases[name]
    return node.attr if isinstance(node, ast.Attribute) else None


def _annotation_section(ann):
    if isinstance(ann, ast.BinOp):  # X | None
        return _annotation_section(ann.left) or _annotation_section(ann.right)
    name = ann.id if isinstance(ann, ast.Name) else getattr(ann, "attr", None)
    if isinstance(ann, ast.Constant) and isinstance(ann.value, str):
        name = ann.value
    cls = BY_NAME.get(name)
    return None if cls is None else sorted(SECTIONS[cls])[0]


def _collect(tree, aliases, reads, attrs):
    """Adds the ``(section, field)`` reads and attribute names under ``tree`` (bindings are
    taken module-wide, not scope-exact)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.arg) and node.annotation is not None:
            sec = _annotation_section(node.annotation)
            if sec is not None:
                aliases[node.arg] = sec
    for node in [*ast.walk(tree)] * 2:  # twice: an alias of an alias
        if isinstance(node, ast.Assign):
            for target in node.targets:
                pairs = [(target, node.value)]
                if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                    pairs = list(zip(target.elts, node.value.elts, strict=False))
                for t, v in pairs:
                    sec = _section_of(v, aliases)
                    if _dotted(t) is not None and sec is not None:
                        aliases[_dotted(t)] = sec
        elif isinstance(node, (ast.For, ast.comprehension)):
            sec = _section_of(node.iter, aliases)
            if isinstance(node.target, ast.Name) and sec is not None:
                aliases[node.target.id] = sec
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            attrs.add(node.attr)
            sec = _section_of(node.value, aliases)
            if sec is not None:
                reads.add((sec, node.attr))


def _reads():
    """``{(section attribute, field)}`` read outside config.py, including through the config
    classes' methods and properties that are used there."""
    reads, attrs = set(), set()
    for path in PKG.rglob("*.py"):
        if path != PKG / "config.py":
            _collect(ast.parse(path.read_text()), {}, reads, attrs)
    config_src = ast.parse((PKG / "config.py").read_text())
    classes = {n.name: n for n in ast.walk(config_src) if isinstance(n, ast.ClassDef)}
    for _ in range(3):  # methods used by used methods
        for cls, names in SECTIONS.items():
            for fn in getattr(classes.get(cls.__name__), "body", []):
                if (isinstance(fn, ast.FunctionDef) and not fn.name.startswith("__")
                        and fn.name in attrs):
                    _collect(fn, {"self": sorted(names)[0]}, reads, attrs)
    return reads, attrs


def dead_fields():
    reads, _ = _reads()
    dead = []
    for cls, names in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if any((sec, f.name) in reads for sec in names):
                continue
            dead.append(f"{cls.__name__}.{f.name}")
    return sorted(dead)


def test_every_config_field_is_read_outside_config_py():
    assert dead_fields() == []


def _keys(data, prefix=""):
    for k, v in data.items():
        yield f"{prefix}{k}"
        if isinstance(v, dict) and k != "options":
            yield from _keys(v, f"{prefix}{k}.")


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_key_of_a_shipped_config_is_a_read_field(path):
    """Each dotted key names a field (the loader refuses others) that the package reads."""
    dead = set(dead_fields())
    for key in _keys(yaml.safe_load(path.read_text()) or {}):
        cls, *parts = C.ExperimentConfig, *key.split(".")
        for part in parts[:-1]:
            tp = typing.get_type_hints(cls)[part]
            cls = next(a for a in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(a))
        assert f"{cls.__name__}.{parts[-1]}" not in dead, key


def test_the_check_finds_a_dead_field(monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class Extra:
        never_read_anywhere: int = 0

    monkeypatch.setitem(SECTIONS, Extra, {"extra"})
    assert "Extra.never_read_anywhere" in dead_fields()
