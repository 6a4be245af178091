"""Two local processes joined by jax.distributed match one process with 8 devices."""

import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxgrpo import sharding as shd
from jaxgrpo.train.step import make_train_step
from tests.multidevice import _common as C

pytestmark = pytest.mark.multidevice
WORKER = pathlib.Path(__file__).with_name("two_process_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process_two_steps():
    mesh = shd.make_mesh((2, 2, 2), axis_types="auto")
    parts, tx, state = C.fresh_state()
    st_sh = shd.state_shardings(state, mesh, shd.TRAIN_RULES, tx)
    b_sh = jax.tree.map(lambda x: shd.batch_sharding(mesh, x.ndim), C.host_batch())
    step = make_train_step(parts, tx, C.STEP_CFG, state_sharding=st_sh, batch_sharding=b_sh)
    state = jax.device_put(state, st_sh)
    losses = []
    for seed in (0, 1):
        state, metrics = step(state, shd.shard_batch(C.host_batch(seed), mesh, group_size=C.G))
        losses.append(float(metrics["loss/total"]))
    return np.asarray(losses), [np.asarray(x) for x in jax.tree.leaves(state.params)]


@pytest.mark.slow  # two processes compile the step in parallel on 2 shared cores (~2 min)
def test_two_processes_match_one_process_and_checkpoint(tmp_path):
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(WORKER.parents[2]))
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(i), str(port), str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
             for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300)[0].decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, out) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, f"process {i} failed:\n{out[-4000:]}"
    got = np.load(tmp_path / "result.npz")
    losses, params = _single_process_two_steps()
    np.testing.assert_allclose(got["losses"], losses, rtol=1e-5, atol=1e-6)
    assert len(params) == len([k for k in got.files if k.startswith("p")])
    for i, e in enumerate(params):
        np.testing.assert_allclose(got[f"p{i}"], e, rtol=1e-5, atol=1e-6)
    # Both processes wrote into one committed checkpoint.
    assert (tmp_path / "ckpt" / "2" / "commit_success.txt").is_file()
