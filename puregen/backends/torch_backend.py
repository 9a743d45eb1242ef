"""The `torch` and `compiled` backends: the torch modules themselves, eager or under `torch.compile`."""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from .base import (DEFAULT_MICRO_BATCH, BackendEntry, NetworkBackend, gemm_rows_position_invariant,
                   memory_format_for, strides_of)
from .compiled import LazyCompiled
from .precision import autocast_for, resolve_precision


class TorchBackend(NetworkBackend):
    """The `torch` and `compiled` backends.

    Defaults are the oracle: fp32, eager, contiguous NCHW (a one-channel batch, whose NCHW and NHWC
    bytes are the same, with channels-last strides; see `memory_format_for`). `precision`
    (fp32/bf16/fp16/auto), `channels_last` and `compile` select the fast
    paths; each returns fp32 tensors in NCHW order. Parameter gradients are
    never computed: the models' parameters are frozen and only the input
    requires a gradient.
    """

    def __init__(
        self,
        ebm: nn.Module | None = None,
        unet: nn.Module | None = None,
        *,
        device: str | torch.device = "cpu",
        micro_batch: int = DEFAULT_MICRO_BATCH,
        precision: str = "fp32",
        channels_last: bool = False,
        compile: bool = False,
    ):
        device = torch.device(device)
        super().__init__(None, None, device=device, micro_batch=micro_batch,
                         precision=resolve_precision(precision, device))
        self.channels_last = channels_last
        self.backend = "compiled" if compile else "torch"
        self.ebm = self._prepare(ebm)
        self.unet = self._prepare(unet)
        if self.device.type == "cpu" and not gemm_rows_position_invariant():
            warnings.warn(
                "this process's CPU matrix products give a row other bits at other positions (MKL initialised "
                f"before puregen could select its strict mode, or MKL_CBWR={os.environ.get('MKL_CBWR')!r}): "
                "networks with Linear layers (the DDPM UNet) may then give a sample other bytes in other "
                "batches. Set MKL_CBWR=AUTO,STRICT in the environment, or import puregen before running "
                "other torch code.",
                RuntimeWarning,
                stacklevel=2,
            )
        if self.device.type == "cuda":
            # Input gradients on CUDA are reproducible only with deterministic kernels;
            # cuBLAS needs a fixed workspace for that (set before its first use).
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.benchmark = False
            torch.use_deterministic_algorithms(True, warn_only=False)
        self._energy_fn = self._maybe_compile(self._energy_eager, "EBM energy", compile)
        self._grad_fn = self._maybe_compile(self._grad_eager, "EBM input gradient", compile)
        self._eps_fn = self._maybe_compile(self._eps_eager, "UNet", compile)

    def _prepare(self, model: nn.Module | None) -> nn.Module | None:
        if model is None:
            return None
        model = model.to(self.device, torch.float32).eval()
        model.requires_grad_(False)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def _maybe_compile(self, fn, name: str, compile: bool):
        return LazyCompiled(fn, name=name, cuda_graphs=self.device.type == "cuda") if compile else fn

    def input_memory_format(self, shape) -> torch.memory_format:
        return memory_format_for(shape, self.channels_last)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        # `run_microbatched` already gives this layout; a direct caller's tensor is copied into it.
        # Not `.contiguous(memory_format=...)`: for one channel that keeps either stride pattern.
        fmt = self.input_memory_format(x.shape)
        if tuple(x.stride()) == strides_of(tuple(x.shape), fmt):
            return x
        return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt).copy_(x)

    # One fixed-shape micro-batch each: these are what `compile` traces.
    def _energy_eager(self, b: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), autocast_for(self.device, self.precision):
            return self.ebm(self._layout(b)).float()

    def _grad_eager(self, b: torch.Tensor) -> torch.Tensor:
        b = self._layout(b).detach().requires_grad_(True)
        with torch.enable_grad():
            with autocast_for(self.device, self.precision):
                energy = self.ebm(b).float().sum()
            (g,) = torch.autograd.grad(energy, b)
        return g.float().contiguous()

    def _eps_eager(self, b: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), autocast_for(self.device, self.precision):
            return self.unet(self._layout(b), timesteps).float().contiguous()

    def describe(self) -> dict:
        info = super().describe()
        if self.channels_last:
            info["channels_last"] = True
        # The networks' input layout picks the convolution kernels, so it is part of a job's fingerprint
        # (before it was fixed per shape, one-channel jobs ran either layout, whichever the input had).
        info["input_layout"] = "channels_last" if self.channels_last else "nchw; one channel as channels_last"
        return info

    def compile_state(self) -> dict:
        """Which evaluations were compiled and which fell back to eager (for the run's provenance)."""
        if self.backend != "compiled":
            return {}
        fns = (self._energy_fn, self._grad_fn, self._eps_fn)
        return {fn.name: fn.state for fn in fns if fn.state != "not yet compiled"}


def _builder(compile: bool):
    def build(ebm, unet, *, device, micro_batch, precision, channels_last=None, **_other_options) -> TorchBackend:
        # `_other_options` (threads, onnx_dir, sources) are the exported backends'. Unless asked, the
        # compiled backend runs NHWC and the eager one the oracle's NCHW.
        return TorchBackend(ebm, unet, device=device, micro_batch=micro_batch, precision=precision,
                            channels_last=compile if channels_last is None else channels_last, compile=compile)

    return build


TORCH = BackendEntry("torch", build=_builder(compile=False), precision_for=resolve_precision,
                     availability=lambda: "available (eager; in fp32 the reference)")
COMPILED = BackendEntry(
    "compiled", build=_builder(compile=True), precision_for=resolve_precision,
    availability=lambda: "available (torch.compile of the network evaluations, eager fallback if compilation fails)",
)
