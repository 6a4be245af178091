"""Compiled temporary memory of a decoder's loss+gradient: plain vs chunked attention, remat.

Prints one JSON object. For each sequence length ``T`` and each variant (``plain``,
``chunked``, ``chunked`` + ``remat=block``, and ``splash`` / ``splash`` + ``remat=block`` with
``--tpu``) it compiles ``value_and_grad`` of ``mean(hidden^2)`` w.r.t. every parameter of a
``Transformer`` on ``[rows, T]`` tokens with left padding and reports XLA's
``memory_analysis().temp_size_in_bytes`` (compile only, nothing runs, no timing). With ``--tpu``
the compile targets a ``v5p:2x2x2`` topology (8 chips, mesh ``data=1, fsdp=2, tensor=4``,
parameters in the training layout, rows over ``data x fsdp``) and the figures are per chip.

    PYTHONPATH=$PWD python benchmarks/attention_memory.py               # CPU, T = 1024, 2048
    PYTHONPATH=$PWD python benchmarks/attention_memory.py --tpu         # v5p:2x2x2, per chip
    PYTHONPATH=$PWD python benchmarks/attention_memory.py --quick       # small sizes (smoke)
"""

from __future__ import annotations

import argparse
import contextlib
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgrpo.model import ModelConfig, Transformer


def grad_temp_bytes(cfg: ModelConfig, rows: int, t: int, *, mesh=None, device=None) -> int:
    """``temp_size_in_bytes`` of the compiled loss+grad of ``Transformer(cfg)`` on ``[rows, t]``."""
    with contextlib.ExitStack() as stack:
        if mesh is not None:
            from jaxgrpo.sharding import TRAIN_RULES, batch_sharding, param_shardings

            abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
            graphdef, params = nnx.split(abstract)
            shardings = param_shardings(params, mesh, TRAIN_RULES)
            params = jax.tree.map(
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params,
                shardings)
            row_sharding = batch_sharding(mesh, 2)
            stack.enter_context(jax.set_mesh(mesh))
            stack.enter_context(jax.default_device(device))
        else:
            abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
            graphdef, params = nnx.split(abstract)
            row_sharding = None
        tokens = jax.ShapeDtypeStruct((rows, t), jnp.int32, sharding=row_sharding)
        mask = jax.ShapeDtypeStruct((rows, t), jnp.bool_, sharding=row_sharding)

        def loss(p, tok, m):
            hidden = nnx.merge(graphdef, p)(tok, mask=m, return_hidden=True)
            return jnp.mean(jnp.square(hidden.astype(jnp.float32)))

        compiled = jax.jit(jax.value_and_grad(loss)).lower(params, tokens, mask).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--quick", action="store_true", help="small sizes only")
    parser.add_argument("--tpu", action="store_true", help="compile for v5p:2x2x2 (per chip)")
    args = parser.parse_args()
    if args.quick:
        shape = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=16)
        rows, lengths, block = 2, (256, 512), 128
    else:
        shape = dict(vocab_size=1024, hidden_size=1024, intermediate_size=2816, num_layers=4,
                     num_heads=16, num_kv_heads=8, head_dim=128)
        rows, lengths, block = 8, (1024, 2048), 512
    mesh = device = None
    variants = [("plain", "none"), ("chunked", "none"), ("chunked", "block")]
    dtype = "float32"
    if args.tpu:
        from jax.experimental import topologies

        topo = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x2")
        mesh = jax.sharding.Mesh(np.array(topo.devices).reshape(1, 2, 4),
                                 ("data", "fsdp", "tensor"))
        device = topo.devices[0]
        variants += [("splash", "none"), ("splash", "block")]
        dtype = "bfloat16"
    results = []
    for t in lengths:
        row = {"T": t}
        for attention, remat in variants:
            cfg = ModelConfig(**shape, dtype=dtype, param_dtype=dtype, attention=attention,
                              attention_block=block, remat=remat)
            name = attention if remat == "none" else f"{attention}+remat_{remat}"
            row[name] = grad_temp_bytes(cfg, rows, t, mesh=mesh, device=device)
        results.append(row)
    first, last = results[0], results[-1]
    growth = {k: last[k] / first[k] for k in first if k != "T"}
    print(json.dumps({
        "what": "memory_analysis().temp_size_in_bytes of value_and_grad(mean(hidden^2))",
        "target": "v5p:2x2x2 per chip, mesh (1, 2, 4)" if args.tpu else "cpu, one device",
        "model": shape, "rows": rows, "dtype": dtype, "attention_block": block,
        "temp_bytes": results,
        f"growth_T{first['T']}_to_T{last['T']}": growth,
        "plain_over_chunked": {r["T"]: r["plain"] / r["chunked"] for r in results},
    }, indent=1))


if __name__ == "__main__":
    main()
