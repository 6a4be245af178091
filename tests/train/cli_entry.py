"""``python cli_entry.py ARGS...``: the real ``jaxgrpo`` command line (``jaxgrpo.cli.main``) with
a stand-in verifier, for subprocess tests that need a learning signal from an untrained model.

The stand-in rewards a completion by a hash of its text (deterministic, so an interrupted and
resumed run sees the same rewards as an uninterrupted one) and marks about a third correct.
``JAXGRPO_TEST_CPU_DEVICES=N`` sets the number of simulated CPU devices of this process.
"""

import os
import pathlib
import sys
import zlib

n = os.environ.get("JAXGRPO_TEST_CPU_DEVICES")
if n:
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))


def _hash_score_many(task, records, completions, **kw):
    from jaxgrpo.tasks import Score

    out = []
    for text in completions:
        ok = zlib.crc32(text.encode()) % 3 == 0
        out.append(Score(reward=float(ok), correct=ok, format_ok=True, error=None))
    return out


if __name__ == "__main__":
    from jaxgrpo import cli
    from jaxgrpo.train import loop

    loop.score_many = _hash_score_many
    code = cli.main(sys.argv[1:])
    import jax

    if jax.distributed.is_initialized():
        jax.distributed.shutdown()
    sys.exit(code)
