"""The network backends: how the purifiers' EBM and UNet are evaluated, behind one interface and one registry.

* `base`: the interface (`NetworkBackend`), the fixed-shape micro-batching
  and input layouts every backend shares, the registry's `BackendEntry`, and
  MKL's strict mode (set on import, before torch's first matrix product);
* `torch_backend`: `torch` (eager; in fp32 the oracle) and `compiled`
  (`torch.compile`), with `precision` (autocast) and `compiled` (the lazy
  compilation with its eager fallback);
* `exported`: what the backends that run exported ONNX graphs share;
* `onnxruntime_graphs`: `onnxruntime`; `tensorrt_runtime`: `tensorrt`
  (experimental). Their optional packages are imported only when such a
  backend is made.

The graphs and engines themselves come from `puregen.export`, which knows
nothing of the backends. How to add a backend: `README.md` in this folder.
"""

from __future__ import annotations

# `base` first: it sets MKL_CBWR, which must happen before torch's first matrix product.
from .base import DEFAULT_MICRO_BATCH, BackendEntry, NetworkBackend

import torch

from ..errors import InputError
from .onnxruntime_graphs import ONNXRUNTIME
from .tensorrt_runtime import TENSORRT
from .torch_backend import COMPILED, TORCH

# The registry: every backend, in the order `--backend` lists them. A new backend is one entry here.
REGISTRY: dict[str, BackendEntry] = {entry.name: entry for entry in (TORCH, COMPILED, ONNXRUNTIME, TENSORRT)}

BACKENDS = tuple(REGISTRY)
PRECISIONS = ("fp32", "bf16", "fp16", "auto")

__all__ = ["BACKENDS", "DEFAULT_MICRO_BATCH", "PRECISIONS", "REGISTRY", "BackendEntry", "NetworkBackend",
           "availability", "build_backend", "check_backend"]


def check_backend(backend: str, precision: str, device: torch.device | str = "cpu") -> str:
    """Validate the backend/precision pair; returns the precision actually used on `device`."""
    if backend not in REGISTRY:
        raise InputError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return REGISTRY[backend].precision_for(precision, torch.device(device))


def build_backend(
    name: str,
    ebm,
    unet,
    *,
    device: torch.device | str,
    micro_batch: int = DEFAULT_MICRO_BATCH,
    precision: str = "fp32",
    channels_last: bool | None = None,
    threads: int | None = None,
    onnx_dir=None,
    sources: dict | None = None,
) -> NetworkBackend:
    """The backend `name` over the torch modules `ebm` / `unet` (either may be None).

    `precision` is checked (and `auto` resolved) as `check_backend` does.
    `channels_last` (None: the backend's default), `threads`, `onnx_dir` and
    `sources` (the checkpoints the networks came from, for the exports'
    sidecars) are the options some backends take; the others ignore them.
    """
    device = torch.device(device)
    precision = check_backend(name, precision, device)
    return REGISTRY[name].build(ebm, unet, device=device, micro_batch=micro_batch, precision=precision,
                                channels_last=channels_last, threads=threads, onnx_dir=onnx_dir, sources=sources)


def availability() -> dict[str, str]:
    """Each backend's line in `puregen info`: available, or why not."""
    return {name: entry.availability() for name, entry in REGISTRY.items()}
