"""The real training loop on a mesh equals the one-device run: 8 devices in one process, and
two processes (4 devices each) joined by jax.distributed."""

import io
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import PartitionSpec

from jaxgrpo.config import load_config
from jaxgrpo.train import loop
from tests.train.conftest import tiny_overrides

pytestmark = pytest.mark.multidevice
WORKER = pathlib.Path(__file__).with_name("loop_worker.py")
# Host timings and the matmul-peak based figures differ run to run; everything else must agree.
UNTIMED = ("time", "time/", "perf/")


def overrides(workdir, **extra):
    """Two GRPO steps with P=4 (divisible by data*fsdp=4), a checkpoint at step 2."""
    return tiny_overrides(workdir, **{"train.steps": 2, "checkpoint.every": 2, **extra})


def _run(workdir, **extra):
    cfg = load_config(None, overrides(workdir, **extra))
    out = loop.run(cfg, stream=io.StringIO())
    rows = [json.loads(line) for line in open(pathlib.Path(workdir) / "metrics.jsonl")]
    return out, rows


def _assert_same_metrics(rows, ref):
    assert [r["step"] for r in rows] == [r["step"] for r in ref]
    for r, e in zip(rows, ref, strict=True):
        keys = {k for k in e if not k.startswith(UNTIMED)}
        assert keys == {k for k in r if not k.startswith(UNTIMED)}
        for k in sorted(keys):
            np.testing.assert_allclose(r[k], e[k], rtol=1e-5, atol=1e-6, err_msg=f"{k} step "
                                       f"{e['step']}")


@pytest.fixture(scope="module")
def nano():
    """The nano model of tests/train/conftest.py for every run in this module."""
    from jaxgrpo.model import config as model_config
    from tests.train.conftest import NANO

    mp = pytest.MonkeyPatch()
    orig = model_config.ModelConfig.tiny.__func__
    mp.setattr(model_config.ModelConfig, "tiny",
               classmethod(lambda cls, vocab_size, **kw: orig(cls, vocab_size, **{**NANO, **kw})))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def one_device(nano, tmp_path_factory):
    return _run(tmp_path_factory.mktemp("one"))


@pytest.mark.slow
def test_loop_on_eight_devices_matches_one_device(nano, tmp_path, one_device):
    ref_out, ref_rows = one_device
    # (2, 2, 2): batch rows over data*fsdp, weights over fsdp and tensor, rollouts resharded
    # to the rollout layout (weights gathered over fsdp).
    out, rows = _run(tmp_path, **{"mesh.devices": -1, "mesh.data": 2, "mesh.fsdp": 2,
                                  "mesh.tensor": 2})
    _assert_same_metrics(rows, ref_rows)
    emb = out["params"]["embedding"].get_value()
    assert emb.sharding.mesh.shape == {"data": 2, "fsdp": 2, "tensor": 2}
    assert emb.sharding.spec == PartitionSpec("tensor", "fsdp")
    for a, b in zip(*(jax_leaves(o["params"]) for o in (out, ref_out)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert out["accuracy_after"] == pytest.approx(ref_out["accuracy_after"], abs=1e-6)


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two processes compile and run the loop on 2 shared cores
def test_two_process_loop_matches_one_device(tmp_path, one_device):
    _, ref_rows = one_device
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(WORKER.parents[2]))
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(i), str(port), str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
             for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=400)[0].decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, out) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, f"process {i} failed:\n{out[-4000:]}"
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    _assert_same_metrics(rows, ref_rows)
    # Both processes wrote their shards into one committed checkpoint; only process 0 logged.
    assert (tmp_path / "checkpoints" / "2" / "commit_success.txt").is_file()
    assert (tmp_path / "config.yaml").is_file()
