"""Reference (plain torch) vs Triton: the three fused update steps and GroupNorm+SiLU, on CUDA.

    pytest benchmarks/bench_kernels_triton.py --benchmark-group-by=param:case

Not collected by the default run (testpaths = tests). Skipped without a CUDA
device or triton, and under TRITON_INTERPRET=1: interpreter timings say
nothing about the kernels. Every timed call ends with a CUDA synchronize, so
the time is the kernel's, not the launch's.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from puregen.kernels import philox
from puregen.kernels import reference as ref

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if not torch.cuda.is_available():
    pytest.skip("no CUDA device: Triton kernel timings need a GPU (the CPU interpreter's are meaningless)",
                allow_module_level=True)

from puregen.kernels import triton_kernels as tk  # noqa: E402  (after the skips: needs triton)

if tk.INTERPRETED:
    pytest.skip("TRITON_INTERPRET=1: interpreted kernels, meaningless timings", allow_module_level=True)

BATCH, SHAPE = 64, (3, 32, 32)  # a CIFAR-10 micro-batch
IMPLS = {"reference": ref, "triton": tk}


def _timed(benchmark, fn):
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    run()  # compile / warm up outside the timing
    return benchmark(run)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(BATCH, *SHAPE, device="cuda", generator=g)
    return {
        "x": x,
        "grad_bf16": torch.randn(BATCH, *SHAPE, device="cuda", generator=g).bfloat16(),
        "eps": torch.randn(BATCH, *SHAPE, device="cuda", generator=g),
        "indices": torch.arange(BATCH, device="cuda") + 1000,
    }


@pytest.mark.parametrize("impl", list(IMPLS))
def test_langevin_update(benchmark, data, impl):
    mod = IMPLS[impl]
    _timed(benchmark, lambda: mod.langevin_update(
        data["x"], data["grad_bf16"], drift=0.01, noise_scale=0.05, indices=data["indices"], seed=1,
        stream=philox.STREAM_EBM, step=7))


@pytest.mark.parametrize("impl", list(IMPLS))
def test_ddpm_forward_noise(benchmark, data, impl):
    mod = IMPLS[impl]
    _timed(benchmark, lambda: mod.ddpm_forward_noise(
        data["x"], sqrt_alpha_bar=0.8, sqrt_one_minus_alpha_bar=0.6, indices=data["indices"], seed=1,
        stream=philox.STREAM_DDPM_FORWARD))


@pytest.mark.parametrize("impl", list(IMPLS))
def test_ddpm_reverse_step(benchmark, data, impl):
    mod = IMPLS[impl]
    coefs = ref.ReverseCoefficients(1.01, 0.1, 0.3, 0.69, math.sqrt(1e-3))
    _timed(benchmark, lambda: mod.ddpm_reverse_step(
        data["x"], data["eps"], t=40, coefs=coefs, indices=data["indices"], seed=1,
        stream=philox.STREAM_DDPM_REVERSE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_group_norm_silu(benchmark, impl, dtype):
    # A UNet block's activation at 32x32: 128 channels, 32 groups.
    x = torch.randn(BATCH, 128, 32, 32, device="cuda", dtype=dtype)
    w = torch.randn(128, device="cuda", dtype=dtype)
    b = torch.randn(128, device="cuda", dtype=dtype)
    if impl == "reference":
        _timed(benchmark, lambda: F.silu(F.group_norm(x, 32, w, b, 1e-5)))
    else:
        _timed(benchmark, lambda: tk.group_norm_silu(x, w, b, 32, 1e-5))
