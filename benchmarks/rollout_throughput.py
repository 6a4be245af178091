"""Prefill / decode / training throughput of the policy model, as a fraction of the f32 matmul peak.

Usage (from the repository root):
    PYTHONPATH=$PWD python benchmarks/rollout_throughput.py [--batches 1 16 256] [--repeats 3]

Prints one JSON object. Every throughput is reported with its achieved model FLOP/s as a fraction
of the float32 matmul peak (2048^3 jitted matmul, median) measured in the same run, because
absolute times on a shared CPU are noisy. FLOPs per token: 2 * matmul parameters (layers plus the
unembedding) + 4 * layers * heads * head_dim * context (scores and values), context counted
causally; training (forward + backward) counts 3x the forward.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgrpo.model import ModelConfig, Transformer
from jaxgrpo.rollout import generate_functional


def _median_time(fn, repeats):
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak(repeats: int) -> float:
    n = 2048
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    t = _median_time(lambda: f(a, b).block_until_ready(), max(repeats, 5))
    return 2 * n**3 / t


def _attn_flops(cfg: ModelConfig, contexts) -> float:
    return 4.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * float(np.sum(contexts))


def bench_prefill(model, batch, prompt_len, repeats, peak):
    cfg = model.cfg
    graphdef, state = nnx.split(model)

    @jax.jit
    def prefill(state, tokens):
        m = nnx.merge(graphdef, state)
        valid = jnp.ones(tokens.shape, bool)
        pos = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32)[None], tokens.shape)
        h, cache = m.forward_cached(tokens, pos, m.init_cache(tokens.shape[0], tokens.shape[1]),
                                    jnp.int32(0), valid)
        return m.logits(h[:, -1]), cache

    tokens = jax.random.randint(jax.random.key(2), (batch, prompt_len), 0, cfg.vocab_size,
                                jnp.int32)
    t = _median_time(lambda: jax.block_until_ready(prefill(state, tokens)), repeats)
    n_tok = batch * prompt_len
    # Hidden states for every position, unembedding only for the last one.
    flops = (2.0 * (cfg.matmul_params - cfg.vocab_size * cfg.hidden_size) * n_tok
             + 2.0 * cfg.vocab_size * cfg.hidden_size * batch
             + batch * _attn_flops(cfg, np.arange(1, prompt_len + 1)))
    return {"batch": batch, "tokens_per_s": n_tok / t, "seconds": t,
            "flops_fraction_of_peak": flops / t / peak}


def bench_decode(model, batch, prompt_len, new_tokens, repeats, peak, temperature=1.0):
    cfg = model.cfg
    graphdef, state = nnx.split(model)
    tokens = np.asarray(jax.random.randint(jax.random.key(3), (batch, prompt_len), 0,
                                           cfg.vocab_size, jnp.int32))
    mask = np.ones_like(tokens, bool)
    keys = iter(jax.random.split(jax.random.key(4), repeats + 1))

    def run():
        r = generate_functional(graphdef, state, tokens, mask, next(keys), num_samples=1,
                                max_new_tokens=new_tokens, temperature=temperature,
                                buckets=(prompt_len,))
        jax.block_until_ready(r.tokens)
        assert int(r.lengths.min()) == new_tokens  # no EOS: every step runs

    t = _median_time(run, repeats)
    n_tok = batch * new_tokens
    prefill_flops = (2.0 * cfg.matmul_params * batch * prompt_len
                     + batch * _attn_flops(cfg, np.arange(1, prompt_len + 1)))
    decode_flops = (2.0 * cfg.matmul_params * n_tok
                    + batch * _attn_flops(cfg, prompt_len + np.arange(new_tokens)))
    return {"batch": batch, "prompt": prompt_len, "new_tokens": new_tokens,
            "tokens_per_s": n_tok / t, "seconds": t,
            "flops_fraction_of_peak": (prefill_flops + decode_flops) / t / peak,
            "note": "time includes the prefill; FLOPs include it too"}


def bench_train(model, batch, seq_len, repeats, peak):
    cfg = model.cfg
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, tokens):
        def loss_fn(state):
            logits = nnx.merge(graphdef, state)(tokens[:, :-1])
            logp = jax.nn.log_softmax(logits, axis=-1)
            return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

        return jax.value_and_grad(loss_fn)(state)

    tokens = jax.random.randint(jax.random.key(5), (batch, seq_len + 1), 0, cfg.vocab_size,
                                jnp.int32)
    t = _median_time(lambda: jax.block_until_ready(step(state, tokens)), repeats)
    n_tok = batch * seq_len
    flops = 3.0 * (2.0 * cfg.matmul_params * n_tok
                   + batch * _attn_flops(cfg, np.arange(1, seq_len + 1)))
    return {"batch": batch, "seq_len": seq_len, "tokens_per_s": n_tok / t, "seconds": t,
            "flops_fraction_of_peak": flops / t / peak}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 256])
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--train-batch", type=int, default=16)
    ap.add_argument("--train-seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-train", action="store_true")
    args = ap.parse_args(argv)

    cfg = ModelConfig.bench29m()
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    peak = matmul_peak(args.repeats)
    out = {"config": "ModelConfig.bench29m()", "params": cfg.num_params, "dtype": "float32",
           "devices": str(jax.devices()), "f32_matmul_peak_flops": peak,
           "prefill": [], "decode": []}
    for b in args.batches:
        out["prefill"].append(bench_prefill(model, b, args.prompt, args.repeats, peak))
        out["decode"].append(bench_decode(model, b, args.prompt, args.new_tokens, args.repeats,
                                          peak))
        print(json.dumps({"progress": b, "decode": out["decode"][-1]}), flush=True)
    if not args.skip_train:
        out["train_fwd_bwd"] = bench_train(model, args.train_batch, args.train_seq,
                                           args.repeats, peak)
    out["peak_after"] = matmul_peak(args.repeats)  # drift check on a shared machine
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
