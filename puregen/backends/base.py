"""The interface every network backend supplies to the purifiers, and the micro-batching they all share.

The `torch` backend in fp32 is the oracle. Faster backends change only how the
networks are evaluated: bf16/fp16 autocast, channels_last memory layout,
`torch.compile`, exported graphs. The image state and the update steps stay
fp32 whatever the backend.

Convolution libraries choose algorithms by batch shape, so the same image can
get a slightly different gradient in a batch of 1 than in a batch of 64. To
make a sample's result independent of how a job is cut, every network call
runs on micro-batches of ONE fixed shape; the last one is padded with copies
of its final row and the padding is dropped.

They also choose by the input's strides, and for a one-channel batch the
strides are not a function of its bytes: (N, 1, H, W) with strides
(HW, HW, W, 1) or (HW, 1, W, 1) is the same memory, and PyTorch calls both
contiguous, but oneDNN runs the first on its NCHW kernels and the second on
its NHWC (brgemm) ones, whose gradients differ in the last bits (measured on
the shipped EBM: every row, ~5e-7 relative, at AVX2 and AVX-512 alike; 60
Langevin steps grow that into whole grey levels). Which strides a batch had
depended on where it came from (a numpy NHWC image gives the second, a torch
round trip the first, the padded last micro-batch the first again), so bytes
depended on the entry point and the batch size. So every micro-batch is
copied into a fresh buffer whose shape, strides and alignment are fixed by
the backend alone (`NetworkBackend.input_memory_format`), whatever the strides,
storage offset or batch the caller's tensor had.

And a sample's row of a matrix product must not depend on where in the
micro-batch it sits: MKL's SGEMM on its AVX2 code path (AVX2-only CPUs)
computes the last rows of a matrix with other kernels than the rest, so the
UNet's Linear layers (time embedding and projections, attention q/k/v/out on
the micro-batch's tokens) gave a sample other bits in slot 6 than in slot 1
(AVX-512's code path did not). MKL's strict reproducible mode, set below
before torch's first matrix product, fixes each element's summation order.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable

# MKL reads MKL_CBWR once, at its first computation, so this must run before any matrix product in the
# process (the CLI and `puregen.load_purifier` import this module first). "AUTO" keeps the CPU's own
# code path; "STRICT" makes ?gemm bitwise reproducible whatever the thread split (MKL's documented
# guarantee), which also makes a row's result independent of its position. Measured: the shipped UNet's
# evaluation is as fast (89 ms per micro-batch either way, one thread). `gemm_rows_position_invariant`
# checks that it took effect.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..kernels.dispatch import implementation_name

DEFAULT_MICRO_BATCH = 16


def run_microbatched(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    micro_batch: int,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """Apply `fn` to fixed-shape micro-batches of `x` along the batch axis; the results, concatenated.

    Each micro-batch is a fresh ``(micro_batch, *x.shape[1:])`` buffer with the strides of
    `memory_format` (the last one padded with copies of its final row), so what `fn` sees
    depends on the rows' values only, never on `x`'s strides, storage offset or length. The
    result is a new contiguous tensor.
    """
    n_total = x.shape[0]
    out = None
    for start in range(0, n_total, micro_batch):
        part = x[start : start + micro_batch]
        n = part.shape[0]
        buf = torch.empty((micro_batch, *x.shape[1:]), dtype=x.dtype, device=x.device, memory_format=memory_format)
        buf[:n].copy_(part)
        if n < micro_batch:
            buf[n:].copy_(part[-1:].expand(micro_batch - n, *part.shape[1:]))
        res = fn(buf)[:n]
        if out is None:
            out = torch.empty((n_total, *res.shape[1:]), dtype=res.dtype, device=res.device)
        out[start : start + n].copy_(res)
    if out is None:  # an empty batch: the output's trailing shape needs one evaluation
        return fn(torch.empty((micro_batch, *x.shape[1:]), dtype=x.dtype, device=x.device,
                              memory_format=memory_format).zero_())[:0].contiguous()
    return out


def reflect_pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """`x` (N, C, H, W) reflect-padded at the bottom and right to sides that are multiples of `multiple`
    (the UNet's down-sampling needs them); the caller crops the result back to H x W."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if not (ph or pw):
        return x
    if ph >= h or pw >= w:
        raise InputError(f"images of {h}x{w} are too small for this UNet (sides must reach {multiple})")
    return F.pad(x, (0, pw, 0, ph), mode="reflect")


def memory_format_for(shape, channels_last: bool) -> torch.memory_format:
    """The one layout the networks get for batches of `shape` (N, C, H, W).

    `channels_last` selects NHWC. A one-channel batch always gets channels-last
    strides: its bytes are the same in both layouts, the strides only pick
    oneDNN's kernels, and the NHWC ones are the faster (shipped EBM's input
    gradient, fp32, one thread: 13 ms against 18 ms per micro-batch of 16 with
    AVX-512, 15.5 against 22 with AVX2).
    """
    if len(shape) == 4 and (channels_last or shape[1] == 1):
        return torch.channels_last
    return torch.contiguous_format


def strides_of(shape: tuple[int, ...], fmt: torch.memory_format) -> tuple[int, ...]:
    """The strides `torch.empty(shape, memory_format=fmt)` has (NCHW or, for 4-D channels_last, NHWC)."""
    if fmt == torch.channels_last and len(shape) == 4:
        n, c, h, w = shape
        return (h * w * c, 1, w * c, c)
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


@functools.cache
def gemm_rows_position_invariant() -> bool:
    """Whether a CPU fp32 matrix product gives a row the same bits wherever in the matrix it sits."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(64, 256, generator=g), torch.randn(24, 256, generator=g)
    ref = F.linear(x[:16], w)
    return all(torch.equal(F.linear(x[s : s + 16].clone(), w)[: 16 - s], ref[s:]) for s in range(1, 8))


class NetworkBackend:
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

    def input_memory_format(self, shape) -> torch.memory_format:
        """The layout of the micro-batches this backend's networks get (a function of the shape only)."""
        return torch.contiguous_format

    def _microbatched(self, fn, x: torch.Tensor) -> torch.Tensor:
        return run_microbatched(fn, x, self.micro_batch, self.input_memory_format(x.shape))

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        self._need(self.ebm, "EBM")
        return self._microbatched(self._energy_fn, x)

    def energy_grad(self, x: torch.Tensor) -> torch.Tensor:
        """grad_x G(x), without the 1/temp factor (the update applies it in fp32)."""
        self._need(self.ebm, "EBM")
        return self._microbatched(self._grad_fn, x)

    def epsilon(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """The UNet's noise prediction at timestep t, reflect-padding sides the UNet cannot take."""
        unet = self._need(self.unet, "DDPM")
        h, w = x.shape[-2:]
        x = reflect_pad_to(x, unet.pad_multiple)
        # The timestep is a tensor input, so one compiled graph serves every t.
        timesteps = torch.full((self.micro_batch,), t, dtype=torch.int64, device=x.device)
        out = self._microbatched(lambda b: self._eps_fn(b, timesteps), x)
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


@dataclass(frozen=True)
class BackendEntry:
    """One backend as the registry (`puregen.backends.REGISTRY`) knows it.

    `build(ebm, unet, *, device, micro_batch, precision, channels_last, threads, onnx_dir, sources)`
    makes the backend (each takes every option and ignores those it has no use for);
    `precision_for(precision, device)` is the precision it runs for a requested one, or an
    InputError saying why it cannot; `availability()` is its line in `puregen info`.
    """

    name: str
    build: Callable[..., NetworkBackend]
    precision_for: Callable[[str, torch.device], str]
    availability: Callable[[], str]
