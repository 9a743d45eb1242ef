"""Linearly separable synthetic perturbations (LSP).

Yu et al., "Availability Attacks Create Shortcuts" (KDD 2022). The paper
shows that the noise of working availability attacks is linearly separable
by class, and that noise built to be separable works as well without any
optimisation: a network learns the simple noise instead of the images. The
recipe:

1. per class, draw a point from a Gaussian in a low-dimensional space: one
   value per patch of a coarse grid and channel (CIFAR-10: a 4 x 4 grid of
   8 x 8 patches, 3 channels, 48 numbers); random Gaussian class points in
   48 dimensions are far apart and linearly separable;
2. upsample it to the image by repeating each value over its patch;
3. scale it to a fixed L2 norm and add it to every image of the class.

Budget. The paper sets the L2 norm to sqrt(H * W * C) * 6/255, the norm of
a change of 6/255 on every pixel: 1.30 on a 32 x 32 x 3 image (the value
the later benchmarks quote for LSP). That formula already follows the
image size, so we keep it as it is: 28 x 28 x 1 gets 28 * 6/255 = 0.659.
The patch is a quarter of the image side (8 px at 32, 7 px at 28), so every
size gets the paper's 4 x 4 grid.

Class-wise. The paper draws a point per image, scattered with unit variance
around its class centre, and the centres are far apart (a class separation
of 10 standard deviations), so its noise is all but the same within a
class; we give every image of a class its class pattern exactly
(`sample_spread` > 0 scatters the points per image, as the paper does).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np

from ....errors import InputError
from .budgets import add_levels, change_stats, check_budget, check_images_labels, l2_noise_levels

PIXEL_RMS = 6 / 255  # the paper's per-pixel scale: L2 budget = sqrt(H * W * C) * 6/255
GRID = 4  # patches per image side (the paper's 8 px patches on 32 px images)


@dataclass
class LSPRecipe:
    rms: float = PIXEL_RMS  # L2 budget per sqrt(pixel), pixel units
    grid: int = GRID
    sample_spread: float = 0.0  # per-image Gaussian scatter around the class point (its std is 1)
    seed: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check(self, image_shape: tuple[int, int, int]) -> None:
        check_budget(self.rms, "LSP rms (L2 budget per sqrt(pixel), pixel units)", 1.0)
        if not 1 <= self.grid <= min(image_shape[:2]):
            raise InputError(f"LSP grid must be 1..{min(image_shape[:2])} patches per side, got {self.grid}")
        if not (math.isfinite(self.sample_spread) and self.sample_spread >= 0):
            raise InputError(f"LSP sample_spread must be >= 0, got {self.sample_spread}")

    def budget(self, image_shape: tuple[int, ...]) -> float:
        return self.rms * math.sqrt(int(np.prod(image_shape)))


def upsample_patches(points: np.ndarray, image_shape: tuple[int, int, int]) -> np.ndarray:
    """K x g x g x C values -> K x H x W x C, each value repeated over its ceil(H/g) x ceil(W/g) patch
    (the last row and column of patches are cut to the image)."""
    h, w, _ = image_shape
    g = points.shape[1]
    ph, pw = -(-h // g), -(-w // g)
    return np.repeat(np.repeat(points, ph, axis=1), pw, axis=2)[:, :h, :w]


def class_points(num_classes: int, channels: int, recipe: LSPRecipe) -> np.ndarray:
    """One Gaussian point per class in the coarse space: K x grid x grid x C."""
    return np.random.default_rng([recipe.seed, 0x15B]).standard_normal((num_classes, recipe.grid, recipe.grid,
                                                                        channels))


def lsp_patterns(num_classes: int, image_shape: tuple[int, int, int], recipe: LSPRecipe) -> np.ndarray:
    """The K class patterns, float pixel units, each of L2 norm exactly the budget (before rounding)."""
    recipe.check(image_shape)
    points = class_points(num_classes, image_shape[2], recipe)
    return _normalise(upsample_patches(points, image_shape), recipe.budget(image_shape))


def _normalise(noise: np.ndarray, budget: float) -> np.ndarray:
    norms = np.linalg.norm(noise.reshape(len(noise), -1), axis=1)
    return noise / norms.reshape(-1, 1, 1, 1) * budget


def craft_lsp(images: np.ndarray, labels: np.ndarray, recipe: LSPRecipe | None = None, *,
              num_classes: int | None = None) -> tuple[np.ndarray, dict]:
    """Every image plus its class's synthetic pattern; returns (uint8 poisoned images, metadata)."""
    t0 = time.perf_counter()
    recipe = recipe or LSPRecipe()
    labels, num_classes = check_images_labels(images, labels, num_classes)
    shape = images.shape[1:]
    budget = recipe.budget(shape)
    patterns = lsp_patterns(num_classes, shape, recipe)
    if recipe.sample_spread:
        # Scatter in the low-dimensional space, as the paper does, then upsample and normalise per image.
        rng = np.random.default_rng([recipe.seed, 0x5CA7])
        points = class_points(num_classes, shape[2], recipe)[labels]
        points = points + recipe.sample_spread * rng.standard_normal(points.shape)
        levels = l2_noise_levels(_normalise(upsample_patches(points, shape), budget), budget)
    else:
        levels = l2_noise_levels(patterns, budget)[labels]  # rounded once per class: identical in a class
    poisoned = add_levels(images, levels)
    info = {"attack": "lsp", "paper": "Yu et al., Availability Attacks Create Shortcuts, KDD 2022",
            "norm": "l2", "budget": round(budget, 6), "budget_unit": "pixel units ([0, 1] scale), per image",
            "budget_rule": f"sqrt(H*W*C) * {recipe.rms * 255:g}/255", "class_wise": not recipe.sample_spread,
            "recipe": recipe.to_dict(), "num_classes": num_classes, **change_stats(images, poisoned),
            "crafting_seconds": round(time.perf_counter() - t0, 2)}
    return poisoned, info
