"""``jaxgrpo compile CONFIG [overrides] [--topology v5p:2x4x4] [--json FILE]``.

Compiles every program of one RL step (train step, reshard, prefill, decode, the whole sampler)
ahead of time for a TPU topology, on this machine (no TPU needed, libtpu only compiles), and
prints per-chip HBM, FLOPs, bytes, collectives, rooflines and a whole-step estimate. Exits 1
with one line naming the program when one does not fit in HBM, 2 on bad input.
"""

from __future__ import annotations

import json
import os
import sys

from jaxgrpo.train.cli_common import add_config_arguments, fail


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--topology", default=None,
                        help="TPU topology, e.g. v5p:2x4x4 (default: the config's "
                        "compile.topology)")
    parser.add_argument("--json", default=None, metavar="FILE", help="write the report as JSON")
    parser.add_argument("--programs", default=None, metavar="A,B",
                        help="compile only these (of train_step, reshard, prefill, decode, "
                        "generate, paged_round: rollout.engine=paged only; default all)")
    parser.add_argument("--layers", type=int, default=None,
                        help="compile only the first N decoder layers (quicker; figures cover "
                        "those layers)")
    parser.add_argument("--hbm-bytes", type=float, default=None,
                        help="HBM capacity per chip to check against (default: the chip's)")


def run(args) -> int:
    # Deviceless: the host's CPU runs nothing; libtpu only compiles.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # Compiling touches no chip: let libtpu load next to another process that holds its lock.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jaxgrpo.config import ConfigError, format_error, load_config, split_cli_args

    try:
        path, overrides = split_cli_args(args.config_args)
        cfg = load_config(path, overrides, check_paths=False)
    except ConfigError as e:
        print(format_error(e), file=sys.stderr)
        return 2
    topology = args.topology or cfg.compile.topology
    if not topology:
        return fail("no topology: pass --topology (e.g. v5p:2x4x4) or set compile.topology")
    from jaxgrpo.train import aot

    only = aot.PROGRAMS if args.programs is None else tuple(
        p.strip() for p in args.programs.split(",") if p.strip())
    try:
        rep = aot.run(cfg, topology, only=only, hbm_bytes=args.hbm_bytes, layers=args.layers)
    except aot.LibTPUMissing as e:
        return fail(str(e))
    except aot.CompileError as e:
        return fail(" ".join(str(e).split()))
    print(aot.format_report(rep), file=sys.stdout)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rep, f, indent=1, default=str)
    bad = aot.not_fitting(rep)
    if bad:
        cap = rep["hbm_bytes_per_chip"]

        def why(name):
            p = rep["programs"][name]
            if "error" in p:
                return f"{name} ({p['error']})"
            return f"{name} ({p['total_bytes_per_chip'] / 1e9:.2f} GB, headroom " \
                   f"{p['headroom_bytes_per_chip'] / 1e9:.2f} GB)"

        print(f"jaxgrpo: error: does not fit in {cap / 1e9:.2f} GB of HBM per chip on "
              f"{rep['topology']} (or did not compile): {'; '.join(map(why, bad))}",
              file=sys.stderr)
        return 1
    return 0
