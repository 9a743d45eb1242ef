"""Autoregressive (AR) perturbations.

Sandoval-Segura et al., "Autoregressive Perturbations for Data Poisoning"
(NeurIPS 2022). Each class gets its own 2-D autoregressive process; every
image of the class gets its own sample of that process as noise. A 3 x 3 AR
process predicts the bottom-right entry of every 3 x 3 window from the other
eight,

    x[i+2, j+2] = sum_{(a, b) != (2, 2)} beta[a, b] * x[i+a, j+b],

filling an image-sized array in raster order from a Gaussian start. The
noise is simple for a network (one 3 x 3 convolution with the coefficients
and -1 at the predicted entry maps a class's noise to zero and the other
classes' noise to large values), so a network trained on it learns the
noise, not the images; and as it needs no network to craft, it transfers.

Our reading of the paper, written from it:

* one process per class and channel; the eight coefficients are Gaussian,
  divided by their sum (the paper's normalisation, which keeps most of them
  from blowing up);
* processes are drawn until K are stable and separable: a sample must stay
  finite and no larger than its Gaussian start (RMS <= `max_gain`), and
  every earlier class's matched filter must respond to it (mean ReLU of the
  filter output over the noise's RMS >= `min_response`; the paper keeps
  processes whose responses to non-matching filters exceed a threshold);
* the sample is drawn `crop` entries larger per side and its first rows and
  columns (the Gaussian start) cut off, as the paper does with 36 -> 32;
* no innovation noise: the process is deterministic given its start.

Budget: L2 1.0 on a 32 x 32 x 3 image (the paper's), carried to other sizes
at the same RMS change per pixel (`budgets.scaled_l2_budget`): L2 = 1.0 *
sqrt(H * W * C / 3072), 0.505 on 28 x 28 x 1.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np

from ....errors import InputError
from .budgets import add_levels, change_stats, check_budget, check_images_labels, l2_noise_levels, scaled_l2_budget

CHUNK = 2048  # images generated at once (a 36 x 36 x 3 float64 sample is 31 KB)


@dataclass
class ARRecipe:
    reference_budget: float = 1.0  # L2, pixel units, on a 32x32x3 image; scaled to the image size
    crop: int = 4
    max_gain: float = 1.0  # a stable process: its sample's RMS is at most this times the start's
    min_response: float = 0.2  # separable: other classes' filters respond by at least this (relative)
    max_draws: int = 2000  # candidate processes before giving up
    seed: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check(self) -> None:
        check_budget(self.reference_budget, "AR reference_budget (L2 on 32x32x3, pixel units)", 55.0)
        if not 0 <= self.crop <= 32:
            raise InputError(f"AR crop must be 0..32 entries, got {self.crop}")
        if not (self.max_gain > 0 and math.isfinite(self.max_gain)):
            raise InputError(f"AR max_gain must be positive, got {self.max_gain}")
        if not (self.min_response >= 0 and math.isfinite(self.min_response)) or self.max_draws < 1:
            raise InputError(f"AR min_response must be >= 0 and max_draws >= 1, got {self.min_response}, "
                             f"{self.max_draws}")


def random_coefficients(rng: np.random.Generator, channels: int) -> np.ndarray:
    """C x 3 x 3 AR coefficients, the predicted (bottom-right) entry 0, each channel's eight summing to 1."""
    b = rng.standard_normal((channels, 3, 3))
    b[:, 2, 2] = 0
    return b / b.sum(axis=(1, 2), keepdims=True)


def generate(coefficients: np.ndarray, start: np.ndarray, crop: int) -> np.ndarray:
    """Run the AR processes over Gaussian starts: coefficients N x C x 3 x 3, start N x C x H' x W'.

    Returns N x C x (H' - crop) x (W' - crop). Vectorised over images and channels; the raster loop is
    inherent (each entry depends on the ones just written)."""
    x = start.copy()
    _, _, h, w = x.shape
    for i in range(h - 2):
        for j in range(w - 2):
            x[:, :, i + 2, j + 2] = np.einsum("ncab,ncab->nc", x[:, :, i : i + 3, j : j + 3], coefficients)
    return x[:, :, crop:, crop:]


