"""Reference (plain torch) against native (csrc/) for each update step.

Batch 64 at 1x28x28 (Fashion-MNIST) and 3x32x32 (CIFAR-10), 2 threads, the
published Langevin and DDPM scalars. Not collected by the default `tests/` run:

    python -m pytest benchmarks/bench_kernels_native.py --benchmark-only
"""

import pytest
import torch

from puregen.engine.schedule import DDPMSchedule
from puregen.kernels import native, reference

SHAPES = {"64x1x28x28": (64, 1, 28, 28), "64x3x32x32": (64, 3, 32, 32)}
IMPLS = {"reference": reference, "native": native}
THREADS = 2


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(old)


def _impl(name):
    if name == "native" and not native.available():
        pytest.fail(f"native kernels unavailable: {native.unavailable_reason()}")
    return IMPLS[name]


def _inputs(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(shape, generator=g) * 2 - 1
    other = torch.randn(shape, generator=g)
    indices = torch.arange(1000, 1000 + shape[0])
    return x, other, indices


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_langevin_update(benchmark, impl, shape):
    benchmark.group = f"langevin_update {shape}"
    x, grad, idx = _inputs(shape)
    step = _impl(impl).langevin_update
    benchmark(step, x, grad, drift=0.78125, noise_scale=1.25e-2, indices=idx, seed=7, stream=1, step=3)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_ddpm_forward_noise(benchmark, impl, shape):
    benchmark.group = f"ddpm_forward_noise {shape}"
    x, _, idx = _inputs(shape)
    step = _impl(impl).ddpm_forward_noise
    benchmark(step, x, sqrt_alpha_bar=0.9655, sqrt_one_minus_alpha_bar=0.2604, indices=idx, seed=7, stream=2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_ddpm_reverse_step(benchmark, impl, shape):
    benchmark.group = f"ddpm_reverse_step {shape}"
    x, eps, idx = _inputs(shape)
    coefs = DDPMSchedule().reverse_coefficients(74)
    step = _impl(impl).ddpm_reverse_step
    benchmark(step, x, eps, t=74, coefs=coefs, indices=idx, seed=7, stream=3)
