"""Forward + backward of the SwiGLU MLP's fused gate/up projection, three ways, on XLA:CPU.

Usage (from the repository root):
    PYTHONPATH=$PWD python benchmarks/mlp_backward.py [--tokens 4096] [--repeats 5] [--out FILE]

The decoder stores gate and up fused as ``gate_up_weight [D, 2, F]``. The MLP's projection can
be written as the 4-d einsum ``btd,dcf->btcf`` (the transformer's form), as one 2-d matmul
against the weight reshaped to ``[D, 2F]`` (the same bytes), or as two ``[D, F]`` matmuls.
For the ``bench29m`` shapes (D 512, F 1536) this times each form's forward + backward of
``sum(silu(gate) * up @ down)`` (median over ``repeats``), counts the compiled program's
``transpose`` and ``copy`` ops (layout changes XLA inserts), and prints one JSON object with
the times relative to the 4-d einsum.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _report import report  # noqa: E402

D, F = 512, 1536


def einsum4(y, w, down):
    gu = jnp.einsum("btd,dcf->btcf", y, w)
    return jnp.einsum("btf,fd->btd", jax.nn.silu(gu[:, :, 0]) * gu[:, :, 1], down)


def matmul2d(y, w, down):
    b, t, d = y.shape
    gu = (y.reshape(b * t, d) @ w.reshape(d, 2 * F)).reshape(b, t, 2, F)
    return jnp.einsum("btf,fd->btd", jax.nn.silu(gu[:, :, 0]) * gu[:, :, 1], down)


def two_matmuls(y, w, down):
    g = jnp.einsum("btd,df->btf", y, w[:, 0])
    u = jnp.einsum("btd,df->btf", y, w[:, 1])
    return jnp.einsum("btf,fd->btd", jax.nn.silu(g) * u, down)


FORMS = {"einsum_4d": einsum4, "matmul_2d": matmul2d, "two_matmuls": two_matmuls}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--tokens", type=int, default=4096, help="rows x sequence length")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    k = jax.random.split(jax.random.key(0), 3)
    y = jax.random.normal(k[0], (args.tokens // 256, 256, D), jnp.float32)
    w = 0.02 * jax.random.normal(k[1], (D, 2, F), jnp.float32)
    down = 0.02 * jax.random.normal(k[2], (F, D), jnp.float32)
    out = {"tokens": args.tokens, "D": D, "F": F, "forms": {}}
    ref = None
    for name, fn in FORMS.items():
        loss = lambda y, w, down, fn=fn: jnp.sum(fn(y, w, down) ** 2)
        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        text = step.lower(y, w, down).compile().as_text()
        val = jax.block_until_ready(step(y, w, down))
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(step(y, w, down))
            times.append(time.perf_counter() - t0)
        if ref is None:
            ref = val
        grads_match = all(bool(jnp.allclose(a, b, rtol=1e-4, atol=1e-5))
                          for a, b in zip(jax.tree.leaves(val), jax.tree.leaves(ref), strict=True))
        out["forms"][name] = {
            "fwd_bwd_s": statistics.median(times),
            "transposes": len(re.findall(r"\btranspose\(", text)),
            "copies": len(re.findall(r"\bcopy\(", text)),
            "same_value_and_grads": grads_match,
        }
    base = out["forms"]["einsum_4d"]["fwd_bwd_s"]
    for v in out["forms"].values():
        v["time_vs_einsum_4d"] = v["fwd_bwd_s"] / base
    report(out, args.out)


if __name__ == "__main__":
    main()
