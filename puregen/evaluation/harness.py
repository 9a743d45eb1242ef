"""The demo's harness: purify a (poisoned) training set, train a classifier per defense and seed, measure.

Natural accuracy is measured on the clean test set. Poison success is the
share of test images *not* of the target class that the model assigns to the
target class once the trigger (times `amplify`) is added to them.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..data import to_model_space
from ..engine.progress import image_progress_bar
from ..engine.purifiers import Purifier
from ..training.classifier import ClassifierRecipe, predict, train_classifier
from .report import Row
from .triggers import Trigger


def purify_images(purifier: Purifier, images_u8: np.ndarray, *, seed: int, batch_size: int = 64,
                  progress: bool = True, desc: str = "purify") -> np.ndarray:
    """Purify uint8 NHWC images in batches with a progress bar; row i is keyed by index i."""
    bar = image_progress_bar(len(images_u8), desc, progress)
    batches = (images_u8[s : s + batch_size] for s in range(0, len(images_u8), batch_size))
    parts = []
    for out in purifier.purify_stream(batches, seed=seed):
        parts.append(out)
        if bar is not None:
            bar.update(len(out))
    if bar is not None:
        bar.close()
    return np.concatenate(parts)


@dataclass
class EvalSet:
    """The clean test images in model space and the triggered non-target ones, built once."""

    clean: torch.Tensor
    labels: torch.Tensor
    triggered: torch.Tensor
    target: int

    @classmethod
    def build(cls, images_u8: np.ndarray, labels: np.ndarray, trigger: Trigger, amplify: float) -> EvalSet:
        others = labels != trigger.target
        return cls(
            clean=to_model_space(images_u8, "test images"),
            labels=torch.from_numpy(labels.astype(np.int64)),
            triggered=to_model_space(trigger.apply(images_u8[others], amplify), "triggered test images"),
            target=trigger.target,
        )


def measure(model, test: EvalSet, precision: str = "fp32") -> tuple[float, float]:
    """(natural accuracy, poison success) of a trained classifier, as fractions."""
    natural = float((predict(model, test.clean, precision=precision) == test.labels).float().mean())
    success = float((predict(model, test.triggered, precision=precision) == test.target).float().mean())
    return natural, success


def evaluate_defenses(training_sets: dict[str, np.ndarray], labels: np.ndarray, test: EvalSet,
                      seeds: list[int], recipe: ClassifierRecipe, *, attack: str, progress: bool = True,
                      num_classes: int = 10) -> list[Row]:
    """Train one classifier per (defense, seed) on that defense's training set and measure it; the rows
    name `attack`, the backdoor behind `test`, as `puregen eval`'s rows do."""
    y = torch.from_numpy(labels.astype(np.int64))
    results = []
    for name, images in training_sets.items():
        x = to_model_space(images, f"{name} training set")
        for seed in seeds:
            t0 = time.perf_counter()
            model = train_classifier(x, y, num_classes, dataclasses.replace(recipe, seed=seed),
                                     progress=progress, desc=f"train [{name}, seed {seed}]")
            seconds = time.perf_counter() - t0
            natural, success = measure(model, test, recipe.precision)
            results.append(Row(attack, 0, name, seed, natural, success, seconds, adversarial_class=test.target))
    return results
