"""Which implementation runs the fused update steps, chosen per device.

* CPU tensors: the native C++ kernels (`native`, built from `csrc/`) when the
  library is present, else the torch reference.
* CUDA tensors: the Triton kernels when triton is installed, else the reference.

`PUREGEN_KERNELS=reference|native|triton` forces one (an unavailable forced
choice is an error, not a silent fallback). The implementations draw the
same integer stream; their Gaussians differ by a few ulp where the libraries'
`log`/`cos` differ, so the choice is part of a job's configuration fingerprint.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

from . import native, reference, triton_support

IMPLEMENTATIONS = ("reference", "native", "triton")


def _forced() -> str | None:
    choice = os.environ.get("PUREGEN_KERNELS", "auto").strip().lower()
    if choice in ("", "auto"):
        return None
    if choice not in IMPLEMENTATIONS:
        raise RuntimeError(f"PUREGEN_KERNELS={choice!r}: choose auto, {', '.join(IMPLEMENTATIONS)}")
    return choice


def implementation_name(device: torch.device | str) -> str:
    """The implementation the update steps use for tensors on `device`."""
    device = torch.device(device)
    forced = _forced()
    if forced == "native":
        if device.type != "cpu" or not native.available():
            raise RuntimeError(
                f"PUREGEN_KERNELS=native: the native kernels run on CPU tensors only and need the built library "
                f"({native.unavailable_reason() or 'device ' + str(device)})"
            )
        return "native"
    if forced == "triton":
        if not triton_support.available():
            raise RuntimeError(f"PUREGEN_KERNELS=triton: {triton_support.unavailable_reason()}")
        return "triton"
    if forced == "reference":
        return "reference"
    if device.type == "cuda":
        return "triton" if triton_support.available() else "reference"
    return "native" if native.available() else "reference"


def kernels_for(device: torch.device | str) -> ModuleType:
    """The module whose `langevin_update`, `ddpm_forward_noise` and `ddpm_reverse_step` run on `device`.

    Resolve it once per purification stage, not per step: the choice reads the
    environment and probes the libraries.
    """
    name = implementation_name(device)
    if name == "triton":
        from . import triton_kernels

        return triton_kernels
    return native if name == "native" else reference


def describe() -> dict:
    """What `puregen info` reports: the choice per device and why an implementation is missing."""
    return {
        "cpu": implementation_name("cpu"),
        "cuda": implementation_name("cuda") if torch.cuda.is_available() else "no CUDA device",
        "native": "available" if native.available() else f"unavailable: {native.unavailable_reason()}",
        "triton": "available" if triton_support.available() else f"unavailable: {triton_support.unavailable_reason()}",
    }