def matched_filter_response(coefficients: np.ndarray, noise: np.ndarray) -> float:
    """Mean ReLU of the class filter (coefficients, -1 at the predicted entry, summed over channels) over
    `noise` (C x H x W), relative to the noise's RMS: 0 for the class's own noise."""
    f = coefficients.copy()
    f[:, 2, 2] = -1
    c, h, w = noise.shape
    windows = np.lib.stride_tricks.sliding_window_view(noise, (3, 3), axis=(1, 2))  # C x H-2 x W-2 x 3 x 3
    out = np.einsum("cijab,cab->ij", windows, f)
    return float(np.maximum(out, 0).mean() / max(np.sqrt((noise**2).mean()), 1e-12))


def ar_processes(num_classes: int, image_shape: tuple[int, int, int], recipe: ARRecipe) -> np.ndarray:
    """K x C x 3 x 3 coefficients of K stable, mutually separable processes (drawn greedily, seeded)."""
    recipe.check()
    h, w, c = image_shape
    rng = np.random.default_rng([recipe.seed, 0xA2])
    kept: list[np.ndarray] = []
    for _ in range(recipe.max_draws):
        b = random_coefficients(rng, c)
        start = rng.standard_normal((1, c, h + recipe.crop, w + recipe.crop))
        with np.errstate(over="ignore", invalid="ignore"):
            sample = generate(b[None], start, recipe.crop)[0]
            rms = float(np.sqrt((sample**2).mean()))
        if not math.isfinite(rms) or rms > recipe.max_gain or rms < 1e-6:
            continue
        if all(matched_filter_response(k, sample) >= recipe.min_response for k in kept):
            kept.append(b)
            if len(kept) == num_classes:
                return np.stack(kept)
    raise RuntimeError(f"found {len(kept)} of {num_classes} stable, separable AR processes in {recipe.max_draws} "
                       "draws; raise max_draws or lower min_response")


def craft_autoregressive(images: np.ndarray, labels: np.ndarray, recipe: ARRecipe | None = None, *,
                         num_classes: int | None = None) -> tuple[np.ndarray, dict]:
    """Every image plus its own sample of its class's AR process, at the scaled L2 budget."""
    t0 = time.perf_counter()
    recipe = recipe or ARRecipe()
    labels, num_classes = check_images_labels(images, labels, num_classes)
    shape = images.shape[1:]
    h, w, c = shape
    budget = scaled_l2_budget(recipe.reference_budget, shape)
    coefficients = ar_processes(num_classes, shape, recipe)
    poisoned = np.empty_like(images)
    for s in range(0, len(images), CHUNK):
        rows = slice(s, s + CHUNK)
        # A generator per chunk: the noise of an image depends on the seed and its row, not on the machine.
        rng = np.random.default_rng([recipe.seed, 0x57A27, s])
        start = rng.standard_normal((len(labels[rows]), c, h + recipe.crop, w + recipe.crop))
        noise = generate(coefficients[labels[rows]], start, recipe.crop).transpose(0, 2, 3, 1)
        noise = noise / np.linalg.norm(noise.reshape(len(noise), -1), axis=1).reshape(-1, 1, 1, 1) * budget
        poisoned[rows] = add_levels(images[rows], l2_noise_levels(noise, budget))
    info = {"attack": "ar", "paper": "Sandoval-Segura et al., Autoregressive Perturbations for Data Poisoning, "
            "NeurIPS 2022", "norm": "l2", "budget": round(budget, 6),
            "budget_unit": "pixel units ([0, 1] scale), per image",
            "budget_rule": f"{recipe.reference_budget:g} * sqrt(H*W*C / 3072)", "class_wise": False,
            "noise": "a class-wise AR process, one sample per image", "recipe": recipe.to_dict(),
            "num_classes": num_classes, "coefficients": np.round(coefficients, 6).tolist(),
            **change_stats(images, poisoned), "crafting_seconds": round(time.perf_counter() - t0, 2)}
    return poisoned, info
