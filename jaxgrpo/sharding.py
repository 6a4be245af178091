"""Device mesh and logical-axis rules: where every parameter, optimiser slot and batch row lives.

Mesh axes are ``("data", "fsdp", "tensor")``:

- ``data``: pure data parallelism; parameters are replicated over it.
- ``fsdp``: data parallelism whose devices also split the parameters (and optimiser state) along
  their ``embed`` dimension; XLA gathers them for each matmul.
- ``tensor``: splits attention heads, MLP columns and the vocabulary (Megatron style). Query
  heads (``heads``) and KV heads (``kv_heads``) split contiguously over it, so every query head
  sits on the shard of its KV group; where ``tensor`` does not divide ``Hkv`` the small k/v
  projections are replicated instead.

Parameters carry logical axis names (``vocab``, ``embed``, ``heads``, ``kv_heads``, ``head_dim``,
``mlp``; see ``jaxgrpo.model.transformer``). A rule table maps each name to a mesh axis (or a
tuple of axes, or ``None`` = replicated). :data:`TRAIN_RULES` shards the weights over ``fsdp`` and ``tensor``;
:data:`ROLLOUT_RULES` keeps only the ``tensor`` split (weights gathered over ``fsdp``), which is
the layout for decoding, where every step touches every weight.

Batches: rows ``n = p*G + g`` are contiguous groups. The row axis is split over
``("data", "fsdp")`` in whole groups (the number of prompts P must divide by ``data*fsdp``), so
group statistics never need a cross-device collective; the group axis G is never split.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxgrpo.config import AxisType as ConfigAxisType
from jaxgrpo.config import ConfigError, DistributedConfig, MeshConfig

__all__ = [
    "BATCH_AXES",
    "MESH_AXES",
    "ROLLOUT_RULES",
    "TRAIN_RULES",
    "abstract_like",
    "allgather_rows",
    "batch_sharding",
    "constrain_cached_query",
    "constrain_kv_cache",
    "constrain_rows",
    "initialize_distributed",
    "kv_cache_spec",
    "local_rows",
    "logical_to_spec",
    "make_mesh",
    "match_structure",
    "param_partition_specs",
    "init_sharded",
    "param_shardings",
    "replicated",
    "reshard",
    "shard_batch",
    "state_shardings",
]

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the row axis N (and the prompt axis P) is split over these

# Logical name -> mesh axis. Every large matrix has an ``embed`` dimension, so FSDP shards all of
# them; ``tensor`` takes heads, MLP columns and the vocabulary.
TRAIN_RULES: dict[str, str | tuple[str, ...] | None] = {
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "batch": BATCH_AXES,
}
# Decode layout: weights gathered over fsdp (replicated there), still split over tensor.
ROLLOUT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "vocab": "tensor",
    "embed": None,
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "batch": BATCH_AXES,
}

_AXIS_TYPES = {
    ConfigAxisType.EXPLICIT: AxisType.Explicit,
    ConfigAxisType.AUTO: AxisType.Auto,
}


def make_mesh(config: MeshConfig | Mapping[str, int] | Sequence[int], devices=None, *,
              axis_types: ConfigAxisType | str | None = None) -> Mesh:
    """A ``("data", "fsdp", "tensor")`` mesh over ``devices`` (default: all of ``jax.devices()``).

    Args:
        config: a :class:`~jaxgrpo.config.MeshConfig`, a mapping ``{"data": .., "fsdp": ..,
            "tensor": ..}`` (missing axes are 1) or a 3-sequence of sizes; at most one size may
            be -1, meaning "the remaining devices".
        devices: the devices to lay out (their order is kept: row-major over the three axes);
            a ``MeshConfig`` with ``devices=n`` takes the first ``n`` of them.
        axis_types: ``"explicit"`` or ``"auto"`` for all three axes; default the config's
            ``axis_types`` (``MeshConfig`` defaults to auto). Always passed to ``Mesh``.

    Raises:
        ValueError: sizes that are not positive or -1, more than one -1, sizes that do not
            multiply to the device count, or an unknown axis name or axis type.
        TypeError: ``config`` of another type.
    """
    if isinstance(config, MeshConfig):
        cfg = config
    elif isinstance(config, Mapping):
        unknown = set(config) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"config: unknown mesh axes {sorted(unknown)}; the axes are "
                             f"{MESH_AXES}")
        cfg = _mesh_config(**{k: config.get(k, 1) for k in MESH_AXES})
    elif isinstance(config, Sequence) and not isinstance(config, str):
        if len(config) != 3:
            raise ValueError(f"config: a sequence of sizes must have 3 entries {MESH_AXES}, "
                             f"got {tuple(config)}")
        cfg = _mesh_config(**dict(zip(MESH_AXES, config, strict=True)))
    else:
        raise TypeError(f"config must be a MeshConfig, a mapping of axis sizes or a 3-sequence, "
                        f"got {type(config).__name__}")
    kind = cfg.axis_types if axis_types is None else axis_types
    try:
        kind = ConfigAxisType(kind)
    except ValueError:
        raise ValueError(f"axis_types must be one of {[t.value for t in ConfigAxisType]}, "
                         f"got {axis_types!r}") from None
    devs = list(jax.devices() if devices is None else devices)
    if not devs:
        raise ValueError("devices must not be empty")
    if isinstance(config, MeshConfig):
        try:
            devs = devs[:cfg.num_devices(len(devs))]
        except ConfigError as e:
            raise ValueError(str(e)) from None
    try:
        sizes = cfg.shape(len(devs))
    except ConfigError as e:
        raise ValueError(str(e)) from None
    grid = np.asarray(devs, dtype=object).reshape(tuple(sizes[a] for a in MESH_AXES))
    return Mesh(grid, MESH_AXES, axis_types=(_AXIS_TYPES[kind],) * len(MESH_AXES))


def _mesh_config(**sizes) -> MeshConfig:
    for k, v in sizes.items():
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"mesh size {k} must be an int, got {type(v).__name__}")
    try:
        return MeshConfig(**{k: int(v) for k, v in sizes.items()})
    except ConfigError as e:
        raise ValueError(str(e)) from None


def _as_tuple(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def logical_to_spec(axes: Sequence[str | None], rules: Mapping[str, Any]) -> PartitionSpec:
    """The ``PartitionSpec`` of an array whose dimensions carry the logical names ``axes``.

    Names missing from ``rules`` (and ``None``) replicate. A mesh axis already used by an
    earlier dimension is dropped from later ones (an axis may split only one dimension).
    Mesh-independent: divisibility is checked by :func:`param_shardings`.
    """
    used: set[str] = set()
    out = []
    for name in axes:
        mesh_axes = tuple(a for a in _as_tuple(rules.get(name) if name is not None else None)
                          if a not in used)
        used.update(mesh_axes)
        out.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*out)


def _logical_axes(params) -> Any:
    """The per-leaf logical names of an ``nnx.State`` of Params (``None`` entries if unnamed)."""
    def names(var):
        axes = var.get_metadata().get("out_sharding")
        return tuple(axes) if axes else (None,) * np.ndim(var.get_value())
    return jax.tree.map(names, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_partition_specs(params, rules: Mapping[str, Any]) -> Any:
    """A tree of ``PartitionSpec`` matching ``params`` (an ``nnx.State`` of ``nnx.Param``s,
    concrete or abstract), from each Param's logical axis names (its ``out_sharding``)."""
    _check_rules(rules)
    return jax.tree.map(lambda axes: logical_to_spec(axes, rules), _logical_axes(params),
                        is_leaf=lambda x: isinstance(x, tuple))


