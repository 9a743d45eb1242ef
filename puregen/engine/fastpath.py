"""Reduced precision and compilation of the network evaluations.

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
import warnings
from typing import Callable

import torch

from ..errors import InputError
from .provenance import cpu_features

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


class LazyCompiled:
    """`torch.compile` of a function on its first call, falling back to eager if compilation fails.

    Compilation needs a C++ compiler on CPU and Triton on GPU; a machine that
    lacks them still purifies, eagerly, and `describe()` says so.
    """

    def __init__(self, fn: Callable, *, name: str, cuda_graphs: bool = False):
        self.eager = fn
        self.name = name
        self.cuda_graphs = cuda_graphs
        self._compiled: Callable | None = None
        self.fallback_reason: str | None = None

    def __call__(self, *args):
        if self.fallback_reason is None:
            try:
                if self._compiled is None:
                    # Micro-batches have one fixed shape, so a static graph is compiled once.
                    # On a GPU, "reduce-overhead" replays the evaluation's kernels as a CUDA graph.
                    mode = "reduce-overhead" if self.cuda_graphs else None
                    self._compiled = torch.compile(self.eager, dynamic=False, fullgraph=False, mode=mode)
                out = self._compiled(*args)
                # A CUDA graph's outputs are overwritten by its next replay: the caller keeps a copy.
                return out.clone() if self.cuda_graphs else out
            except Exception as exc:  # noqa: BLE001 - any compiler failure falls back to eager
                self.fallback_reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                warnings.warn(
                    f"torch.compile of the {self.name} failed ({self.fallback_reason}); running it eagerly",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return self.eager(*args)

    @property
    def state(self) -> str:
        if self.fallback_reason is not None:
            return f"eager fallback ({self.fallback_reason})"
        return "compiled" if self._compiled is not None else "not yet compiled"
