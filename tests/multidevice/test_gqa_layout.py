"""The q / kv parameter layout keeps every KV group on the tensor shard of its query heads.

Checked from the NamedShardings the parameters are materialised with (``init_sharded``): for each
device, the query heads it holds (``q_weight``, axis 1) and the KV heads it holds (``kv_weight``,
axis 2) are read off ``sharding.devices_indices_map``; query head ``i`` must come with KV head
``i // (H / Hkv)``, both in the training and the rollout layout.
"""

import jax
import pytest
from flax import nnx

from jaxgrpo import sharding as shd
from jaxgrpo.model.config import ModelConfig
from jaxgrpo.model.transformer import Transformer

pytestmark = pytest.mark.multidevice


def _held(array, axis: int) -> dict:
    """device -> the set of indices along ``axis`` that the device holds."""
    idx = array.sharding.devices_indices_map(array.shape)
    out = {}
    for dev, slices in idx.items():
        s = slices[axis]
        out[dev] = set(range(array.shape[axis])[s])
    return out


@pytest.mark.parametrize("h, hkv, tensor", [(16, 2, 4), (8, 4, 4), (8, 8, 2), (8, 2, 4),
                                            (14, 2, 4)])
@pytest.mark.parametrize("rules", ["train", "rollout"])
def test_query_heads_share_a_shard_with_their_kv_head(h, hkv, tensor, rules):
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                      num_heads=h, num_kv_heads=hkv, head_dim=8, qkv_bias=True)
    mesh = shd.make_mesh((1, 8 // tensor, tensor))
    table = shd.TRAIN_RULES if rules == "train" else shd.ROLLOUT_RULES
    graphdef, params, rest = shd.init_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), mesh,
                                              table)
    layer = nnx.merge(graphdef, params, rest).layers[0]
    group = h // hkv
    for q_arr, kv_arr, q_axis, kv_axis in (
            (layer.q_weight[...], layer.kv_weight[...], 1, 2),
            (layer.q_bias[...], layer.kv_bias[...], 0, 1)):
        q_held, kv_held = _held(q_arr, q_axis), _held(kv_arr, kv_axis)
        assert set(q_held) == set(kv_held) == set(mesh.devices.flat)
        for dev in q_held:
            assert q_held[dev], dev
            for i in q_held[dev]:
                assert i // group in kv_held[dev], (dev, i, sorted(kv_held[dev]))
        # The query heads really are split when the tensor axis divides them ...
        if h % tensor == 0:
            assert all(len(s) == h // tensor for s in q_held.values())
        # ... and the KV heads too when it divides them; otherwise they are replicated.
        want_kv = hkv // tensor if hkv % tensor == 0 else hkv
        assert all(len(s) == want_kv for s in kv_held.values())
    assert jax.tree.leaves(params)  # the model was materialised
