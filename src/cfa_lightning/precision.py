"""Refuse a `trainer.precision` the device cannot run, before any work starts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

CUDA_ACCELERATORS = ("auto", "gpu", "cuda")  # the ones that pick a CUDA GPU when one is present


class PrecisionError(SystemExit):
    """Ends the command with one line (like a config error), not a traceback."""


def native_bf16() -> bool:
    """Whether the current CUDA device computes in bfloat16 natively (Ampere and later).

    Newer torch counts emulation as support by default; emulated bf16 matmuls are not what a
    user of bf16-mixed asks for, so emulation is not counted where torch can tell them apart.
    """
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # a torch without the argument
        return bool(torch.cuda.is_bf16_supported())


def check_precision(trainer: Mapping[str, Any]) -> None:
    """Stop when `trainer.precision` is bf16 and the run would land on a CUDA GPU without bf16."""
    precision = str(trainer.get("precision", "32-true"))
    accelerator = str(trainer.get("accelerator", "auto"))
    if not precision.startswith("bf16") or accelerator not in CUDA_ACCELERATORS:
        return
    if not torch.cuda.is_available() or native_bf16():
        return
    name = torch.cuda.get_device_name()
    raise PrecisionError(
        f"error: trainer.precision={precision}: this GPU ({name}) has no bfloat16 support "
        "(torch.cuda.is_bf16_supported() is false); use trainer.precision=16-mixed or 32-true"
    )
