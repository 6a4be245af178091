"""Per-record cost of a shuffled epoch: grain's lazy ``MapDataset.shuffle`` vs a cached permutation.

Usage (from the repository root):
    PYTHONPATH=$PWD python benchmarks/grain_shuffle.py [--sizes 10 20 1000 10000] [--out PATH]

For each source size n, reads one full epoch (n records, by position) two ways: grain
``MapDataset.source(range(n)).shuffle(seed)[i]`` for ``i`` in ``[e*n, (e+1)*n)`` (epoch ``e``)
(built once, untimed; grain computes each position's index lazily) and what
``jaxgrpo.data.TaskSampler`` does, ``np.random.default_rng(seed).permutation(n)`` once per
epoch (timed) then an array lookup per record. Both timed in the same run (median of 3 epochs after
a warm-up); the ratio is the figure to read on a shared machine. Prints one JSON object and,
with ``--out``, writes it there.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import grain
import numpy as np


def _per_record(read_epoch, n: int, repeats: int = 3) -> float:
    read_epoch(0)
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        read_epoch(r + 1)
        times.append((time.perf_counter() - t0) / n)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 20, 1000, 10000])
    ap.add_argument("--out", type=pathlib.Path)
    args = ap.parse_args(argv)
    out = {"grain": grain.__version__ if hasattr(grain, "__version__") else "?", "sizes": []}
    for n in args.sizes:
        # Built once, outside the timing: epoch e is positions [e*n, (e+1)*n), which grain
        # shuffles afresh for every epoch.
        ds = grain.MapDataset.source(list(range(n))).shuffle(seed=0)

        def grain_epoch(epoch, n=n, ds=ds):
            return [ds[i] for i in range(epoch * n, (epoch + 1) * n)]

        def cached_epoch(epoch, n=n):
            perm = np.random.default_rng(epoch).permutation(n)
            return [int(perm[i]) for i in range(n)]

        assert sorted(grain_epoch(0)) == list(range(n)) == sorted(cached_epoch(0))
        g, c = _per_record(grain_epoch, n), _per_record(cached_epoch, n)
        out["sizes"].append({"n": n, "grain_seconds_per_record": g,
                             "cached_permutation_seconds_per_record": c, "grain_over_cached": g / c})
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
