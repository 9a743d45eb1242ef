"""Input checks and budget arithmetic shared by the unlearnable-example attacks.

Every attack here adds noise to every training image and keeps the labels.
The noise is computed in [0, 1] pixel units and stored as whole uint8 levels,
so the rounding is done here, once, in a way that never leaves the budget:

* L-inf: levels = round(255 * delta) clipped to +-floor(255 * epsilon);
* L2: the float noise is rounded to levels, and if rounding pushed its norm
  over the budget the noise is shrunk (bisection on a scale factor) until the
  rounded norm is inside it.

Adding the levels to an image and clipping to 0..255 can only shrink each
pixel's change, so the stored images stay inside the budget too.
"""

from __future__ import annotations

import math

import numpy as np

from ....errors import InputError

# The reference image the L2 budgets of LSP and AR are published for: 32 x 32 x 3 (CIFAR-10).
REFERENCE_DIM = 32 * 32 * 3


def check_images_labels(images, labels, num_classes: int | None = None) -> tuple[np.ndarray, int]:
    """Labels as int64 and the number of classes; raises InputError on anything the attacks cannot use."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or len(images) == 0:
        desc = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise InputError(f"unlearnable examples need a non-empty uint8 N x H x W x C array, got {desc}")
    if images.shape[3] not in (1, 3):
        raise InputError(f"images must have 1 or 3 channels (N x H x W x C), got shape {images.shape}")
    labels = np.asarray(labels)
    if labels.shape != (len(images),) or labels.dtype.kind not in "iu":
        raise InputError(f"labels must be {len(images)} integers, one per image, got {labels.dtype} {labels.shape}")
    num_classes = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    if num_classes < 2:
        raise InputError(f"unlearnable examples need at least 2 classes, got num_classes={num_classes}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise InputError(f"labels must lie in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}")
    return labels.astype(np.int64), num_classes


def check_budget(value: float, name: str, upper: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 < value <= upper):
        raise InputError(f"{name} must be a number in (0, {upper:g}], got {value!r}")


def linf_levels(epsilon: float) -> int:
    """Whole uint8 levels inside an L-inf budget (8/255 -> 8); the small slack absorbs float error."""
    check_budget(epsilon, "the L-inf budget epsilon (pixel units)", 1.0)
    levels = math.floor(epsilon * 255 + 1e-6)
    if levels < 1:
        raise InputError(f"an L-inf budget of {epsilon:.4g} is under one uint8 level (1/255)")
    return levels


def scaled_l2_budget(reference_budget: float, image_shape: tuple[int, ...]) -> float:
    """A 32x32x3 L2 budget carried to another image size at the same root-mean-square change per pixel.

    An L2 ball of fixed radius would let a 28x28x1 image change each pixel 2x as much as a 32x32x3 one
    (it has a quarter of the pixels); keeping budget / sqrt(pixels) fixed keeps the noise equally visible.
    """
    dim = int(np.prod(image_shape))
    return float(reference_budget) * math.sqrt(dim / REFERENCE_DIM)


def linf_noise_levels(delta: np.ndarray, epsilon: float) -> np.ndarray:
    """Float noise in pixel units -> int16 levels within +-floor(255 * epsilon)."""
    levels = linf_levels(epsilon)
    return np.clip(np.rint(delta * 255), -levels, levels).astype(np.int16)


def l2_noise_levels(delta: np.ndarray, budget: float) -> np.ndarray:
    """Float noise (K x H x W x C, pixel units, each row at most `budget` in L2) -> int16 levels whose
    rows are within `budget` (pixel units) in L2 after rounding."""
    check_budget(budget, "the L2 budget (pixel units)", math.sqrt(delta[0].size))
    out = np.empty(delta.shape, np.int16)
    for i, row in enumerate(delta):
        out[i] = _round_inside_l2(row.astype(np.float64) * 255, budget * 255)
    return out


def _round_inside_l2(levels: np.ndarray, limit: float) -> np.ndarray:
    rounded = np.rint(levels)
    if np.linalg.norm(rounded) <= limit:
        return rounded
    lo, hi = 0.0, 1.0  # the largest shrink factor whose rounded noise fits: rint(0 * x) = 0 always does
    for _ in range(40):
        mid = (lo + hi) / 2
        if np.linalg.norm(np.rint(levels * mid)) <= limit:
            lo = mid
        else:
            hi = mid
    return np.rint(levels * lo)


def add_levels(images: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """images (uint8) + integer noise, clipped to 0..255: clipping only ever shrinks a pixel's change."""
    return np.clip(images.astype(np.int16) + levels, 0, 255).astype(np.uint8)


def change_stats(clean: np.ndarray, poisoned: np.ndarray) -> dict:
    """The realised change, in uint8 levels (L-inf) and pixel units (largest per-image L2), for the metadata."""
    diff = poisoned.astype(np.float64) - clean.astype(np.float64)
    flat = diff.reshape(len(diff), -1)
    return {"max_change_levels": int(np.abs(flat).max()),
            "max_l2": round(float(np.linalg.norm(flat, axis=1).max() / 255), 6),
            "mean_l2": round(float(np.linalg.norm(flat, axis=1).mean() / 255), 6)}
