"""One-pixel shortcut (OPS).

Wu et al., "One-Pixel Shortcut: on the Learning Preference of Deep Neural
Networks" (ICLR 2023). Every image of class k gets the same single pixel,
at position p_k, set to the same colour s_k; nothing else changes. A network
latches onto that pixel, which predicts the label perfectly, instead of the
image content, and fails on clean test images.

The paper chooses (p_k, s_k) per class from the class's own images so that
the pixel is as far as possible from what the images have there, and
consistently so: with D(x) = mean over channels |x[p] - s| (pixel units),

    (p_k, s_k) = argmax  mean_{x in class k} D(x) / var_{x in class k} D(x),

with s among the extreme colours, every channel 0 or 1 (2 values for grey,
8 for RGB). Our choices: a small constant (1e-4) keeps the ratio finite
where every image of the class has the same value (Fashion-MNIST's black
borders: the best possible pick); classes are assigned in order and a
position taken by an earlier class is not offered again, so no two classes
share a pixel.

Budget: L0, one pixel (all its channels) per image; its value is free
(the change there may reach 255 levels), as in the paper.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass

import numpy as np

from .budgets import change_stats, check_images_labels

VARIANCE_FLOOR = 1e-4


@dataclass
class OPSRecipe:
    distinct_positions: bool = True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def extreme_colours(channels: int) -> np.ndarray:
    """All 2^C colours with every channel 0 or 1: (2^C) x C."""
    return np.array(list(itertools.product((0.0, 1.0), repeat=channels)))


def search_pixels(images: np.ndarray, labels: np.ndarray, num_classes: int,
                  recipe: OPSRecipe) -> tuple[np.ndarray, np.ndarray]:
    """Per class, the (row, col) and the uint8 colour maximising mean / variance of the deviation."""
    h, w, c = images.shape[1:]
    colours = extreme_colours(c)
    positions = np.zeros((num_classes, 2), np.int64)
    values = np.zeros((num_classes, c), np.uint8)
    taken = np.zeros(h * w, bool)
    for k in range(num_classes):
        x = images[labels == k].reshape(-1, h * w, c).astype(np.float64) / 255
        if len(x) == 0:  # a class with no image gets no pixel; it has nothing to poison
            continue
        # score[s, p] for every colour s and position p; one colour at a time keeps a CIFAR-10 class
        # (5,000 x 1,024 x 3) at ~100 MB.
        score = np.empty((len(colours), h * w))
        for i, colour in enumerate(colours):
            dev = np.abs(x - colour).mean(axis=2)  # N x P
            score[i] = dev.mean(axis=0) / (dev.var(axis=0) + VARIANCE_FLOOR)
        if recipe.distinct_positions:
            score[:, taken] = -np.inf
        s, p = np.unravel_index(int(np.argmax(score)), score.shape)
        taken[p] = True
        positions[k] = divmod(int(p), w)
        values[k] = (colours[s] * 255).astype(np.uint8)
    return positions, values


def craft_one_pixel_shortcut(images: np.ndarray, labels: np.ndarray, recipe: OPSRecipe | None = None, *,
                             num_classes: int | None = None) -> tuple[np.ndarray, dict]:
    """Every image with its class's pixel set to its class's colour; returns (uint8 images, metadata)."""
    t0 = time.perf_counter()
    recipe = recipe or OPSRecipe()
    labels, num_classes = check_images_labels(images, labels, num_classes)
    positions, values = search_pixels(images, labels, num_classes, recipe)
    poisoned = images.copy()
    rows, cols = positions[labels, 0], positions[labels, 1]
    poisoned[np.arange(len(images)), rows, cols] = values[labels]
    info = {"attack": "ops", "paper": "Wu et al., One-Pixel Shortcut, ICLR 2023", "norm": "l0", "budget": 1,
            "budget_unit": "pixels per image (all channels of one pixel; its value unbounded)", "class_wise": True,
            "recipe": recipe.to_dict(), "num_classes": num_classes, "positions": positions.tolist(),
            "values": values.tolist(), **change_stats(images, poisoned),
            "crafting_seconds": round(time.perf_counter() - t0, 2)}
    return poisoned, info
