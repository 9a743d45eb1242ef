"""Network evaluation for the purifiers: the interface every backend supplies, and the `torch` and `compiled` backends.

(`onnxruntime` and `tensorrt` are in `puregen.export`.)

The `torch` backend in fp32 is the oracle. Faster modes change only how the
networks are evaluated: bf16/fp16 autocast, channels_last memory layout, and
`torch.compile` of the evaluation (backend `compiled`). The image state and
the update steps stay fp32 whatever the mode.

Convolution libraries choose algorithms by batch shape, so the same image can
get a slightly different gradient in a batch of 1 than in a batch of 64. To
make a sample's result independent of how a job is cut, every network call
runs on micro-batches of ONE fixed shape; the last one is padded with copies
of its final row and the padding is dropped.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..kernels.dispatch import implementation_name
from .fastpath import LazyCompiled, autocast_for, resolve_precision

BACKENDS = ("torch", "compiled", "onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "bf16", "fp16", "auto")
DEFAULT_MICRO_BATCH = 16


def run_microbatched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, micro_batch: int) -> torch.Tensor:
    """Apply `fn` to fixed-shape slices of `x` along the batch axis and concatenate."""
    outs = []
    for start in range(0, x.shape[0], micro_batch):
        part = x[start : start + micro_batch]
        n = part.shape[0]
        if n < micro_batch:
            pad = part[-1:].expand(micro_batch - n, *part.shape[1:])
            part = torch.cat([part, pad], dim=0)
        outs.append(fn(part.contiguous())[:n])
    return torch.cat(outs, dim=0)


def check_backend(backend: str, precision: str, device: torch.device | str = "cpu") -> str:
    """Validate the backend/precision pair; returns the precision actually used on `device`."""
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    device = torch.device(device)
    if backend == "onnxruntime":
        # The exported graphs are fp32; reduced precision is the compiled or TensorRT backend's job.
        if precision not in ("fp32", "auto"):
            raise InputError(
                f"backend onnxruntime runs the fp32 graphs; precision {precision!r} is for --backend compiled "
                "(bf16 on CPU and GPU) or tensorrt (fp16/bf16 on GPU)"
            )
        return "fp32"
    if backend == "tensorrt":
        if device.type != "cuda":
            raise InputError("backend tensorrt needs --device cuda (TensorRT runs on NVIDIA GPUs only)")
        return "fp16" if precision == "auto" else precision
    return resolve_precision(precision, device)


class Evaluator:
    """What a backend supplies to the purifiers: the EBM energy, its input gradient and the UNet's epsilon.

    Subclasses set `_energy_fn`, `_grad_fn` (one fixed-shape micro-batch in,
    fp32 out) and `_eps_fn` (micro-batch and timesteps in); this class cuts
    the work into those micro-batches and pads images the UNet cannot take.
    `ebm` and `unet` are the torch modules the backend evaluates (or was built
    from): the purifiers read their configurations.
    """

    backend = "abstract"

    def __init__(self, ebm, unet, *, device, micro_batch: int, precision: str):
        if micro_batch < 1:
            raise InputError(f"micro-batch must be >= 1, got {micro_batch}")
        self.device = torch.device(device)
        self.micro_batch = micro_batch
        self.precision = precision
        self.ebm, self.unet = ebm, unet

    def _need(self, model: nn.Module | None, what: str) -> nn.Module:
        if model is None:
            raise RuntimeError(f"this purifier has no {what} model")
        return model

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        self._need(self.ebm, "EBM")
        return run_microbatched(self._energy_fn, x, self.micro_batch)

    def energy_grad(self, x: torch.Tensor) -> torch.Tensor:
        """grad_x G(x), without the 1/temp factor (the update applies it in fp32)."""
        self._need(self.ebm, "EBM")
        return run_microbatched(self._grad_fn, x, self.micro_batch)

    def epsilon(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """The UNet's noise prediction at timestep t, reflect-padding sides the UNet cannot take."""
        unet = self._need(self.unet, "DDPM")
        multiple = unet.pad_multiple
        h, w = x.shape[-2:]
        ph, pw = (-h) % multiple, (-w) % multiple
        if ph or pw:
            if ph >= h or pw >= w:
                raise InputError(f"images of {h}x{w} are too small for this UNet (sides must reach {multiple})")
            x = F.pad(x, (0, pw, 0, ph), mode="reflect")
        # The timestep is a tensor input, so one compiled graph serves every t.
        timesteps = torch.full((self.micro_batch,), t, dtype=torch.int64, device=x.device)
        out = run_microbatched(lambda b: self._eps_fn(b, timesteps), x, self.micro_batch)
        return out[..., :h, :w]

    def describe(self) -> dict:
        return {
            "backend": self.backend,
            "precision": self.precision,
            "micro_batch": self.micro_batch,
            "device": str(self.device),
            # The update kernels' Gaussians differ by a few ulp between implementations.
            "kernels": implementation_name(self.device),
        }

    def compile_state(self) -> dict:
        """What was compiled or built for this run and how (for the run's provenance)."""
        return {}


class TorchEvaluator(Evaluator):
    """The `torch` and `compiled` backends.

    Defaults are the oracle: fp32, eager, contiguous NCHW. `precision`
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

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

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
        return info

    def compile_state(self) -> dict:
        """Which evaluations were compiled and which fell back to eager (for the run's provenance)."""
        if self.backend != "compiled":
            return {}
        fns = (self._energy_fn, self._grad_fn, self._eps_fn)
        return {fn.name: fn.state for fn in fns if fn.state != "not yet compiled"}
