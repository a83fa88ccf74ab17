"""Process-wide settings for fast, deterministic training, and the device a run computes on."""

from __future__ import annotations

import contextlib
import os

import torch

from distillab.errors import ConfigError


def setup_runtime(threads: int | None = None) -> None:
    # Denormal weights slow CPU steps ~4.8x on these machines; flushing them is harmless.
    torch.set_flush_denormal(True)
    if threads is None:
        threads = int(os.environ.get("DISTILLAB_THREADS", 0)) or (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    quiet_transformers()


def quiet_transformers() -> None:
    """transformers' own progress bars and advice clutter training logs."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """`auto` -> cuda when available, else cpu; a CUDA device without CUDA is a ConfigError naming `key`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(key, f"must be auto, cpu or cuda[:N], got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(key, f"{name} requested but no CUDA device is available; use cpu or auto")
    return device


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a shard of a distributed tensor (FSDP2 parameters and their state)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def autocast(device: torch.device, precision: str):
    """bf16 autocast on GPUs when asked; plain fp32 otherwise (bf16 is slower on these CPUs)."""
    if precision == "bfloat16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
