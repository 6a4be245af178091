"""Golden file: every parameter's shape and PartitionSpec under TRAIN_RULES and ROLLOUT_RULES.

Models are built abstractly (``nnx.eval_shape``: no weights). A change to the model's parameter
layout or to the rule tables shows up as a diff of ``tests/golden/param_specs.json``; after
checking the diff, regenerate with

    PYTHONPATH=. python tests/multidevice/test_golden_specs.py --regenerate
"""

import json
import pathlib
import sys

import jax
from flax import nnx
from jax.sharding import PartitionSpec

from jaxgrpo import sharding as shd
from jaxgrpo.model.config import ModelConfig
from jaxgrpo.model.transformer import Transformer
from jaxgrpo.train.state import split_model

GOLDEN = pathlib.Path(__file__).resolve().parents[1] / "golden" / "param_specs.json"

CONFIGS = {
    "tiny": lambda: ModelConfig.tiny(1024),
    # Qwen2.5-0.5B's published shapes (config.json): no weights are needed.
    "qwen2.5-0.5b": lambda: ModelConfig(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
        num_heads=14, num_kv_heads=2, head_dim=64, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, qkv_bias=True, max_position_embeddings=32768),
}


def _spec_json(spec: PartitionSpec) -> list:
    return [list(e) if isinstance(e, tuple) else e for e in spec]


def compute() -> dict:
    out = {}
    for name, make_cfg in CONFIGS.items():
        cfg = make_cfg()
        _, params = split_model(nnx.eval_shape(lambda c=cfg: Transformer(c, rngs=nnx.Rngs(0))))
        entries = {}
        specs = {r: shd.param_partition_specs(params, rules)
                 for r, rules in (("train", shd.TRAIN_RULES), ("rollout", shd.ROLLOUT_RULES))}
        flat_p = jax.tree_util.tree_flatten_with_path(params)[0]
        flat_s = {r: jax.tree.leaves(s, is_leaf=lambda x: isinstance(x, PartitionSpec))
                  for r, s in specs.items()}
        for i, (path, leaf) in enumerate(flat_p):
            key = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path
                           if str(getattr(k, "key", getattr(k, "name", ""))) != "value")
            entries[key] = {"shape": list(leaf.shape),
                            "train": _spec_json(flat_s["train"][i]),
                            "rollout": _spec_json(flat_s["rollout"][i])}
        out[name] = {"num_params": sum(int(leaf.size) for _, leaf in flat_p), "params": entries}
    return out


def test_param_specs_match_golden():
    golden = json.loads(GOLDEN.read_text())
    now = compute()
    assert set(now) == set(golden)
    for name in golden:
        assert now[name]["num_params"] == golden[name]["num_params"], name
        assert sorted(now[name]["params"]) == sorted(golden[name]["params"]), name
        for key, entry in golden[name]["params"].items():
            assert now[name]["params"][key] == entry, f"{name}: {key}"


def test_qwen_golden_is_the_published_size():
    # Qwen2.5-0.5B has 494,032,768 parameters (tied embeddings).
    assert json.loads(GOLDEN.read_text())["qwen2.5-0.5b"]["num_params"] == 494_032_768


if __name__ == "__main__":
    if "--regenerate" not in sys.argv:
        sys.exit("pass --regenerate to rewrite " + str(GOLDEN))
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(compute(), indent=1, sort_keys=True) + "\n")
    print("wrote", GOLDEN)
