"""`torch.compile` of the network evaluations, with an eager fallback (the `compiled` backend)."""

from __future__ import annotations

import warnings
from typing import Callable

import torch


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