def _fit(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Drops mesh axes from dimensions they do not divide (those dimensions replicate)."""
    out = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        kept = tuple(a for a in _as_tuple(entry))
        while kept and dim % math.prod(mesh.shape[a] for a in kept):
            kept = kept[:-1]
        out.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    return PartitionSpec(*out)


def param_shardings(params, mesh: Mesh, rules: Mapping[str, Any]) -> Any:
    """``NamedSharding`` per parameter (a tree matching the leaves of ``params``).

    A dimension that a mesh axis does not divide is replicated along that axis (e.g. 14 query
    heads on a tensor axis of 4), so any model fits any mesh.
    """
    specs = param_partition_specs(params, rules)
    shapes = jax.tree.map(lambda v: tuple(np.shape(v.get_value())), params,
                          is_leaf=lambda x: isinstance(x, nnx.Variable))
    out = jax.tree.map(lambda s, shape: NamedSharding(mesh, _fit(s, shape, mesh)), specs, shapes,
                       is_leaf=lambda x: isinstance(x, PartitionSpec))
    return match_structure(out, params)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def init_sharded(make_module: Callable[[], nnx.Module], mesh: Mesh,
                 rules: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    """Builds a module with every parameter created directly in its sharding.

    ``make_module`` (e.g. ``lambda: Transformer(cfg, rngs=nnx.Rngs(seed))``) is traced once
    abstractly (``nnx.eval_shape``) for the shapes and logical names, then run under ``jax.jit``
    with those shardings as ``out_shardings``: no device ever holds a whole unsharded weight.

    Returns:
        ``(graphdef, params, rest)`` as ``nnx.split(module, nnx.Param, ...)`` gives them, the
        params in their ``rules`` layout and the other variables replicated.
    """
    # Outside any mesh context: under one, nnx.eval_shape would read the logical names as
    # mesh axes.
    with jax.set_mesh(None):
        graphdef, params, rest = nnx.split(nnx.eval_shape(make_module), nnx.Param, ...)
    p_sh = param_shardings(params, mesh, rules)
    rest_sh = jax.tree.map(lambda _: replicated(mesh), rest)

    @functools.partial(jax.jit, out_shardings=(p_sh, rest_sh))
    def build():
        _, p, r = nnx.split(make_module(), nnx.Param, ...)
        return p, r

    return (graphdef, *build())


def reshard(tree, shardings) -> Any:
    """Moves ``tree`` on device into ``shardings`` (e.g. training layout -> rollout layout and
    back: ``reshard(params, param_shardings(params, mesh, ROLLOUT_RULES))``)."""
    return jax.device_put(tree, match_structure(shardings, tree))


def state_shardings(state, mesh: Mesh, rules: Mapping[str, Any], tx) -> Any:
    """Shardings for a :class:`~jaxgrpo.train.state.TrainState`: params (and the reference
    params) by ``rules``, every params-shaped optimiser slot like its parameter (found with
    ``optax.tree_map_params``), every other leaf (step, RNG, counters) replicated."""
    import optax  # local: keeps `import jaxgrpo.sharding` light

    p_sh = param_shardings(state.params, mesh, rules)
    rep = replicated(mesh)
    opt_sh = optax.tree_map_params(
        tx, lambda _, sh: sh, state.opt_state, p_sh,
        transform_non_params=lambda _: rep,
        is_leaf=lambda x: isinstance(x, nnx.Variable))
    opt_sh = jax.tree.map(lambda x: x.get_value() if isinstance(x, nnx.Variable) else x, opt_sh,
                          is_leaf=lambda x: isinstance(x, nnx.Variable))
    tree = state.replace(
        step=rep, params=p_sh, opt_state=opt_sh,
        ref_params=None if state.ref_params is None else p_sh,
        rng=rep, nonfinite=rep, entropy_coef=rep)
    return match_structure(tree, state)


def match_structure(shardings, like) -> Any:
    """``shardings`` (one ``Sharding`` per array of ``like``, in order, possibly sitting where
    ``like`` has an ``nnx.Variable``) rebuilt with exactly ``like``'s tree structure, as
    ``jax.jit`` and orbax want."""
    flat = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    treedef = jax.tree.structure(like)
    if len(flat) != treedef.num_leaves:
        raise ValueError(f"shardings: {len(flat)} shardings for {treedef.num_leaves} arrays")
    return jax.tree.unflatten(treedef, flat)


def abstract_like(tree, shardings) -> Any:
    """``jax.ShapeDtypeStruct`` leaves with the given shardings (a restore target for orbax,
    possibly on another mesh than the one that saved)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                        tree, match_structure(shardings, tree))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Rows (axis 0) split over ``("data", "fsdp")``; the other axes replicated."""
    if not isinstance(ndim, int) or ndim < 1:
        raise ValueError(f"ndim must be an int >= 1, got {ndim!r}")
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def shard_batch(batch, mesh: Mesh, *, group_size: int, process_local: bool = False):
    """Places a row-major batch (``[N, ...]`` leaves, rows ``p*G + g``) on ``mesh``.

    Every device gets whole groups: ``N`` must equal ``P * group_size`` with ``P`` divisible by
    ``data * fsdp``. With ``process_local=True`` each process passes only its own contiguous
    share of the rows (``N / process_count``) and the global array is assembled with
    ``jax.make_array_from_process_local_data``.
    """
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
    leaves = jax.tree.leaves(batch)
    if not leaves:
        raise ValueError("batch has no arrays")
    local_n = int(np.shape(leaves[0])[0])
    n = local_n * (jax.process_count() if process_local else 1)
    for leaf in leaves:
        if np.ndim(leaf) < 1 or np.shape(leaf)[0] != local_n:
            raise ValueError(f"batch: every leaf must have {local_n} rows, got shape "
                             f"{np.shape(leaf)}")
    if n % group_size or (n // group_size) % shards:
        raise ValueError(f"batch: N={n} rows must be P*G with G=group_size={group_size} and P "
                         f"divisible by data*fsdp={shards}, so that groups are never split "
                         "across devices; change the prompts per step or the mesh")

    def put(x):
        sh = batch_sharding(mesh, np.ndim(x))
        if process_local:
            return jax.make_array_from_process_local_data(sh, np.asarray(x), (n,) + np.shape(x)[1:])
        return jax.device_put(x, sh)

    return jax.tree.map(put, batch)


def constrain_rows(x: jax.Array) -> jax.Array:
    """Pins an activation's leading (row) axis to ``("data", "fsdp")``, the rest replicated.

    Active only under a mesh context (``jax.set_mesh(mesh)``) whose mesh has the batch axes and
    whose row count divides ``data * fsdp``; otherwise ``x`` is returned unchanged. The model
    calls it at block boundaries so that XLA keeps activations split by rows (whole sequences)
    between the weight-gathering matmuls instead of choosing another layout.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names) or np.ndim(x) < 1:
        return x
    if any(t == AxisType.Explicit for t in mesh.axis_types):
        return x  # explicit axes carry their sharding in the types already
    if np.shape(x)[0] % math.prod(mesh.shape[a] for a in BATCH_AXES):
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(BATCH_AXES,
                                                             *([None] * (np.ndim(x) - 1))))


