"""Where one fixed-length decode step's time goes: the cached forward of one token, and the draw.

Usage (from the repository root):
    PYTHONPATH=$PWD python benchmarks/decode_step_profile.py [--batch 256 --cache 96] [--out F]

On ``ModelConfig.bench29m()`` in float32, ``--batch`` rows with a ``--cache``-slot KV cache
(prompt 32 + 64 new tokens: the side-by-side's shape), each part jitted alone and timed as the
median of ``--repeats`` calls after a warm-up:

- ``forward``: ``Transformer.forward_cached`` of one token per row and the unembedding (what
  every sampler runs per step; the cache is donated and fed back, as in a decode loop), with its model FLOPs as a fraction of the float32 matmul peak
  (2048^3, measured in the same run);
- ``draw_inverse_cdf``: jaxgrpo's draw at temperature 1 (``jaxgrpo.rollout.sampler._sample``:
  log-softmax, two-level inverse CDF, the token's log-prob);
- ``draw_categorical``: ``jax.random.categorical`` on the logits plus the log-softmax gather of
  the token's log-prob, the draw Tunix's vanilla sampler makes at ``top_p=1`` with no top-k.

Prints one JSON object; ``draw_share_*`` is each draw's share of forward plus that draw, and
``draw_only_step_ratio`` is (forward + categorical) / (forward + inverse CDF): the decode-step
speed-up the draw alone gives when both samplers' forwards cost the same.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgrpo.model import ModelConfig, Transformer
from jaxgrpo.rollout import sampler as sampler_lib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _report import report  # noqa: E402


def _median(fn, repeats):
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--cache", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    for k in ("batch", "cache", "repeats"):
        if getattr(args, k) < 1:
            raise SystemExit(f"--{k} must be >= 1, got {getattr(args, k)}")
    load_before = os.getloadavg()
    cfg = ModelConfig.bench29m()
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    b, s = args.batch, args.cache

    n = 2048
    x = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    mm = jax.jit(lambda a, c: a @ c)
    peak = 2 * n**3 / _median(lambda: mm(x, x), max(args.repeats, 5))

    @functools.partial(jax.jit, donate_argnames=("cache",))
    def forward(state, tok_B, cache, key_valid_BxS):
        m = nnx.merge(graphdef, state)
        pos = jnp.full((b, 1), s - 1, jnp.int32)
        h, cache = m.forward_cached(tok_B[:, None], pos, cache, jnp.int32(s - 1), key_valid_BxS)
        return m.logits(h[:, 0]), cache

    tok = jax.random.randint(jax.random.key(1), (b,), 2, cfg.vocab_size, jnp.int32)
    cache = jax.tree.map(lambda a: jax.random.normal(jax.random.key(2), a.shape, a.dtype),
                         model.init_cache(b, s))
    valid = jnp.ones((b, s), bool)
    box = [cache]

    def step():  # the cache is donated and fed back, as in a decode loop
        logits, box[0] = forward(state, tok, box[0], valid)
        return logits

    t_fwd = _median(step, args.repeats)
    logits = step()

    inv = jax.jit(lambda lg, k: sampler_lib._sample(lg, k, greedy=False, temperature=1.0,
                                                    top_k=0, top_p=1.0))

    @jax.jit
    def cat(lg, k):
        t = jax.random.categorical(k, lg.astype(jnp.float32))
        lp = jax.nn.log_softmax(lg.astype(jnp.float32), axis=-1)
        return t, jnp.take_along_axis(lp, t[:, None], axis=-1)[:, 0]

    key = jax.random.key(3)
    t_inv = _median(lambda: inv(logits, key), args.repeats)
    t_cat = _median(lambda: cat(logits, key), args.repeats)
    flops = (2.0 * cfg.matmul_params * b
             + 4.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * s * b)
    out = {"config": "ModelConfig.bench29m()", "params": cfg.num_params, "dtype": "float32",
           "batch": b, "cache_slots": s, "repeats": args.repeats, "f32_matmul_peak_flops": peak,
           "forward": {"seconds": t_fwd, "model_flops": flops,
                       "flops_fraction_of_peak": flops / t_fwd / peak},
           "draw_inverse_cdf_seconds": t_inv, "draw_categorical_seconds": t_cat,
           "categorical_over_inverse_cdf": t_cat / t_inv,
           "draw_share_inverse_cdf": t_inv / (t_fwd + t_inv),
           "draw_share_categorical": t_cat / (t_fwd + t_cat),
           "draw_only_step_ratio": (t_fwd + t_cat) / (t_fwd + t_inv),
           "loadavg_before_after": [load_before, os.getloadavg()], "cpu_count": os.cpu_count()}
    report(out, args.out)


if __name__ == "__main__":
    main()
