"""HF interop: build a ``Transformer`` from a local HF directory, and export one back.

Weights are read straight from ``*.safetensors`` files (single or sharded with an index) by
parsing the header and memory-mapping each tensor with NumPy (``ml_dtypes`` supplies bfloat16),
so a tensor is read from disk only when its parameter is built; export writes with the
``safetensors`` package (``safetensors.numpy.save_file``). A declarative table maps HF keys onto the
parameter layout (``q_weight``, fused ``kv_weight`` and ``gate_up_weight``); every tensor's shape
is checked against the config before it is used, and each finished parameter is cast to the
parameter dtype and goes to its target sharding (``jaxgrpo.sharding.param_shardings``, the same
mapping the trainer uses) with ``jax.device_put``, one at a time, so the full model never sits on
one device (nor in host memory beyond one parameter at a time).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors.numpy
from flax import nnx

from jaxgrpo.config import InputError
from jaxgrpo.model.config import ModelConfig
from jaxgrpo.model.transformer import Transformer

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")

_ST_DTYPES = {
    "F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "F64": np.dtype(np.float64),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


# -- safetensors I/O ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _TensorRef:
    file: pathlib.Path
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def _read_header(file: pathlib.Path) -> dict[str, _TensorRef]:
    """The tensors a safetensors file holds; a file that is not one is an :class:`InputError`
    naming it and what is wrong (checked before anything is allocated or mapped)."""
    size = file.stat().st_size
    bad = lambda what: InputError(f"{file} is not a valid safetensors file: {what} (re-download "
                                  "or re-export the checkpoint)")
    with open(file, "rb") as fh:
        if size < 8:
            raise bad(f"it has {size} bytes, fewer than the 8-byte header length")
        n = int.from_bytes(fh.read(8), "little")
        if n > size - 8:
            raise bad(f"its header length {n} exceeds the {size - 8} bytes after it")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise bad(f"its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    refs = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (s, e) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise bad(f"tensor {key!r} has no dtype, shape and data_offsets") from None
        if dtype not in _ST_DTYPES:
            raise InputError(f"{file}: tensor {key!r} has unsupported dtype {dtype}")
        count = int(np.prod(shape, dtype=np.int64))
        if not (0 <= s <= e <= size - 8 - n) or e - s != count * _ST_DTYPES[dtype].itemsize:
            raise bad(f"tensor {key!r} (shape {list(shape)}, {dtype}) has data offsets "
                      f"[{s}, {e}] that do not fit its size or the file ({size} bytes)")
        refs[key] = _TensorRef(file, _ST_DTYPES[dtype], shape, 8 + n + s, 8 + n + e)
    return refs


def _index_weights(directory: pathlib.Path) -> dict[str, _TensorRef]:
    index_file = directory / "model.safetensors.index.json"
    if index_file.exists():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise InputError(f"{index_file} is not a safetensors index (JSON with a "
                             f"'weight_map'): {type(e).__name__}: {e}") from None
        files = sorted(set(weight_map.values()))
        for f in files:
            if not (directory / f).exists():
                raise FileNotFoundError(
                    f"{index_file} lists shard {f!r}, which is missing from {directory}")
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors weights found in {directory}")
    refs: dict[str, _TensorRef] = {}
    for f in files:
        refs.update(_read_header(directory / f))
    return refs


def _load_tensor(ref: _TensorRef) -> np.ndarray:
    count = int(np.prod(ref.shape, dtype=np.int64))
    mm = np.memmap(ref.file, dtype=ref.dtype, mode="r", offset=ref.start, shape=(count,))
    return mm.reshape(ref.shape)


def write_safetensors(file: os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` (float32/bfloat16/... NumPy arrays) as one safetensors file."""
    arrays = {}
    for key, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype not in _ST_NAMES:
            raise TypeError(f"tensor {key!r}: cannot write dtype {arr.dtype} to safetensors")
        arrays[key] = arr
    safetensors.numpy.save_file(arrays, os.fspath(file),
                                metadata=dict(metadata or {"format": "pt"}))


