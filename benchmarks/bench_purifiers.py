"""End-to-end purifier benchmarks (pytest-benchmark): each method, the fp32 eager reference against the fast paths.

Uses the shipped Fashion-MNIST models on non-constant 28x28 images, with
few steps so the suite stays short; the cost per step is what is compared.
Not part of the test suite:

    python -m pytest benchmarks/bench_purifiers.py --benchmark-only --benchmark-group-by=param:method

For full-length runs with the ceiling and FLOP/s, use `puregen bench`.
"""

from __future__ import annotations

import pytest

from puregen.bench.measure import benchmark_images
from puregen.engine.factory import load_purifier

MODES = {
    "reference": dict(backend="torch", precision="fp32"),
    "torch-bf16": dict(backend="torch", precision="bf16", channels_last=True),
    "compiled-bf16": dict(backend="compiled", precision="bf16"),
    "onnxruntime": dict(backend="onnxruntime", precision="fp32"),  # exported on first use (cached)
}
METHODS = {
    "ebm": dict(steps=10),
    "ddpm": dict(t_star=5),
    "naive": dict(steps=10, t_star=5),
    "reps": dict(steps=2, t_star=2, reps=2),
    "jpeg": dict(),
}


@pytest.fixture(scope="module")
def images():
    return benchmark_images(64, seed=0, size=28, channels=1)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("method", list(METHODS))
def test_purify(benchmark, images, method, mode):
    if method == "jpeg" and mode != "reference":
        pytest.skip("JPEG runs no network")
    purifier = load_purifier(method, micro_batch=64, **METHODS[method], **MODES[mode])
    purifier.purify(images[:64], seed=0, batch_size=64)  # warm-up, including any compilation
    benchmark.extra_info["images"] = len(images)
    out = benchmark.pedantic(lambda: purifier.purify(images, seed=0, batch_size=64), rounds=3, iterations=1)
    assert out.shape == images.shape
