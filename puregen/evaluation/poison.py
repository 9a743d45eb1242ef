"""Clean-label poisoning with an additive trigger."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from .triggers import Trigger


@dataclass
class PoisonedSet:
    images: np.ndarray  # uint8 NHWC, the training set with the poisons in place
    labels: np.ndarray  # int64, unchanged: the attack is clean-label
    poison_indices: np.ndarray  # rows that carry the trigger
    originals: np.ndarray  # those rows' images before the trigger was added


def clean_label_poison(images: np.ndarray, labels: np.ndarray, trigger: Trigger, count: int,
                       seed: int) -> PoisonedSet:
    """Add `trigger` to `count` randomly chosen images of its target class; labels stay as they are."""
    candidates = np.flatnonzero(labels == trigger.target)
    if count > len(candidates):
        raise InputError(f"cannot poison {count} images: the target class {trigger.target} has {len(candidates)}")
    chosen = np.sort(np.random.default_rng(seed).choice(candidates, count, replace=False))
    poisoned = images.copy()
    poisoned[chosen] = trigger.apply(images[chosen])
    return PoisonedSet(poisoned, labels.copy(), chosen, images[chosen].copy())


def contribute_poisons(images: np.ndarray, labels: np.ndarray, trigger: Trigger, contributed_u8: np.ndarray,
                       seed: int) -> PoisonedSet:
    """The attacker's own target-class images, with the trigger, take the place of randomly chosen
    target-class rows of the victim's set: the class sizes and every label stay as they were."""
    count = len(contributed_u8)
    candidates = np.flatnonzero(labels == trigger.target)
    if count > len(candidates):
        raise InputError(f"cannot place {count} poisons: the target class {trigger.target} has {len(candidates)}")
    if contributed_u8.shape[1:] != images.shape[1:]:
        raise InputError(f"contributed images are {contributed_u8.shape[1:]}, the training set {images.shape[1:]}")
    chosen = np.sort(np.random.default_rng(seed).choice(candidates, count, replace=False))
    poisoned = images.copy()
    poisoned[chosen] = trigger.apply(contributed_u8)
    return PoisonedSet(poisoned, labels.copy(), chosen, contributed_u8.copy())
