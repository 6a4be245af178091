"""Scale-out configuration: the pod config, distributed settings, the launcher's syntax and the
activation constraint."""

import pathlib
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxgrpo import sharding as shd
from jaxgrpo.config import ConfigError, DistributedConfig, load_config

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_pod_config_loads_and_fills_a_v5p64_slice():
    cfg = load_config(ROOT / "configs" / "pod_v5p64_mtgrpo_3task.yaml", check_paths=False,
                      num_devices=32)
    m = cfg.mesh
    assert m.data * m.fsdp * m.tensor == 32  # v5p-64: 64 TensorCores = 32 chips
    assert [t.name for t in cfg.tasks.mixture] == ["rg_countdown", "rg_zebra", "rg_arc1d"]
    assert {t.level for t in cfg.tasks.mixture} == {2}
    assert (cfg.tasks.prompts_per_step, cfg.rollout.group_size, cfg.loss.minibatches) == (32, 72, 4)
    assert str(cfg.algo.name) == "mt_grpo" and cfg.algo.mt_grpo.lam == 0.2
    # 8 prompts per minibatch over data*fsdp, and a whole number of rows per host (8 hosts).
    assert (32 // 4) % (m.data * m.fsdp) == 0 and (m.data * m.fsdp) % 8 == 0


def test_distributed_config_fields_go_together():
    with pytest.raises(ConfigError, match="set together"):
        DistributedConfig(coordinator_address="h:1")
    with pytest.raises(ConfigError, match="distributed.process_id"):
        DistributedConfig(coordinator_address="h:1", num_processes=2, process_id=2)
    assert DistributedConfig(coordinator_address="h:1", num_processes=2, process_id=1).configured


def test_initialize_distributed_is_a_no_op_for_one_process(monkeypatch):
    for k in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    assert shd.initialize_distributed(DistributedConfig()) is False
    assert jax.process_count() == 1
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES"):
        shd.initialize_distributed()


def test_launcher_is_valid_bash_and_refuses_missing_arguments():
    script = ROOT / "scripts" / "tpu_pod_launch.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    out = subprocess.run(["bash", str(script), "only-name"], capture_output=True, text=True)
    assert out.returncode == 2 and "usage" in out.stderr


@pytest.mark.multidevice
def test_constrain_rows_pins_rows_under_a_mesh_and_is_a_no_op_without():
    x = jnp.arange(8 * 3, dtype=jnp.float32).reshape(8, 3)
    assert shd.constrain_rows(x) is x  # no mesh context
    mesh = shd.make_mesh((2, 2, 2))
    f = jax.jit(lambda a: shd.constrain_rows(a * 2))
    with jax.set_mesh(mesh):
        y = f(x)
        odd = jax.jit(lambda a: shd.constrain_rows(a))(jnp.ones((3, 2)))  # 3 rows: left alone
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec(("data", "fsdp"))), 2)
    np.testing.assert_array_equal(np.asarray(y), 2 * np.asarray(x))
    np.testing.assert_array_equal(np.asarray(odd), np.ones((3, 2)))
    assert shd.local_rows(y).shape == (8, 3)  # one process: every row
