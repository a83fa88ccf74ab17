"""Common accelerators: memory a process can use and dense bf16 peak (for memory plans and MFU).

Memory is the device's capacity as CUDA reports it, in GiB; the peak is the vendor's dense
(not sparse) bf16 tensor-core figure for the SXM / flagship variant.
"""

from __future__ import annotations

from dataclasses import dataclass

from distillab.errors import ConfigError

GIB = 1 << 30


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float
    bf16_peak_flops: float

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * GIB


GPUS = {g.name: g for g in (
    GPU("a100-40gb", 39.4, 312e12),
    GPU("a100-80gb", 79.2, 312e12),
    GPU("h100-80gb", 79.1, 989e12),
    GPU("h200-141gb", 139.8, 989e12),
    GPU("b200-180gb", 178.0, 2250e12),
    GPU("l40s-48gb", 44.4, 362e12),
    GPU("rtx4090-24gb", 23.6, 165e12),
    GPU("a10-24gb", 22.1, 125e12),
    GPU("l4-24gb", 22.0, 121e12),
)}


def gpu(name: str, key: str = "--gpu") -> GPU:
    """The GPU called `name` (a ConfigError naming `key` and the known names otherwise)."""
    if name not in GPUS:
        raise ConfigError(key, f"unknown GPU {name!r}; known: {', '.join(GPUS)}")
    return GPUS[name]


def gpu_from_device_name(device_name: str) -> GPU | None:
    """The table's GPU whose family a CUDA device name (e.g. "NVIDIA H200") names, if any."""
    lowered = device_name.lower()
    if "a100" in lowered:
        return GPUS["a100-80gb" if "80" in lowered else "a100-40gb"]
    for family, name in (("h200", "h200-141gb"), ("h100", "h100-80gb"), ("b200", "b200-180gb"),
                         ("l40s", "l40s-48gb"), ("4090", "rtx4090-24gb"), ("a10", "a10-24gb"), ("l4", "l4-24gb")):
        if family in lowered:
            return GPUS[name]
    return None
