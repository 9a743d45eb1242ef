"""Network evaluation for the purifiers: the `torch` backend (fp32 eager, the oracle).

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


def check_backend(backend: str, precision: str) -> str:
    """Validate the backend/precision pair; returns the precision actually used."""
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if backend != "torch":
        raise InputError(
            f"backend {backend!r} is not available in this version of puregen; use --backend torch "
            "(the compiled, ONNX Runtime and TensorRT backends are planned)"
        )
    if precision not in ("fp32", "auto"):
        raise InputError(
            f"precision {precision!r} is not available on the torch backend yet; use fp32 (or auto, which picks fp32)"
        )
    return "fp32"


class TorchEvaluator:
    """fp32 eager evaluation of the EBM energy, its input gradient and the UNet.

    Parameter gradients are never computed: the models' parameters are frozen
    and only the input requires a gradient.
    """

    backend = "torch"
    precision = "fp32"

    def __init__(
        self,
        ebm: nn.Module | None = None,
        unet: nn.Module | None = None,
        *,
        device: str | torch.device = "cpu",
        micro_batch: int = DEFAULT_MICRO_BATCH,
    ):
        if micro_batch < 1:
            raise InputError(f"micro-batch must be >= 1, got {micro_batch}")
        self.device = torch.device(device)
        self.micro_batch = micro_batch
        self.ebm = self._prepare(ebm)
        self.unet = self._prepare(unet)
        if self.device.type == "cuda":
            # Input gradients on CUDA are reproducible only with deterministic kernels;
            # cuBLAS needs a fixed workspace for that (set before its first use).
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.benchmark = False
            torch.use_deterministic_algorithms(True, warn_only=False)

    def _prepare(self, model: nn.Module | None) -> nn.Module | None:
        if model is None:
            return None
        model = model.to(self.device, torch.float32).eval()
        model.requires_grad_(False)
        return model

    def _need(self, model: nn.Module | None, what: str) -> nn.Module:
        if model is None:
            raise RuntimeError(f"this purifier has no {what} model")
        return model

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        ebm = self._need(self.ebm, "EBM")
        with torch.no_grad():
            return run_microbatched(lambda b: ebm(b).float(), x, self.micro_batch)

    def energy_grad(self, x: torch.Tensor) -> torch.Tensor:
        """grad_x G(x), without the 1/temp factor (the update applies it in fp32)."""
        ebm = self._need(self.ebm, "EBM")

        def grad(b: torch.Tensor) -> torch.Tensor:
            b = b.detach().requires_grad_(True)
            with torch.enable_grad():
                (g,) = torch.autograd.grad(ebm(b).sum(), b)
            return g

        return run_microbatched(grad, x, self.micro_batch)

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

        def eps(b: torch.Tensor) -> torch.Tensor:
            timesteps = torch.full((b.shape[0],), t, dtype=torch.int64, device=b.device)
            return unet(b, timesteps).float()

        with torch.no_grad():
            out = run_microbatched(eps, x, self.micro_batch)
        return out[..., :h, :w]

    def describe(self) -> dict:
        return {"backend": self.backend, "precision": self.precision, "micro_batch": self.micro_batch, "device": str(self.device)}