def kv_cache_spec(batch: int, num_kv_heads: int, slots: int, mesh) -> PartitionSpec:
    """The ``PartitionSpec`` of one layer's KV cache ``[B, Hkv, S, Dh]`` on ``mesh``.

    Rows ``B`` split over ``("data", "fsdp")`` (an axis that does not divide ``B`` is dropped,
    as in :func:`param_shardings`); the KV-head axis over ``tensor`` when ``tensor`` divides
    ``Hkv`` (each device keeps the keys of its own query heads), otherwise the slot axis ``S``
    over ``tensor`` when it divides ``S`` (e.g. 2 KV heads on ``tensor=4``: the cache is not
    replicated 4 times), otherwise replicated over ``tensor``. ``Dh`` is never split.

    Args:
        batch, num_kv_heads, slots: ``B``, ``Hkv`` and ``S`` of the cache.
        mesh: a ``Mesh`` or ``AbstractMesh``; axes it lacks count as size 1.
    """
    for name, v in (("batch", batch), ("num_kv_heads", num_kv_heads), ("slots", slots)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"kv_cache_spec: {name} must be a positive int, got {v!r}")
    size = lambda a: mesh.shape[a] if a in mesh.axis_names else 1  # noqa: E731
    rows = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    while rows and batch % math.prod(size(a) for a in rows):
        rows = rows[:-1]
    row_entry = None if not rows else rows[0] if len(rows) == 1 else rows
    t = size("tensor")
    if t > 1 and num_kv_heads % t == 0:
        return PartitionSpec(row_entry, "tensor", None, None)
    if t > 1 and slots % t == 0:
        return PartitionSpec(row_entry, None, "tensor", None)
    return PartitionSpec(row_entry, None, None, None)


