"""Throughput and MFU of the trainer's jitted GRPO step, against the f32 matmul peak.

Usage (from the repository root):
    PYTHONPATH=$PWD python benchmarks/train_step_throughput.py [--rows 16] [--seq 256] [--repeats 3]

Runs ``jaxgrpo.train.step.make_train_step`` (the code ``jaxgrpo train`` runs: old log-probs
recomputed by a forward pass, then forward + backward through the chunked log-probs and the
clipped loss, AdamW) on the 29.4M-parameter benchmark config, and prints one JSON object with
tokens/s and model FLOP utilisation as a fraction of the float32 matmul peak measured in the
same run. Model FLOPs per trained token: 6 * N_matmul + 12 * L * H * Dh * T/2 (fwd + bwd), plus
2 * N_matmul + 4 * L * H * Dh * T/2 for the old-log-prob forward ("mfu_with_old_logp").
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxgrpo.model import ModelConfig, Transformer
from jaxgrpo.train.batch import TrainBatch
from jaxgrpo.train.state import init_train_state, split_model
from jaxgrpo.train.step import StepConfig, make_train_step

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from rollout_throughput import matmul_peak  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--rows", type=int, default=16, help="sequences per step (N = P*G)")
    ap.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=512, help="log-prob chunk (positions)")
    args = ap.parse_args(argv)

    cfg = ModelConfig.bench29m()
    parts, params = split_model(Transformer(cfg, rngs=nnx.Rngs(0)))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-5))
    step = make_train_step(parts, tx, StepConfig(logprob_chunk=args.chunk))
    n, t = args.rows, args.seq
    rng = np.random.default_rng(0)
    s = t - 1
    batch = TrainBatch(
        tokens=jnp.asarray(rng.integers(3, cfg.vocab_size, (n, t)), jnp.int32),
        attn_mask=jnp.ones((n, t), bool),
        loss_mask=jnp.asarray(np.arange(s)[None, :] >= t // 4).repeat(n, 0),
        advantages=jnp.asarray(rng.normal(size=(n,)), jnp.float32),
        old_logp=jnp.zeros((n, s), jnp.float32),
        token_weights=jnp.ones((n, s), jnp.float32),
        sequence_weights=jnp.ones((n,), jnp.float32),
        task_ids=jnp.zeros((n,), jnp.int32),
    )
    peak = matmul_peak(args.repeats)
    state = init_train_state(params, tx, 0, with_ref=False)
    state, m = step(state, batch)  # compile
    jax.block_until_ready(m)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    tokens = n * (t - 1)
    attn = 4.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * (t / 2)
    fwd = 2.0 * cfg.matmul_params + attn
    out = {
        "config": "bench29m",
        "params": cfg.num_params,
        "rows": n,
        "seq_len": t,
        "step_s": dt,
        "tokens_per_s": tokens / dt,
        "matmul_peak_gflops": peak / 1e9,
        "mfu": 3 * fwd * tokens / dt / peak,
        "mfu_with_old_logp": 4 * fwd * tokens / dt / peak,
        "loss_finite": bool(np.isfinite(float(m["loss/total"]))),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
