"""Accelerator chip table: bf16 peak FLOP/s, HBM capacity and HBM bandwidth per TPU chip.

Used by ``jaxgrpo compile`` (memory check and roofline) and by the trainer's ``perf/mfu``
(the denominator on a TPU). Plain Python, no jax import.

Sources. Every figure is the per-TensorCore value in the installed jax's
``jax/_src/pallas/mosaic/tpu_info.py`` (``_get_tpu_info_impl``; jax 0.10.2) multiplied by the
chip's physical TensorCores (``num_physical_tensor_cores_per_chip``: 2 on v4 and v5p, 1 on v5e
and v6e), i.e. the undivided chip totals written there. The vendor's per-chip datasheet figures
quoted in docs/tpu.md (v5e 16 GB and 197 TFLOP/s, v5p 95 GB, 459 TFLOP/s and 2.76 TB/s, v6e
32 GB and 918 TFLOP/s) agree to rounding, except the v5p HBM bandwidth (tpu_info 2.46e12 B/s:
the table keeps it, the more conservative); the datasheets' "GB" of capacity are GiB (v5p:
95 GiB = 103e9 bytes, as in tpu_info).

Devices versus chips. On v4 and v5p JAX normally runs a chip's two TensorCores as one
"megacore" device (``device.num_cores == 2``); a topology may also expose one device per
TensorCore (``num_cores == 1``). :func:`per_device` divides the chip figures by the TensorCores
per chip and multiplies by the device's ``num_cores``, as tpu_info documents.
"""

from __future__ import annotations

import dataclasses

__all__ = ["CHIPS", "Chip", "chip_for_device_kind", "per_device", "peak_flops_for"]

_SOURCE = "jax/_src/pallas/mosaic/tpu_info.py (jax 0.10.2), per-TensorCore x TensorCores per chip"


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation, per chip.

    Attributes:
        name: short name (``v4``, ``v5e``, ``v5p``, ``v6e``).
        device_kinds: ``jax.Device.device_kind`` strings of this chip.
        bf16_flops: peak dense bf16 matmul FLOP/s per chip.
        hbm_bytes: HBM capacity per chip, bytes.
        hbm_bandwidth: HBM bandwidth per chip, bytes/s.
        tensor_cores: physical TensorCores per chip.
        source: where the figures come from.
    """

    name: str
    device_kinds: tuple[str, ...]
    bf16_flops: float
    hbm_bytes: int
    hbm_bandwidth: float
    tensor_cores: int
    source: str = _SOURCE


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", ("TPU v4",), 2.75e14, 34_400_000_000, 1.23e12, 2),
    "v5e": Chip("v5e", ("TPU v5e", "TPU v5 lite"), 1.97e14, 17_200_000_000, 8.20e11, 1),
    "v5p": Chip("v5p", ("TPU v5", "TPU v5p"), 4.59e14, 103_000_000_000, 2.46e12, 2),
    "v6e": Chip("v6e", ("TPU v6e", "TPU v6 lite"), 9.20e14, 34_400_000_000, 1.64e12, 1),
}


def chip_for_device_kind(device_kind: str) -> Chip | None:
    """The :class:`Chip` whose ``device_kinds`` holds ``device_kind`` (None: not a known TPU)."""
    for chip in CHIPS.values():
        if device_kind in chip.device_kinds:
            return chip
    return None


def per_device(chip: Chip, num_cores: int | None) -> dict[str, float]:
    """``{"bf16_flops", "hbm_bytes", "hbm_bandwidth"}`` of one JAX device of ``chip``.

    A device spans ``num_cores`` TensorCores (``jax.Device.num_cores``; None: the whole chip),
    so each figure is ``chip figure * num_cores / chip.tensor_cores``.
    """
    share = 1.0 if num_cores is None else min(int(num_cores), chip.tensor_cores) / chip.tensor_cores
    return {"bf16_flops": chip.bf16_flops * share, "hbm_bytes": int(chip.hbm_bytes * share),
            "hbm_bandwidth": chip.hbm_bandwidth * share}


def peak_flops_for(device_kind: str, num_cores: int | None, compute_dtype: str) -> \
        tuple[float, str] | None:
    """``(peak FLOP/s of one device, source)`` for a TPU computing in ``compute_dtype``.

    bf16 uses the table's bf16 peak. float32 matmuls on the TPU MXU run as several bf16 passes
    (XLA's default precision uses one pass, ``HIGHEST`` six); the table has no float32 figure,
    so float32 also reports the bf16 peak and says so in the source. None for devices not in the
    table (e.g. CPUs): the caller measures instead.
    """
    chip = chip_for_device_kind(device_kind)
    if chip is None:
        return None
    peak = per_device(chip, num_cores)["bf16_flops"]
    note = "bf16 peak" if compute_dtype == "bfloat16" else (
        f"bf16 peak (no {compute_dtype} figure in the table)")
    return peak, f"{chip.name} {note}, {chip.source}"
