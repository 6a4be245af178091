"""Memory and speed of full vs chunked token log-probs plus their gradient.

Prints one JSON object. ``memory`` holds XLA's compiled temporary-buffer size (no execution) of
``value_and_grad(sum(logprobs))`` w.r.t. hidden and unembedding, for full logits
(``token_logprobs(hidden @ W)``) and for ``chunked_token_logprobs``; ``time`` holds the measured
wall-time ratio chunked / full at a size that runs here in seconds (both timed in the same run,
median of several calls after a warm-up).

    PYTHONPATH=$PWD python benchmarks/logprobs_memory.py            # V=151,936, T=2,048, N=8, D=1,024
    PYTHONPATH=$PWD python benchmarks/logprobs_memory.py --quick    # small sizes only (CI smoke)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrpo.core.logprobs import chunked_token_logprobs, token_logprobs


def _grad_fns(chunk_size: int):
    def full(h, w, t):
        return jnp.sum(token_logprobs(jnp.einsum("ntd,dv->ntv", h, w), t))

    def chunked(h, w, t):
        return jnp.sum(chunked_token_logprobs(h, w, t, chunk_size=chunk_size))

    vg = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
    return vg(full), vg(chunked)


def measure_memory(n: int, t: int, d: int, v: int, chunk_size: int) -> dict:
    args = (
        jax.ShapeDtypeStruct((n, t, d), jnp.float32),
        jax.ShapeDtypeStruct((d, v), jnp.float32),
        jax.ShapeDtypeStruct((n, t), jnp.int32),
    )
    full, chunked = _grad_fns(chunk_size)
    temp = {}
    for name, f in (("full", full), ("chunked", chunked)):
        temp[name] = int(f.lower(*args).compile().memory_analysis().temp_size_in_bytes)
    return {
        "shape": {"N": n, "T": t, "D": d, "V": v},
        "chunk_size": chunk_size,
        "dtype": "float32",
        "temp_bytes_full": temp["full"],
        "temp_bytes_chunked": temp["chunked"],
        "full_over_chunked": temp["full"] / temp["chunked"],
        "logits_bytes": n * t * v * 4,
    }


def measure_time(n: int, t: int, d: int, v: int, chunk_size: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(n, t, d)).astype(np.float32))
    w = jnp.asarray((rng.normal(size=(d, v)) / np.sqrt(d)).astype(np.float32))
    tg = jnp.asarray(rng.integers(0, v, size=(n, t)).astype(np.int32))
    full, chunked = _grad_fns(chunk_size)
    times = {"full": [], "chunked": []}
    for f in (full, chunked):
        jax.block_until_ready(f(h, w, tg))  # compile and warm up
    for _ in range(repeats):  # interleave so load changes hit both alike
        for name, f in (("full", full), ("chunked", chunked)):
            start = time.perf_counter()
            jax.block_until_ready(f(h, w, tg))
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(x) for k, x in times.items()}
    return {
        "shape": {"N": n, "T": t, "D": d, "V": v},
        "chunk_size": chunk_size,
        "repeats": repeats,
        "median_s_full": med["full"],
        "median_s_chunked": med["chunked"],
        "chunked_over_full": med["chunked"] / med["full"],
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--quick", action="store_true", help="small sizes only (CI smoke test)")
    parser.add_argument("--chunk-size", type=int, default=None, help="logit rows (sequences x positions) per chunk")
    args = parser.parse_args(argv)
    if args.quick:
        mem = measure_memory(2, 256, 16, 4096, args.chunk_size or 64)
        tim = measure_time(2, 64, 16, 512, args.chunk_size or 32, repeats=3)
    else:
        mem = measure_memory(8, 2048, 1024, 151_936, args.chunk_size or 512)
        tim = measure_time(4, 512, 256, 16_384, args.chunk_size or 512, repeats=7)
    out = {
        "benchmark": "logprobs_memory",
        "backend": jax.default_backend(),
        "quick": bool(args.quick),
        "memory": mem,
        "time": tim,
    }
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
