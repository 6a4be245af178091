"""Throughput and MFU of the trainer's jitted GRPO step, against the f32 matmul peak.

Usage (from the repository root):
    PYTHONPATH=$PWD python benchmarks/train_step_throughput.py [--rows 16] [--seq 256] [--repeats 3]
        [--preset bench29m|demo] [--real-frac 1.0] [--epochs 1] [--peak-flops F]

Runs ``jaxgrpo.train.step.make_train_step`` (the code ``jaxgrpo train`` runs: forward + backward
through the chunked log-probs and the clipped loss, AdamW; the old log-probs by a separate
forward pass only when it is not the loss pass, ``StepConfig.old_logp_forward``) on the
29.4M-parameter Qwen2-shaped benchmark config (or the demo's model with the demo tokenizer's
vocabulary), and prints one JSON object with tokens/s and model FLOP utilisation against the
float32 matmul peak measured in the same run by the trainer's own
``jaxgrpo.train.loop.measure_matmul_peak`` (or against ``--peak-flops``, to compare with a run's
logged ``perf/peak_flops`` on one denominator).

``mfu`` counts model FLOPs as the trainer's ``perf/update_mfu`` does: ``2 * N_matmul`` per real
token and forward pass, ``StepConfig.forward_passes`` passes (3 per epoch). ``--real-frac``
left-pads each row so that only that fraction of its tokens is real, as a rollout batch is.
``mfu_with_attention`` adds the attention FLOPs, ``4 * L * H * Dh * T/2`` per token and pass.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxgrpo.model import ModelConfig, Transformer
from jaxgrpo.train.batch import TrainBatch
from jaxgrpo.train.loop import measure_matmul_peak
from jaxgrpo.train.state import init_train_state, split_model
from jaxgrpo.train.step import StepConfig, make_train_step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--rows", type=int, default=16, help="sequences per step (N = P*G)")
    ap.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=512, help="log-prob chunk (positions)")
    ap.add_argument("--preset", choices=["bench29m", "demo"], default="bench29m")
    ap.add_argument("--real-frac", type=float, default=1.0,
                    help="fraction of each row's tokens that are real (the rest left padding)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--peak-flops", type=float, default=None,
                    help="the MFU denominator (FLOP/s); default: measured here")
    args = ap.parse_args(argv)
    if not 0 < args.real_frac <= 1:
        raise SystemExit(f"--real-frac must be in (0, 1], got {args.real_frac}")
    if args.peak_flops is not None and not args.peak_flops > 0:
        raise SystemExit(f"--peak-flops must be positive, got {args.peak_flops}")

    if args.preset == "demo":
        import tempfile

        from jaxgrpo.model import build_demo_tokenizer

        with tempfile.TemporaryDirectory() as d:
            cfg = ModelConfig.demo(len(build_demo_tokenizer(d)))
    else:
        cfg = ModelConfig.bench29m()
    parts, params = split_model(Transformer(cfg, rngs=nnx.Rngs(0)))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-5))
    step_cfg = StepConfig(logprob_chunk=args.chunk, epochs=args.epochs)
    step = make_train_step(parts, tx, step_cfg)
    n, t = args.rows, args.seq
    rng = np.random.default_rng(0)
    s = t - 1
    pad = t - max(2, round(args.real_frac * t))  # left padding of every row
    attn = np.arange(t)[None, :] >= pad
    batch = TrainBatch(
        tokens=jnp.asarray(rng.integers(3, cfg.vocab_size, (n, t)), jnp.int32),
        attn_mask=jnp.asarray(attn).repeat(n, 0),
        loss_mask=jnp.asarray(np.arange(s)[None, :] >= max(t // 4, pad)).repeat(n, 0),
        advantages=jnp.asarray(rng.normal(size=(n,)), jnp.float32),
        old_logp=jnp.zeros((n, s), jnp.float32),
        token_weights=jnp.ones((n, s), jnp.float32),
        sequence_weights=jnp.ones((n,), jnp.float32),
        task_ids=jnp.zeros((n,), jnp.int32),
    )
    measured_peak = measure_matmul_peak()
    peak = args.peak_flops if args.peak_flops is not None else measured_peak
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
    tokens = n * (t - pad)  # real tokens, as the trainer counts them
    attn_flops = 4.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * (t / 2)
    passes = step_cfg.forward_passes
    out = {
        "config": args.preset,
        "params": cfg.num_params,
        "rows": n,
        "seq_len": t,
        "real_tokens": tokens,
        "forward_passes": passes,
        "step_s": dt,
        "tokens_per_s": tokens / dt,
        "matmul_peak_gflops": peak / 1e9,  # the MFU denominator
        "measured_matmul_peak_gflops": measured_peak / 1e9,
        "mfu": passes * 2.0 * cfg.matmul_params * tokens / dt / peak,
        "mfu_with_attention": passes * (2.0 * cfg.matmul_params + attn_flops) * tokens / dt / peak,
        "loss_finite": bool(np.isfinite(float(m["loss/total"]))),
    }
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
