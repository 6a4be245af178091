"""Prompts generated per step by the ratio-preserving sampler: whole rounds vs a stream.

Usage (from the repository root):
    PYTHONPATH=$PWD python benchmarks/streamed_sampler.py [--steps 200] [--batch 32] [--out PATH]

``run_step`` (rounds of ``ceil(3B)`` prompts, each waited for in full) and ``run_step_streamed``
(prompts kept in flight per task, groups taken as they finish, the rest cancelled once the
batch is complete) build batches for the same simulated engine and the same weights. The
engine's acceptance model: a group is filtered (all-equal rewards) with a fixed per-task
probability (``--filter-rates``, one per task), drawn from the prompt's uid; in the stream each
``finished()`` returns 1 to ``--burst`` random outstanding groups. MT-GRPO gets new Dirichlet(2)
task weights every step, GRPO+RPS and DAPO uniform ones. Figures are counts per step (prompts
submitted, of which finished and cancelled; ``submit`` calls or rounds; capped steps), averaged
over ``--seeds`` sampler seeds; streamed runs are repeated per ``--min-outstanding`` (prompts;
-1 means the default ``B // 2``). Host-only NumPy: no device, no timing. Prints one JSON object
and, with ``--out``, writes it there.
"""

from __future__ import annotations

import argparse
import os
import sys
import zlib

import numpy as np

from jaxgrpo.data import PRESETS, Group, RatioPreservingSampler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _report import report  # noqa: E402

MIXED = (1.0, 0.0, 0.0, 0.0)


class Engine:
    """Rolls out prompts as groups whose filter outcome is a per-task coin keyed by the uid.

    ``generate`` returns a whole round; ``submit``/``finished``/``cancel`` are the stream.
    """

    def __init__(self, rates: dict[str, float], seed: int, burst: int):
        self.rates, self.seed, self.burst = rates, seed, burst
        self.order = np.random.default_rng([seed, 1])
        self.drawn = dict.fromkeys(rates, 0)
        self.pending: list[Group] = []

    def _group(self, task: str) -> Group:
        uid = f"{task}@{self.drawn[task]}"
        self.drawn[task] += 1
        u = np.random.default_rng([self.seed, zlib.crc32(uid.encode())]).random()
        return Group(task, uid, (1.0,) * 4 if u < self.rates[task] else MIXED)

    def generate(self, requests: dict[str, int]) -> list[Group]:
        return [self._group(t) for t, n in requests.items() for _ in range(n)]

    def submit(self, requests: dict[str, int]) -> None:
        self.pending += self.generate(requests)

    def finished(self) -> list[Group]:
        if not self.pending:
            return []
        n = int(self.order.integers(1, min(self.burst, len(self.pending)) + 1))
        picked = set(self.order.choice(len(self.pending), size=n, replace=False).tolist())
        out = [g for i, g in enumerate(self.pending) if i in picked]
        self.pending = [g for i, g in enumerate(self.pending) if i not in picked]
        return out

    def cancel(self) -> int:
        n, self.pending = len(self.pending), []
        return n


def run(preset: str, rates: dict[str, float], args, *, streamed: bool,
        min_outstanding: int | None = None) -> dict[str, float]:
    names = list(rates)
    totals = dict(submitted=0, finished=0, dropped=0, calls=0, capped=0, exact=0)
    steps = 0
    for seed in range(args.seeds):
        kw = {} if min_outstanding is None else dict(stream_min_outstanding=min_outstanding)
        rps = RatioPreservingSampler.from_preset(preset, names, args.batch, seed=seed, **kw)
        engine = Engine(rates, seed, args.burst)
        weights = np.random.default_rng([seed, 2]).dirichlet(np.full(len(names), 2.0),
                                                             size=args.steps)
        for t in range(args.steps):
            z = weights[t] if preset == "mt_grpo" else None
            res = (rps.run_step_streamed(z, engine) if streamed
                   else rps.run_step(z, engine.generate))
            totals["submitted"] += sum(sum(r.values()) for r in res.requests)
            totals["finished"] += sum(res.generated.values())
            totals["dropped"] += sum(res.dropped.values())
            totals["calls"] += res.rounds
            totals["capped"] += res.hit_cap
            totals["exact"] += res.realised_counts == res.targets
            steps += 1
    return {
        "prompts_per_step": totals["submitted"] / steps,
        "finished_per_step": totals["finished"] / steps,
        "cancelled_per_step": totals["dropped"] / steps,
        "calls_per_step": totals["calls"] / steps,
        "hit_cap_frac": totals["capped"] / steps,
        "exact_counts_frac": totals["exact"] / steps,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--burst", type=int, default=3)
    ap.add_argument("--filter-rates", type=float, nargs="+", default=[0.1, 0.5, 0.85])
    ap.add_argument("--presets", nargs="+", default=["mt_grpo", "grpo_rps", "dapo"],
                    choices=list(PRESETS))
    ap.add_argument("--min-outstanding", type=int, nargs="+", default=[0, -1])
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if not all(0.0 <= r < 1.0 for r in args.filter_rates):
        ap.error(f"--filter-rates must lie in [0, 1), got {args.filter_rates}")
    if min(args.steps, args.seeds, args.batch, args.burst) < 1:
        ap.error("--steps, --seeds, --batch and --burst must be >= 1")
    rates = {f"task{i}": r for i, r in enumerate(args.filter_rates)}
    out = {"batch": args.batch, "steps": args.steps, "seeds": args.seeds, "burst": args.burst,
           "filter_rates": rates, "presets": {}}
    for preset in args.presets:
        rounds = run(preset, rates, args, streamed=False)
        entry = {"rounds": rounds, "streamed": {}}
        for k in args.min_outstanding:
            s = run(preset, rates, args, streamed=True, min_outstanding=None if k < 0 else k)
            s["prompts_over_rounds"] = s["prompts_per_step"] / rounds["prompts_per_step"]
            entry["streamed"][f"min_outstanding={args.batch // 2 if k < 0 else k}"] = s
        out["presets"][preset] = entry
    report(out, args.out)
    return out


if __name__ == "__main__":
    main()
