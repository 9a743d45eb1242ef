"""BadNets: a visible patch trigger with flipped labels, the simplest backdoor (Gu et al., 2017).

The attacker stamps a small fixed patch on a share of training images of
other classes and relabels them as the target class (a dirty-label attack).
A model that learns "patch means target" then classifies any test image with
the patch as the target. It is the control of the table: no defense that
keeps image content can remove a patch of full-contrast pixels by much, yet a
generative purifier that redraws local detail can weaken it.
"""

from __future__ import annotations

import numpy as np

from ...errors import InputError
from ..triggers import Trigger


def checkerboard_patch(image_shape: tuple[int, int, int], size: int = 4, margin: int = 1) -> Trigger:
    """A size x size black-and-white checkerboard in the bottom-right corner, `margin` pixels in.

    A checkerboard rather than a white square: it stands out on light and on dark images alike.
    """
    h, w, c = image_shape
    if size < 1 or size + margin > min(h, w):
        raise InputError(f"a {size}x{size} patch with margin {margin} does not fit {h}x{w} images")
    mask = np.zeros(image_shape, np.float32)
    pattern = np.zeros(image_shape, np.float32)
    rows, cols = slice(h - margin - size, h - margin), slice(w - margin - size, w - margin)
    mask[rows, cols] = 1.0
    checker = (np.add.outer(np.arange(size), np.arange(size)) % 2).astype(np.float32)
    pattern[rows, cols] = checker[:, :, None]
    return Trigger(pattern, kind="patch", mask=mask)


def craft_badnets(images: np.ndarray, labels: np.ndarray, target_class: int, count: int, trigger: Trigger,
                  seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indices, patched images, labels = target) for `count` random rows not of the target class."""
    candidates = np.flatnonzero(labels != target_class)
    if not 0 < count <= len(candidates):
        raise InputError(f"BadNets needs 1..{len(candidates)} poisons from non-target classes, asked for {count}")
    chosen = np.sort(np.random.default_rng(seed).choice(candidates, count, replace=False))
    return chosen, trigger.apply(images[chosen]), np.full(count, target_class, np.int64)
