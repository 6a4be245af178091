"""One of two local processes running the real training loop (``jaxgrpo.train.loop.run``).

Usage: ``python loop_worker.py PROCESS_ID PORT WORKDIR``. Launched by ``test_loop_mesh.py``:
4 simulated CPU devices per process, joined through the ``distributed.*`` config fields, the
nano model of ``tests/train/conftest.py`` on the global mesh (2, 2, 2). Process 0 writes the run's
``metrics.jsonl``; both processes write the checkpoint.
"""

import io
import os
import pathlib
import sys

flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
         if not f.startswith("--xla_force_host_platform_device_count")]
os.environ["XLA_FLAGS"] = " ".join(flags + ["--xla_force_host_platform_device_count=4"])
os.environ["JAX_PLATFORMS"] = "cpu"

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def main(process_id: int, port: int, workdir: str) -> None:
    import jax

    jax.config.update("jax_numpy_rank_promotion", "raise")
    from jaxgrpo.config import load_config
    from jaxgrpo.model import config as model_config
    from jaxgrpo.train import loop
    from tests.multidevice.test_loop_mesh import overrides
    from tests.train.conftest import NANO

    orig = model_config.ModelConfig.tiny.__func__
    model_config.ModelConfig.tiny = classmethod(
        lambda cls, vocab_size, **kw: orig(cls, vocab_size, **{**NANO, **kw}))
    cfg = load_config(None, overrides(workdir, **{
        "mesh.devices": -1, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
        "distributed.coordinator_address": f"127.0.0.1:{port}",
        "distributed.num_processes": 2, "distributed.process_id": process_id,
    }))
    loop.run(cfg, stream=io.StringIO())
    assert jax.process_count() == 2 and jax.device_count() == 8
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
