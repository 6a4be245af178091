"""An offline ``gs://`` for tests: every ``gs://BUCKET/KEY`` is the file ``<root>/BUCKET/KEY``.

Both ways the code reaches a bucket are redirected: ``etils.epath`` (through fsspec's ``gcs``
protocol, replaced by a local filesystem rooted at ``root``) and orbax's TensorStore array
writes (its GCS kvstore spec, replaced by a ``file`` kvstore at the same place). Nothing goes
over the network, and the strings the code sees are the real ``gs://`` URIs, so a path helper
that turns ``gs://b/x`` into the local ``gs:/b/x`` is caught: that lands under the working
directory, not under ``root``.
"""

from __future__ import annotations

import os

import pytest
from fsspec.implementations.local import LocalFileSystem
from fsspec.registry import _registry as fs_registry  # the protocol -> class cache


def _make_fs_class(root: str):
    class FakeGCSFileSystem(LocalFileSystem):
        protocol = ("gs", "gcs")
        root_marker = ""

        def __init__(self, *args, **kwargs):
            super().__init__()

        @classmethod
        def _strip_protocol(cls, path):
            path = os.fspath(path)
            for prefix in ("gs://", "gcs://"):
                if path.startswith(prefix):
                    return os.path.join(root, path[len(prefix):]).rstrip("/") or "/"
            if path.startswith(root):
                return path.rstrip("/")
            raise ValueError(f"fake gcs got a non-gs path {path!r}")

        def _unroot(self, p: str) -> str:
            return os.path.relpath(p, root)  # "bucket/key", as gcsfs lists names

        def glob(self, path, **kwargs):
            return [self._unroot(p) for p in super().glob(path, **kwargs)]

    return FakeGCSFileSystem


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    """``(root)``: ``gs://`` is served from ``root``; the test runs in another directory
    (``cwd``) so that a mangled ``gs:/...`` local path shows up there."""
    from etils.epath import backend as epath_backend
    from orbax.checkpoint._src.path import gcs_utils

    root = str(tmp_path / "gcs")
    os.makedirs(root)
    cls = _make_fs_class(root)
    for proto in ("gs", "gcs"):
        monkeypatch.setitem(fs_registry, proto, cls)  # undone after the test
    epath_backend.fsspec_backend._get_filesystem.cache_clear()

    def kvstore_for_gcs(ckpt_path: str) -> dict:
        bucket, key = gcs_utils.parse_gcs_path(ckpt_path, add_trailing_slash=False)
        return {"driver": "file", "path": os.path.join(root, bucket, key)}

    monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", kvstore_for_gcs)
    # orbax asks the bucket (google-cloud-storage) whether it has a hierarchical namespace.
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield root
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    assert not any(p.name.startswith("gs:") for p in cwd.rglob("*")), (
        f"a gs:// path was turned into a local path under {cwd}: {sorted(cwd.rglob('*'))}")
