"""Test-wide set-up: 8 simulated CPU devices, set before JAX initialises its backend.

Every test process sees 8 CPU devices, so sharding tests run anywhere. Tests that do not care
use the first device implicitly, exactly as on a one-device machine.
"""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Deviceless TPU compiles (libtpu only compiles here): pytest-xdist workers load libtpu at once,
# which its single-process lockfile would otherwise refuse.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# Keep thread pools small: pytest-xdist runs two workers on a 2-core machine.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

from tests.fake_gcs import fake_gcs  # noqa: E402,F401  (the offline gs:// fixture)


def pytest_collection_modifyitems(config, items):
    """Slow tests first (stable otherwise): pytest-xdist hands tests out in collection order, so a
    slow test collected last would run alone on one worker at the end of the suite."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