def constrain_kv_cache(cache):
    """Pins every ``[B, Hkv, S, Dh]`` array of a KV cache (any pytree) to
    :func:`kv_cache_spec`, under a mesh context (``jax.set_mesh``) with auto axes; otherwise
    the cache is returned unchanged."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or any(t == AxisType.Explicit for t in mesh.axis_types):
        return cache

    def pin(x):
        b, hkv, s, _ = np.shape(x)
        return jax.lax.with_sharding_constraint(x, kv_cache_spec(b, hkv, s, mesh))

    return jax.tree.map(pin, cache)


def constrain_cached_query(q: jax.Array, cache_shape: Sequence[int]) -> jax.Array:
    """Pins decode queries ``[B, T, H, Dh]`` to be replicated over ``tensor`` (rows still split)
    when the KV cache of shape ``cache_shape`` ``[B, Hkv, S, Dh]`` has its slot axis split over
    ``tensor`` (:func:`kv_cache_spec`); otherwise, or outside a mesh context with auto axes,
    ``q`` is returned unchanged.

    With the slots split, each device scores all query heads against its own slots (softmax
    statistics and the value sum are then reduced over ``tensor``, ``[B, T, H]``-sized), instead
    of gathering every layer's whole cache at every step to match query heads split over
    ``tensor``.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or any(t == AxisType.Explicit for t in mesh.axis_types):
        return q
    b, hkv, s = (int(d) for d in cache_shape[:3])
    spec = kv_cache_spec(b, hkv, s, mesh)
    if spec[2] is None or np.shape(q)[0] != b:
        return q
    return jax.lax.with_sharding_constraint(q, PartitionSpec(spec[0], None, None, None))