# -- config ---------------------------------------------------------------------------------------
def _read_config_json(directory: pathlib.Path) -> dict:
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {directory} does not exist")
    cfg_file = directory / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file} is missing: an HF model directory needs config.json")
    try:
        raw = json.loads(cfg_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{cfg_file} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise InputError(f"{cfg_file} is not a JSON object")
    mt = raw.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise InputError(f"{cfg_file}: model_type {mt!r} is not supported; supported types are "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    return raw


def config_from_hf(hf_config, *, dtype="float32", param_dtype=None) -> ModelConfig:
    """Map a ``transformers`` Llama/Qwen2/Qwen3 config onto a ``ModelConfig`` with compute
    dtype ``dtype`` and parameter dtype ``param_dtype`` (default: ``dtype``)."""
    mt = hf_config.model_type
    if mt not in SUPPORTED_MODEL_TYPES:
        raise InputError(f"model_type {mt!r} is not supported; supported types are "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    if getattr(hf_config, "mlp_bias", False):
        raise InputError(f"{mt} config with mlp_bias=True is not supported")
    attn_bias = bool(getattr(hf_config, "attention_bias", False))
    if mt in ("llama", "qwen3") and attn_bias:
        raise InputError(f"{mt} config with attention_bias=True (biased o_proj) is not supported")
    if mt == "qwen2" and getattr(hf_config, "use_sliding_window", False):
        raise InputError("qwen2 config with use_sliding_window=True is not supported")
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise InputError(f"hidden_act {hf_config.hidden_act!r} is not supported (only silu)")
    rope = dict(getattr(hf_config, "rope_parameters", None) or {})
    theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    rope_type = rope.get("rope_type", "default")
    dname = jnp.dtype(dtype).name
    return ModelConfig(
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rope_theta=float(theta),
        rms_norm_eps=float(hf_config.rms_norm_eps),
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        qkv_bias=(mt == "qwen2"),
        qk_norm=(mt == "qwen3"),
        dtype=dname,
        param_dtype=dname if param_dtype is None else jnp.dtype(param_dtype).name,
        rope_type=rope_type,
        rope_factor=float(rope.get("factor", 1.0)),
        rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        rope_original_max_position=int(rope.get("original_max_position_embeddings", 8192)),
        max_position_embeddings=int(getattr(hf_config, "max_position_embeddings", 4096)),
    )


# -- the key table --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Entry:
    """One model parameter built from one or more HF tensors.

    ``hf_keys`` with their expected HF shapes; ``to_param`` maps the HF arrays onto the parameter,
    ``to_hf`` splits the parameter back into the HF arrays (for export).
    """

    path: tuple
    hf_keys: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    to_param: Callable[..., np.ndarray]
    to_hf: Callable[[np.ndarray], tuple[np.ndarray, ...]]


def key_table(cfg: ModelConfig) -> list[_Entry]:
    """The HF key <-> parameter table for ``cfg`` (Llama / Qwen2 / Qwen3 naming)."""
    d, f, h, k, dh, v = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads,
                         cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size)
    same = (lambda x: x, lambda x: (x,))
    table = [_Entry(("embedding",), ("model.embed_tokens.weight",), ((v, d),), *same),
             _Entry(("final_norm",), ("model.norm.weight",), ((d,),), *same)]
    if not cfg.tie_word_embeddings:
        table.append(_Entry(("lm_head",), ("lm_head.weight",), ((v, d),),
                            lambda w: w.T, lambda p: (p.T,)))

    def q_in(w):  # [H*Dh, D] -> [D, H, Dh]
        return w.T.reshape(d, h, dh)

    def q_out(p):
        return (p.reshape(d, h * dh).T,)

    def kv_in(kk, vv):  # [Hkv*Dh, D] each -> [D, 2, Hkv, Dh]
        return np.stack([kk.T.reshape(d, k, dh), vv.T.reshape(d, k, dh)], axis=1)

    def kv_out(p):
        return p[:, 0].reshape(d, k * dh).T, p[:, 1].reshape(d, k * dh).T

    def kv_bias_in(kk, vv):  # [Hkv*Dh] each -> [2, Hkv, Dh]
        return np.stack([kk.reshape(k, dh), vv.reshape(k, dh)], axis=0)

    def kv_bias_out(p):
        return p[0].reshape(-1), p[1].reshape(-1)

    for i in range(cfg.num_layers):
        pre = f"model.layers.{i}."
        at = pre + "self_attn."
        table += [
            _Entry(("layers", i, "attn_norm"), (pre + "input_layernorm.weight",), ((d,),), *same),
            _Entry(("layers", i, "q_weight"), (at + "q_proj.weight",), ((h * dh, d),),
                   q_in, q_out),
            _Entry(("layers", i, "kv_weight"), (at + "k_proj.weight", at + "v_proj.weight"),
                   ((k * dh, d), (k * dh, d)), kv_in, kv_out),
            _Entry(("layers", i, "o_weight"), (at + "o_proj.weight",), ((d, h * dh),),
                   lambda w: w.T.reshape(h, dh, d), lambda p: (p.reshape(h * dh, d).T,)),
            _Entry(("layers", i, "mlp_norm"), (pre + "post_attention_layernorm.weight",),
                   ((d,),), *same),
            _Entry(("layers", i, "gate_up_weight"),
                   (pre + "mlp.gate_proj.weight", pre + "mlp.up_proj.weight"), ((f, d), (f, d)),
                   lambda g, u: np.stack([g.T, u.T], axis=1), lambda p: (p[:, 0].T, p[:, 1].T)),
            _Entry(("layers", i, "down_weight"), (pre + "mlp.down_proj.weight",), ((d, f),),
                   lambda w: w.T, lambda p: (p.T,)),
        ]
        if cfg.qkv_bias:
            table += [
                _Entry(("layers", i, "q_bias"), (at + "q_proj.bias",), ((h * dh,),),
                       lambda b: b.reshape(h, dh), lambda p: (p.reshape(-1),)),
                _Entry(("layers", i, "kv_bias"), (at + "k_proj.bias", at + "v_proj.bias"),
                       ((k * dh,), (k * dh,)), kv_bias_in, kv_bias_out),
            ]
        if cfg.qk_norm:
            table += [
                _Entry(("layers", i, "q_norm"), (at + "q_norm.weight",), ((dh,),), *same),
                _Entry(("layers", i, "k_norm"), (at + "k_norm.weight",), ((dh,),), *same),
            ]
    return table


def load_hf(path: os.PathLike | str, *, dtype=jnp.float32, param_dtype=None,
            mesh: jax.sharding.Mesh | None = None,
            rules: Mapping[str, str | Sequence[str] | None] | None = None,
            **config_overrides) -> Transformer:
    """Build a ``Transformer`` from a local HF directory (config.json + safetensors).

    Args:
        path: directory with ``config.json`` and ``model.safetensors`` or sharded
            ``model-*.safetensors`` with ``model.safetensors.index.json``.
        dtype: compute dtype (``jnp.float32`` or ``jnp.bfloat16``).
        param_dtype: storage dtype of the parameters (default: ``dtype``); checkpoint tensors
            are cast to it on the host, one at a time. Optimiser moments built from the
            parameters (``optax.adam``) inherit it.
        mesh: optional mesh; each parameter is placed with the sharding
            ``jaxgrpo.sharding.param_shardings(params, mesh, rules)`` gives (its logical axis
            names mapped through ``rules``, unlisted names replicated, and a mesh axis dropped
            from any dimension it does not divide). Without a mesh every parameter goes to the
            first device.
        rules: logical axis name -> mesh axis (or tuple of axes, or None); default: every
            parameter replicated on ``mesh``.
        **config_overrides: further :class:`ModelConfig` fields (e.g. ``attention="chunked"``, ``remat="block"``),
            applied with ``dataclasses.replace`` to the config read from ``config.json``.

    Returns:
        The model; ``model(tokens)`` gives logits ``[B, T, V]``.

    Raises:
        FileNotFoundError: the directory, ``config.json`` or the weight files are missing.
        TypeError: a ``config_overrides`` key that is not a ``ModelConfig`` field.
        ValueError: unsupported ``model_type``, a missing weight key, or a tensor whose shape
            does not match the config (the message names the key and the file).
    """
    import transformers

    from jaxgrpo.sharding import param_shardings

    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(config_overrides) - fields)
    if unknown:
        raise TypeError(f"load_hf: {unknown} are not ModelConfig fields; the fields are "
                        f"{sorted(fields)}")
    directory = pathlib.Path(path)
    _read_config_json(directory)
    try:
        hf_config = transformers.AutoConfig.from_pretrained(str(directory))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{directory / 'config.json'}: {e}") from None
    cfg = config_from_hf(hf_config, dtype=dtype,
                         param_dtype=dtype if param_dtype is None else param_dtype)
    if config_overrides:
        cfg = dataclasses.replace(cfg, **config_overrides)
    refs = _index_weights(directory)
    target = np.dtype(jnp.dtype(cfg.param_dtype))

    # Outside any mesh context: under one (as in `jaxgrpo train`), nnx.eval_shape would read
    # the logical axis names as mesh axes.
    with jax.set_mesh(None):
        abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    if mesh is None:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = dict.fromkeys(flat, one)
    else:
        shardings = {path: var.get_value() for path, var in
                     nnx.to_flat_state(param_shardings(state, mesh, dict(rules or {})))}
    for entry in key_table(cfg):
        arrays = []
        for key, shape in zip(entry.hf_keys, entry.hf_shapes, strict=True):
            if key not in refs:
                raise InputError(f"weight {key!r} is missing from the safetensors files in "
                                 f"{directory}")
            ref = refs[key]
            if ref.shape != shape:
                raise InputError(f"weight {key!r} in {ref.file.name} has shape {ref.shape} but "
                                 f"config.json implies {shape}")
            arrays.append(_load_tensor(ref))
        value = np.asarray(entry.to_param(*arrays)).astype(target)
        var = flat[entry.path]
        if value.shape != tuple(var.shape):
            raise ValueError(f"parameter {entry.path} built from {entry.hf_keys} has shape "
                             f"{value.shape}, expected {tuple(var.shape)}")
        var.set_value(jax.device_put(value, shardings[entry.path]))
        del arrays, value
    missing = [p for p, v in flat.items() if isinstance(v.get_value(), jax.ShapeDtypeStruct)]
    if missing:
        raise ValueError(f"parameters {missing} were not covered by the HF key table")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _hf_config(cfg: ModelConfig):
    import transformers

    mt = cfg.hf_model_type
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "qwen3": transformers.Qwen3Config}[mt]
    rope = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_type in ("linear", "llama3"):
        rope["factor"] = cfg.rope_factor
    if cfg.rope_type == "llama3":
        rope.update(low_freq_factor=cfg.rope_low_freq_factor,
                    high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_max_position)
    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
              intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
              num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
              head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
              tie_word_embeddings=cfg.tie_word_embeddings, rope_parameters=rope,
              max_position_embeddings=cfg.max_position_embeddings,
              hidden_act="silu", dtype=cfg.param_dtype)
    if mt == "qwen2":
        kw["use_sliding_window"] = False
    else:
        kw["attention_bias"] = False
    return cls(**kw)


def save_hf(model: Transformer, path: os.PathLike | str) -> pathlib.Path:
    """Export ``model`` as an HF directory (``config.json`` + ``model.safetensors``).

    The family follows the config (``qk_norm`` -> qwen3, ``qkv_bias`` -> qwen2, else llama);
    tensors keep the parameter dtype. ``transformers`` loads the result with
    ``AutoModelForCausalLM.from_pretrained(path)``.
    """
    cfg = model.cfg
    directory = pathlib.Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    _hf_config(cfg).save_pretrained(str(directory))
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    tensors = {}
    for entry in key_table(cfg):
        value = np.asarray(jax.device_get(flat[entry.path].get_value()))
        for key, arr in zip(entry.hf_keys, entry.to_hf(value), strict=True):
            tensors[key] = np.ascontiguousarray(arr)
    write_safetensors(directory / "model.safetensors", tensors)
    return directory
