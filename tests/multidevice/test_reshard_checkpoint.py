"""A checkpoint saved from an 8-device mesh restores onto 4 devices and training continues."""

import jax
import numpy as np
import pytest

from jaxgrpo import sharding as shd
from jaxgrpo.checkpoint import Checkpointer
from jaxgrpo.train.step import make_train_step
from tests.multidevice import _common as C

pytestmark = pytest.mark.multidevice


def _sharded(mesh):
    parts, tx, state = C.fresh_state()
    st_sh = shd.state_shardings(state, mesh, shd.TRAIN_RULES, tx)
    b_sh = jax.tree.map(lambda x: shd.batch_sharding(mesh, x.ndim), C.host_batch())
    step = make_train_step(parts, tx, C.STEP_CFG, state_sharding=st_sh, batch_sharding=b_sh)
    return step, state, st_sh


@pytest.mark.slow  # compiles the step for two meshes (~45 s on 2 shared cores)
def test_checkpoint_from_8_devices_restores_onto_4_and_training_continues(tmp_path):
    mesh8 = shd.make_mesh((2, 2, 2), axis_types="auto")
    step8, state, sh8 = _sharded(mesh8)
    state = jax.device_put(state, sh8)
    state, _ = step8(state, shd.shard_batch(C.host_batch(0), mesh8, group_size=C.G))
    with Checkpointer(tmp_path, keep=1, asynchronous=False) as ckpt:
        ckpt.save(1, state)
    # The reference continues on 8 devices.
    saved = C.to_numpy(state)
    cont8, m8 = step8(state, shd.shard_batch(C.host_batch(1), mesh8, group_size=C.G))

    mesh4 = shd.make_mesh((1, 4, 1), jax.devices()[4:], axis_types="auto")
    step4, template, sh4 = _sharded(mesh4)
    with Checkpointer(tmp_path, create=False) as ckpt:
        restored, meta = ckpt.restore(abstract_state=shd.abstract_like(template, sh4))
    assert meta["step"] == 1 and int(restored.step) == 1
    emb = restored.params["embedding"].get_value()
    assert set(emb.sharding.device_set) == set(jax.devices()[4:])
    assert emb.sharding == sh4.params["embedding"].get_value()
    assert emb.addressable_shards[0].data.shape == (C.VOCAB, 32 // 4)  # embed split 4 ways
    for a, e in zip(jax.tree.leaves(C.to_numpy(restored)), jax.tree.leaves(saved), strict=True):
        np.testing.assert_array_equal(a, e)
    cont4, m4 = step4(restored, shd.shard_batch(C.host_batch(1), mesh4, group_size=C.G))
    assert int(cont4.step) == 2
    np.testing.assert_allclose(float(m4["loss/total"]), float(m8["loss/total"]), rtol=1e-5,
                               atol=1e-6)
    for a, e in zip(jax.tree.leaves(C.to_numpy(cont4)), jax.tree.leaves(C.to_numpy(cont8)),
                    strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)
