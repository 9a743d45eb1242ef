"""The demo's clean-label poisoning: an additive trigger on images of its target class, labels unchanged.

Both ways give a `PoisonSet` over the victim's training set (its rows, the
triggered images that replace them, their unchanged labels), so the demo puts
its poisons in place exactly as `puregen eval` does.
"""

from __future__ import annotations

import numpy as np

from ..engine.pipeline import dataset_fingerprint
from ..errors import InputError
from .poison_set import PoisonSet
from .triggers import Trigger


def _target_rows(labels: np.ndarray, target: int, count: int, seed: int, task: str) -> np.ndarray:
    """`count` distinct rows of class `target`, drawn with `seed`, in increasing order."""
    candidates = np.flatnonzero(labels == target)
    if count > len(candidates):
        raise InputError(f"cannot {task}: the target class {target} has {len(candidates)}")
    return np.sort(np.random.default_rng(seed).choice(candidates, count, replace=False))


def _poison_set(images: np.ndarray, labels: np.ndarray, trigger: Trigger, rows: np.ndarray, poisons: np.ndarray,
                selection: str, test_amplify: float) -> PoisonSet:
    """Clean-label: each poison keeps the label of the row it replaces."""
    return PoisonSet(str(trigger.meta.get("attack", "clean-label trigger")), rows, poisons, labels[rows],
                     trigger.target, dataset_fingerprint(images, labels)[:20],
                     {"epsilon": trigger.epsilon, "poisons": len(rows), "selection": selection},
                     test_trigger=trigger, test_amplify=test_amplify)


def clean_label_poison(images: np.ndarray, labels: np.ndarray, trigger: Trigger, count: int, seed: int, *,
                       test_amplify: float = 1.0) -> PoisonSet:
    """Add `trigger` to `count` randomly chosen images of its target class; labels stay as they are."""
    rows = _target_rows(labels, trigger.target, count, seed, f"poison {count} images")
    return _poison_set(images, labels, trigger, rows, trigger.apply(images[rows]),
                       "the victim's own target-class images, at random", test_amplify)


def contribute_poisons(images: np.ndarray, labels: np.ndarray, trigger: Trigger, contributed_u8: np.ndarray,
                       seed: int, *, test_amplify: float = 1.0) -> PoisonSet:
    """The attacker's own target-class images, with the trigger, take the place of randomly chosen
    target-class rows of the victim's set: the class sizes and every label stay as they were."""
    count = len(contributed_u8)
    rows = _target_rows(labels, trigger.target, count, seed, f"place {count} poisons")
    if contributed_u8.shape[1:] != images.shape[1:]:
        raise InputError(f"contributed images are {contributed_u8.shape[1:]}, the training set {images.shape[1:]}")
    return _poison_set(images, labels, trigger, rows, trigger.apply(contributed_u8),
                       "the attacker's own target-class images", test_amplify)
