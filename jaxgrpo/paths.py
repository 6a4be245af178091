"""Run paths: local directories or URIs (``gs://bucket/run``, any scheme ``etils.epath`` knows).

1. :func:`as_path` turns a string or path into an ``etils.epath.Path`` that keeps the scheme
   (``pathlib.Path("gs://b/x")`` would collapse it to the local ``gs:/b/x``). A local path gives
   the same string as ``pathlib.Path`` and the same files through the same ``os`` calls.
2. :func:`local_dir` lets a library that only writes to a local directory
   (``tokenizer.save_pretrained``, the HF export) write to a URI: it writes into a temporary
   local directory, which is then copied to the URI (:func:`upload_tree`). For a local path it
   is that directory itself, so nothing is staged or copied.
3. :func:`write_text` writes a small text file: locally through a temporary file and
   ``os.replace`` (atomic); to a URI as one object (object stores publish an object whole, on
   close).

Nothing here needs the network until a URI is opened; no jax.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator

from etils import epath

__all__ = ["as_path", "is_uri", "local_dir", "upload_tree", "write_text"]


def is_uri(path: str | os.PathLike) -> bool:
    """True for ``scheme://...`` (``gs://b/x``); False for a local path."""
    return "://" in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
    """``path`` as an ``etils.epath.Path``; a URI keeps its scheme (``str`` of it is ``path``).

    Raises:
      ValueError: a URI whose scheme ``etils.epath`` does not know (names it and the known ones).
    """
    raw = os.fspath(path)
    try:
        return epath.Path(raw)
    except KeyError:
        scheme = raw.split("://", 1)[0]
        raise ValueError(f"path {raw!r}: unknown scheme '{scheme}://'; use a local path or "
                         "gs://, s3://, az:// or hf://") from None


def upload_tree(local: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy every file under the local directory ``local`` to ``dst`` (same relative paths,
    existing files overwritten)."""
    root = pathlib.Path(local)
    out = as_path(dst)
    out.mkdir(parents=True, exist_ok=True)
    for src in sorted(root.rglob("*")):
        target = out.joinpath(*src.relative_to(root).parts)
        if src.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.write_bytes(src.read_bytes())


@contextlib.contextmanager
def local_dir(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """A local directory to write ``path``'s files into.

    Local ``path``: the directory itself (created with its parents), nothing is copied. URI:
    a fresh temporary directory, copied to ``path`` with :func:`upload_tree` when the block ends
    without an exception, then removed (also on an exception, when nothing is copied).
    """
    if not is_uri(path):
        directory = pathlib.Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        yield directory
        return
    as_path(path)  # an unknown scheme fails before anything is written
    stage = tempfile.mkdtemp(prefix="jaxgrpo-stage-")
    try:
        yield pathlib.Path(stage)
        upload_tree(stage, path)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to the file ``path``, creating its directory.

    Local: written to ``<path>.tmp`` and renamed over ``path`` (atomic). URI: one object write.
    """
    if not is_uri(path):
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
        return
    out = as_path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
