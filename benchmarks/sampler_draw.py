"""Cost of one sampling draw per row: the sampler's two-level inverse CDF vs Gumbel-max.

Usage (from the repository root):
    PYTHONPATH=$PWD python benchmarks/sampler_draw.py [--vocab 8192] [--rows 16 256] [--out PATH]

Both methods draw from the same filtered distribution (top-k 50 of random logits, so most
tokens have probability 0): ``inverse_cdf`` is ``jaxgrpo.rollout.sampler._inverse_cdf`` (what the
decode loop uses), ``categorical`` is ``jax.random.categorical`` on the filtered log-probs. Each
is timed as 20 draws inside one jitted ``fori_loop`` (median of 5 calls after a warm-up; each
draw's log-probs are shifted by a constant so that no work is hoisted out of the loop), in the
same run, so the ratio is the figure to read on a shared machine. Prints one JSON object and,
with ``--out``, writes it there.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp

from jaxgrpo.rollout import sampler

DRAWS = 20


def _time_per_draw(draw, logp, repeats: int) -> float:
    n = logp.shape[0]
    loop = jax.jit(lambda lp, key: jax.lax.fori_loop(
        0, DRAWS, lambda i, acc: acc + draw(lp + 1e-6 * i, jax.random.fold_in(key, i)),
        jnp.zeros((n,), jnp.int32)))
    loop(logp, jax.random.key(0)).block_until_ready()
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        loop(logp, jax.random.key(r + 1)).block_until_ready()
        times.append((time.perf_counter() - t0) / DRAWS)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--rows", type=int, nargs="+", default=[16, 256])
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=pathlib.Path)
    args = ap.parse_args(argv)
    methods = {
        "inverse_cdf": lambda lp, key: sampler._inverse_cdf(jnp.exp(lp), key),
        "categorical": lambda lp, key: jax.random.categorical(key, lp, axis=-1).astype(jnp.int32),
    }
    out = {"devices": str(jax.devices()), "vocab": args.vocab, "top_k": args.top_k,
           "draws_per_call": DRAWS, "rows": []}
    for n in args.rows:
        logits = 3.0 * jax.random.normal(jax.random.key(n), (n, args.vocab), jnp.float32)
        logp = sampler._filtered_logprobs(logits, temperature=1.0, top_k=args.top_k, top_p=1.0)
        sec = {name: _time_per_draw(f, logp, args.repeats) for name, f in methods.items()}
        out["rows"].append({"rows": n, "seconds_per_draw": sec,
                            "categorical_over_inverse_cdf": sec["categorical"] / sec["inverse_cdf"]})
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
