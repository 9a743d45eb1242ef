"""Reduced precision of the network evaluations (the `torch` and `compiled` backends).

The image state stays fp32 in the purifiers; only the networks run in bf16 or
fp16 (under autocast, so normalisations and softmax keep fp32 statistics) and
the `1/temp` factor is applied to the fp32 gradient by the update step.

`auto` means bf16 where the hardware computes it natively (CPUs with
AVX512-BF16 or AMX, CUDA devices that support it) and fp32 elsewhere:
`benchmarks/quality.py` checks, with the shipped models, that bf16 meets the
quality bound (mean difference <= 1 level, >= 99% of pixels within 2 levels
of the fp32 oracle's uint8 output).
"""

from __future__ import annotations

import contextlib

import torch

from ..engine.provenance import cpu_features
from ..errors import InputError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_native_bf16() -> bool:
    flags = set(cpu_features()["flags"])
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_precision(precision: str, device: torch.device) -> str:
    """The concrete precision ('fp32', 'bf16' or 'fp16') for a requested one on `device`."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if precision not in DTYPES:
        raise InputError(f"unknown precision {precision!r}; choose one of fp32, bf16, fp16, auto")
    if precision == "fp16" and device.type != "cuda":
        raise InputError("precision fp16 needs a CUDA device (CPUs have no fast fp16 convolutions); use bf16 or fp32")
    return precision


def autocast_for(device: torch.device, precision: str):
    """Autocast to the network precision, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])
