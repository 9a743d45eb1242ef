"""What a throughput benchmark measures: the machine's ceiling, counted FLOPs and step times.

Every number a benchmark reports comes from the same run: the ceiling is a
3x3 convolution (128 -> 128 channels, batch 64, 32x32, channels_last) in the
precision under test, FLOPs are counted by `torch.utils.flop_counter` on the
network evaluation actually run (not estimated from the architecture), and
step times are medians over repetitions, synchronised on a GPU.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from ..backends.precision import DTYPES

CEILING_FLOP = 2 * 64 * 128 * 128 * 9 * 32 * 32


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], repeats: int, device: torch.device, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall time of `fn()` over `repeats` runs after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def conv_ceiling(precision: str = "fp32", device: torch.device | str = "cpu", repeats: int = 10) -> float:
    """FLOP/s of a 3x3, 128->128 convolution, batch 64, 32x32, channels_last (median of `repeats`)."""
    device = torch.device(device)
    dtype = DTYPES[precision]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 128, 32, 32, generator=g).to(device, dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(128, 128, 3, 3, generator=g).to(device, dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        seconds, _ = median_seconds(lambda: F.conv2d(x, w, padding=1), repeats, device)
    return CEILING_FLOP / seconds


class _FlopCounter(TorchDispatchMode):
    """FLOPs of every dispatched operator that torch's flop registry knows.

    `FlopCounterMode` itself tracks modules with backward hooks, which
    `torch.autograd.grad` on a leaf input (the EBM's input gradient) refuses;
    this counts the same operators without module tracking.
    """

    def __init__(self):
        super().__init__()
        self.registry = FlopCounterMode(display=False).flop_registry
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = self.registry.get(func._overloadpacket)
        if count is not None:
            self.total += int(count(*args, **kwargs, out_val=out))
        return out


def counted_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one eager call of `fn`, counted operator by operator (convolutions, matmuls, their backwards)."""
    counter = _FlopCounter()
    with counter:
        fn()
    return counter.total


def benchmark_images(n: int, seed: int, size: int = 32, channels: int = 3) -> np.ndarray:
    """Non-constant uint8 NHWC images (smooth noise with a colour ramp): never time on zeros."""
    rng = np.random.default_rng(seed)
    noise = rng.random((n, size + 4, size + 4, channels))
    blur = sum(noise[:, i : i + size, j : j + size] for i in range(5) for j in range(5)) / 25
    ramp = np.linspace(0, 1, size)[None, None, :, None] * np.array([1.0, 0.5, 0.2][:channels])
    return np.clip((2.4 * (blur - 0.5) + 0.5 * ramp + 0.3) * 255, 0, 255).round().astype(np.uint8)