def local_rows(x) -> np.ndarray:
    """This process's rows of a global array whose axis 0 is split over processes in blocks.

    On one process this is the whole array. On several, the addressable shards are ordered by
    their first row and de-duplicated (replicas over ``tensor``); they must form one contiguous
    block, which holds for :func:`batch_sharding` on a mesh from :func:`make_mesh` (devices
    process-major).
    """
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    by_start = {}
    for shard in x.addressable_shards:
        by_start.setdefault(shard.index[0].start or 0, shard)
    starts = sorted(by_start)
    parts = [np.asarray(by_start[s].data) for s in starts]
    stops = [s + len(p) for s, p in zip(starts, parts, strict=True)]
    if any(a != b for a, b in zip(stops[:-1], starts[1:], strict=True)):
        raise ValueError(f"x: this process's rows {list(zip(starts, stops, strict=True))} are not "
                         "one contiguous block; build the mesh with make_mesh (process-major)")
    return np.concatenate(parts)


def allgather_rows(x: np.ndarray) -> np.ndarray:
    """Concatenates every process's host array along axis 0, in process order (one process:
    ``x`` itself). Every process must pass the same shape and dtype."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True))


def initialize_distributed(config: DistributedConfig | None = None) -> bool:
    """Joins the processes of a multi-host run (``jax.distributed.initialize``), once.

    With ``config.coordinator_address`` set, its three fields are used. Otherwise the standard
    environment decides: ``JAX_COORDINATOR_ADDRESS`` (with ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``), or a Cloud TPU pod / SLURM job that JAX detects itself
    (``TPU_WORKER_HOSTNAMES`` with more than one host, ``SLURM_JOB_ID``). With none of these it
    does nothing: a single process. Must run before anything touches a JAX device.

    Returns:
        True when this process is part of a multi-process run.
    """
    import os

    cfg = config or DistributedConfig()
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    if cfg.configured:
        jax.distributed.initialize(cfg.coordinator_address, num_processes=cfg.num_processes,
                                   process_id=cfg.process_id,
                                   initialization_timeout=cfg.initialization_timeout)
        return True
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if not env.get(k)]
        if missing:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {', '.join(missing)} is not: "
                             "set all three (or none, on a Cloud TPU pod)")
        jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=int(env["JAX_NUM_PROCESSES"]),
                                   process_id=int(env["JAX_PROCESS_ID"]),
                                   initialization_timeout=cfg.initialization_timeout)
        return True
    tpu_hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if len(tpu_hosts) > 1 or int(env.get("SLURM_NTASKS", "1")) > 1:
        # Cloud TPU pods and SLURM: JAX reads the coordinator, count and rank itself.
        jax.distributed.initialize(initialization_timeout=cfg.initialization_timeout)
        return True
    return False


def _check_rules(rules) -> None:
    if not isinstance(rules, Mapping):
        raise TypeError(f"rules must be a mapping of logical name -> mesh axis, got "
                        f"{type(rules).__name__}")
    for name, entry in rules.items():
        bad = [a for a in _as_tuple(entry) if a not in MESH_AXES]
        if bad:
            raise ValueError(f"rules[{name!r}] names unknown mesh axes {bad}; the axes are "
                             f"{MESH_AXES}")
