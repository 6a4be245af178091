"""One of two local processes joined by ``jax.distributed`` (4 simulated CPU devices each).

Usage: ``python two_process_worker.py PROCESS_ID PORT OUTDIR``. Launched by
``test_two_processes.py``; runs two sharded train steps on the global 8-device mesh (2, 2, 2)
with each process feeding its own half of every batch, saves a checkpoint from both processes,
restores it, and (process 0) writes the results to ``OUTDIR/result.npz``.
"""

import os
import pathlib
import sys

# Before jax is imported: this process gets 4 CPU devices (the parent's flags say 8).
flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
         if not f.startswith("--xla_force_host_platform_device_count")]
os.environ["XLA_FLAGS"] = " ".join(flags + ["--xla_force_host_platform_device_count=4"])
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def main(process_id: int, port: int, outdir: str) -> None:
    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                               initialization_timeout=60)
    from jax.experimental import multihost_utils

    from jaxgrpo import sharding as shd
    from jaxgrpo.checkpoint import Checkpointer
    from jaxgrpo.train.step import make_train_step
    from tests.multidevice import _common as C

    assert jax.process_count() == 2 and jax.local_device_count() == 4 and jax.device_count() == 8
    mesh = shd.make_mesh((2, 2, 2), axis_types="auto")
    parts, tx, state = C.fresh_state()  # identical on both processes (same seed)
    st_sh = shd.state_shardings(state, mesh, shd.TRAIN_RULES, tx)
    host_state = C.to_numpy(state)
    state = jax.tree.map(
        lambda x, sh: jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx]),
        host_state, shd.match_structure(st_sh, host_state))
    b_sh = jax.tree.map(lambda x: shd.batch_sharding(mesh, x.ndim), C.host_batch())
    step = make_train_step(parts, tx, C.STEP_CFG, state_sharding=st_sh, batch_sharding=b_sh)

    half = C.P * C.G // 2
    losses = []
    for seed in (0, 1):
        full = C.host_batch(seed)
        # This host's share only: rows [pid*N/2, (pid+1)*N/2), whole groups.
        local = jax.tree.map(lambda x: x[process_id * half:(process_id + 1) * half], full)
        batch = shd.shard_batch(local, mesh, group_size=C.G, process_local=True)
        assert not batch.tokens.is_fully_addressable
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss/total"]))  # replicated: readable on every host
    params = multihost_utils.process_allgather(state.params, tiled=True)

    ckpt = Checkpointer(pathlib.Path(outdir) / "ckpt", keep=1, asynchronous=False)
    ckpt.save(2, state, meta={"losses": losses})
    ckpt.wait()
    restored, meta = ckpt.restore(2, abstract_state=shd.abstract_like(state, st_sh))
    ckpt.close()
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)),
                        multihost_utils.process_allgather(restored, tiled=True),
                        multihost_utils.process_allgather(state, tiled=True))
    assert all(jax.tree.leaves(same)), same
    assert meta["losses"] == losses and meta["step"] == 2
    assert int(restored.step) == 2
    multihost_utils.sync_global_devices("done")
    if process_id == 0:
        flat = {f"p{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(params))}
        np.savez(pathlib.Path(outdir) / "result.npz", losses=np.asarray(losses), **flat)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
