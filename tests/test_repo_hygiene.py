"""The repository stands on its own: no reference to files or notes outside it, notebooks carry
their outputs, and the package metadata is in the form pip accepts without a warning."""

import json
import pathlib
import re
import subprocess
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A citation points at a paper (arXiv id, its sections/equations) or at a file in the repository;
# never at a notes file, a "spec", a tracker issue or a machine path.
OUTSIDE = [
    (r"\bspecs?/[\w.-]+", "a specs/ directory"),
    (r"\b(?:mt-grpo|bae|peers(?:-[\d-]+)?|ENVIRONMENT|STYLE)\.md\b", "a notes file"),
    (r"\(spec\s|\bspec (?:§|section|mt-grpo|bae)|\bthe spec\b|\bspec's\b|^Spec:|\bSpec §",
     "a spec"),
    (r"\b[Ii]ssues? #?\d+", "a tracker issue"),
    (r"/work/", "a machine path"),
    (r"\[(?:PDF|repo)[\]:]", "a notes file's source tag"),
]


def _tracked_text_files():
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    for name in names:
        path = ROOT / name
        if name == "tests/test_repo_hygiene.py" or not path.is_file():
            continue
        try:
            yield name, path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary (images)


def test_no_references_outside_the_repository():
    hits = []
    for name, text in _tracked_text_files():
        for i, line in enumerate(text.splitlines(), 1):
            for pattern, what in OUTSIDE:
                if re.search(pattern, line):
                    hits.append(f"{name}:{i}: {what}: {line.strip()[:120]}")
    assert not hits, "\n".join(hits)


def test_the_patterns_catch_what_they_are_for():
    bad = ["(spec mt-grpo §7.1)", "see specs/bae.md", "settings as in mt-grpo.md §3.3",
           "issue 14", "/work/shared/x", "spec §9.10", "Spec: ``x``", "([PDF] §3)"]
    for line in bad:
        assert any(re.search(p, line) for p, _ in OUTSIDE), line
    good = ["arXiv 2602.05547 §6, App. E", "parse_spec(spec)", "PartitionSpec", "task spec",
            "docs/tpu.md", "rewards ``[P]``"]
    for line in good:
        assert not any(re.search(p, line) for p, _ in OUTSIDE), line


def test_notebooks_are_committed_with_their_outputs():
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert notebooks
    for path in notebooks:
        nb = json.loads(path.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert code, path.name
        assert all(c.get("execution_count") for c in code), f"{path.name}: not executed"
        assert any(c.get("outputs") for c in code), f"{path.name}: no outputs"
        errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, f"{path.name}: committed with an error output"


def test_license_is_an_spdx_expression():
    """``project.license`` as a TOML table makes setuptools (and so pip) warn; PEP 639's SPDX
    string needs setuptools >= 77."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert isinstance(meta["project"]["license"], str)
    assert meta["project"]["license"] == "Apache-2.0"
    req = [r for r in meta["build-system"]["requires"] if r.startswith("setuptools")]
    m = re.fullmatch(r"setuptools>=(\d+)", req[0].replace(" ", ""))
    assert m and int(m.group(1)) >= 77, req
    assert not any(c.startswith("License ::") for c in meta["project"].get("classifiers", []))
