"""Import rules: the pure core stays light, and data flows one way.

``jaxgrpo.core`` must import with only jax, numpy and chex; the host-side task and reward code
never imports jax; and no package imports a package above it in ``LAYERS``.
"""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "jaxgrpo"
HEAVY = ("flax", "optax", "orbax", "grain", "transformers", "torch", "tensorflow")

# Lower layers may not import higher ones. Sub-packages not listed are unconstrained leaves
# at the top (cli, train).
LAYERS = {
    "jaxgrpo.core": 0,
    "jaxgrpo.config": 0,
    "jaxgrpo.paths": 0,
    "jaxgrpo.hardware": 0,
    "jaxgrpo.tasks": 1,
    "jaxgrpo.evaluation": 1,
    "jaxgrpo.sharding": 1,
    "jaxgrpo.model": 2,
    "jaxgrpo.data": 2,
    "jaxgrpo.metrics": 2,
    "jaxgrpo.checkpoint": 2,
    "jaxgrpo.rollout": 3,
    "jaxgrpo.train": 4,
    "jaxgrpo.cli": 5,
}


def _layer(module: str) -> int | None:
    best = None
    for prefix, level in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, level)
    return None if best is None else best[1]


def _imports(path: pathlib.Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def test_core_imports_nothing_heavy_in_a_fresh_interpreter():
    code = (
        "import sys, jaxgrpo, jaxgrpo.core\n"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {HEAVY!r}]\n"
        "print(','.join(sorted(bad)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "", f"jaxgrpo.core pulled in: {out.stdout.strip()}"


def test_core_source_imports_only_jax_numpy_chex():
    allowed = {"jax", "numpy", "chex", "jaxgrpo", "__future__", "typing", "dataclasses",
               "functools", "math", "enum", "collections", "builtins", "importlib"}
    for path in (PKG / "core").rglob("*.py"):
        for mod in _imports(path):
            top = mod.split(".")[0]
            assert top in allowed, f"{path.relative_to(ROOT)} imports {mod}"
            if top == "jaxgrpo":
                assert mod.startswith("jaxgrpo.core"), f"{path.relative_to(ROOT)} imports {mod}"


def test_host_side_tasks_never_import_jax():
    for path in (PKG / "tasks").rglob("*.py") if (PKG / "tasks").exists() else []:
        for mod in _imports(path):
            assert mod.split(".")[0] not in ("jax", "jaxlib", "flax"), (
                f"{path.relative_to(ROOT)} imports {mod}: verifiers run on the host"
            )


def test_imports_point_down_the_layers():
    for path in PKG.rglob("*.py"):
        me = _layer(_module_name(path))
        if me is None:
            continue
        for mod in _imports(path):
            if not mod.startswith("jaxgrpo."):
                continue
            other = _layer(mod)
            if other is None or _module_name(path).startswith(mod):
                continue
            assert other <= me, f"{_module_name(path)} (layer {me}) imports {mod} (layer {other})"


def test_chip_table_never_imports_jax():
    for mod in _imports(PKG / "hardware.py"):
        assert mod.split(".")[0] not in ("jax", "jaxlib", "flax", "jaxgrpo"), (
            f"jaxgrpo/hardware.py imports {mod}: the chip table is plain Python")
