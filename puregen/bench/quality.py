"""The fast paths' quality bound: their uint8 output against the fp32 eager oracle's.

Same images, same seed and indices (so the same noise), same micro-batch; the
only difference is how the networks are evaluated. The bound (issue 4):
mean absolute difference <= 1 level, >= 99% of pixels within 2 levels, and
no NaN in the fp32 state before it is rounded.
"""

from __future__ import annotations

import numpy as np
import torch

from ..data.convert import from_model_space, to_model_space
from ..engine.noise_key import NoiseKey
from ..methods.base import BatchContext
from ..methods.registry import configure
from .throughput import Mode as FastPath

MAX_MEAN_LEVELS = 1.0
MIN_WITHIN_2 = 0.99
HISTOGRAM_EDGES = (0, 1, 2, 3, 5, 9, 17, 256)  # |difference| in levels: 0, 1, 2, 3-4, 5-8, 9-16, 17+


def default_fast_paths(device: torch.device) -> list[FastPath]:
    paths = [
        FastPath("torch-bf16", "bf16", "torch", True),
        FastPath("compiled-fp32", "fp32", "compiled", True),
        FastPath("compiled-bf16", "bf16", "compiled", True),
    ]
    if device.type == "cuda":
        paths += [FastPath("torch-fp16", "fp16", "torch", True), FastPath("compiled-fp16", "fp16", "compiled", True)]
    from ..export.onnx_export import missing_onnx_packages

    if not missing_onnx_packages():
        paths.append(FastPath("onnxruntime", "fp32", "onnxruntime", False))
    if device.type == "cuda":
        from ..export.tensorrt_engines import unavailable_reason

        if unavailable_reason() is None:
            paths += [FastPath(f"tensorrt-{p}", p, "tensorrt", False) for p in ("fp32", "fp16", "bf16")]
    return paths


def purify_float(method: str, ebm, unet, path: FastPath, images_u8: np.ndarray, *, seed: int, micro_batch: int,
                 device: torch.device, steps: int | None = None, t_star: int | None = None) -> torch.Tensor:
    """The purified fp32 state (model space, before rounding) under one evaluation mode."""
    algorithm = configure(method, "paper", steps=steps, t_star=t_star)
    evaluator = path.evaluator(ebm, unet, device=device, micro_batch=micro_batch)
    x = to_model_space(torch.from_numpy(images_u8).to(device))
    key = NoiseKey.rows(seed, 0, len(images_u8)).to(device)
    return algorithm.purify(x, BatchContext(evaluator, key)).x


def compare(oracle: torch.Tensor, fast: torch.Tensor) -> dict:
    """Level statistics of `fast` against `oracle` (both fp32 model-space states)."""
    finite = bool(torch.isfinite(fast).all())
    a = from_model_space(oracle).to(torch.int32)
    b = from_model_space(torch.nan_to_num(fast)).to(torch.int32)
    diff = (a - b).abs().flatten().cpu().numpy()
    counts, _ = np.histogram(diff, bins=HISTOGRAM_EDGES)
    mean = float(diff.mean())
    within_2 = float((diff <= 2).mean())
    return {
        "mean_levels": mean,
        "within_2_levels": within_2,
        "max_levels": int(diff.max()),
        "finite": finite,
        "histogram": {_bin_label(lo, hi): int(c) for lo, hi, c in zip(HISTOGRAM_EDGES, HISTOGRAM_EDGES[1:], counts)},
        "pixels": int(diff.size),
        "passes": finite and mean <= MAX_MEAN_LEVELS and within_2 >= MIN_WITHIN_2,
    }


def _bin_label(lo: int, hi: int) -> str:
    return str(lo) if hi == lo + 1 else (f"{lo}+" if hi == 256 else f"{lo}-{hi - 1}")
