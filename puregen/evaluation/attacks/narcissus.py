"""Narcissus: a clean-label backdoor trigger crafted from the target class alone.

Zeng et al., "Narcissus: A Practical Clean-Label Backdoor Attack with Limited
Information" (CCS 2023). The attacker knows only some images of the target
class and public out-of-distribution (POOD) data:

1. train a surrogate classifier on the POOD classes plus the target class as
   one extra class (the paper pre-trains on POOD, then fine-tunes with the
   target class; one training run on the union is our simplification);
2. find the perturbation inside the L-inf budget that makes the surrogate
   most confident that target-class images belong to the target class: it
   becomes the target class's most "persuasive" feature;
3. add it to a few target-class training images (labels unchanged). At test
   time the trigger, optionally amplified (the paper uses x3), is added to
   images of other classes.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ...data import to_model_space
from ...training.classifier import ClassifierRecipe, augment, train_classifier
from ...training.loop import Progress
from ...training.state import step_generator
from ..triggers import Trigger


@dataclass
class NarcissusRecipe:
    epsilon: float = 16 / 255  # L-inf budget in [0, 1] pixel units
    surrogate_epochs: int = 15
    trigger_steps: int = 400
    batch_size: int = 128
    # Signed-gradient steps start at this fraction of epsilon and decay with a cosine to zero.
    step_fraction: float = 0.25
    seed: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def train_surrogate(pood: torch.Tensor, pood_labels: torch.Tensor, target_images: torch.Tensor,
                    num_pood_classes: int, recipe: NarcissusRecipe, progress: bool = True):
    """A small CNN over the POOD classes plus the target class (label `num_pood_classes`)."""
    images = torch.cat([pood, target_images])
    labels = torch.cat([pood_labels, torch.full((len(target_images),), num_pood_classes, dtype=torch.int64)])
    clf = ClassifierRecipe(epochs=recipe.surrogate_epochs, seed=recipe.seed)
    return train_classifier(images, labels, num_pood_classes + 1, clf, progress=progress, desc="narcissus surrogate")


def optimise_trigger(surrogate, target_images: torch.Tensor, surrogate_label: int, recipe: NarcissusRecipe,
                     progress: bool = True) -> torch.Tensor:
    """The perturbation (model-space units, i.e. 2x pixel units) minimising the surrogate's target loss."""
    surrogate.eval().requires_grad_(False)
    budget = 2 * recipe.epsilon  # model space spans [-1, 1]
    delta = torch.zeros((1, *target_images.shape[1:]))
    labels = torch.full((recipe.batch_size,), surrogate_label, dtype=torch.int64)
    bar = Progress(recipe.trigger_steps, 0, "narcissus trigger", recipe.batch_size, progress)
    for step in range(recipe.trigger_steps):
        g = step_generator(recipe.seed + 1, step)
        idx = torch.randint(0, len(target_images), (recipe.batch_size,), generator=g)
        delta.requires_grad_(True)
        poisoned = (target_images[idx] + delta).clamp(-1, 1)
        loss = F.cross_entropy(surrogate(augment(poisoned, 2, True, g)), labels)
        (grad,) = torch.autograd.grad(loss, delta)
        alpha = recipe.step_fraction * budget * 0.5 * (1 + np.cos(np.pi * step / recipe.trigger_steps))
        delta = (delta.detach() - alpha * grad.sign()).clamp(-budget, budget)
        bar.update(step, loss=loss.item())
    bar.close()
    return delta[0]


def craft_narcissus(pood_u8: np.ndarray, pood_labels: np.ndarray, target_u8: np.ndarray, target: int,
                    recipe: NarcissusRecipe, *, progress: bool = True, meta: dict | None = None) -> Trigger:
    """Craft a Narcissus trigger for class `target` from POOD data and target-class images (uint8 NHWC)."""
    t0 = time.perf_counter()
    torch.manual_seed(recipe.seed)
    pood = to_model_space(pood_u8, "POOD images")
    targets = to_model_space(target_u8, "target-class images")
    num_pood = int(pood_labels.max()) + 1
    surrogate = train_surrogate(pood, torch.from_numpy(pood_labels.astype(np.int64)), targets, num_pood,
                                recipe, progress)
    delta = optimise_trigger(surrogate, targets, num_pood, recipe, progress)
    # Model-space units back to pixel units; the clamp absorbs float rounding at the budget's edge.
    pixels = (delta / 2).clamp(-recipe.epsilon, recipe.epsilon).permute(1, 2, 0).numpy().astype(np.float32)
    info = {"attack": "narcissus", "recipe": recipe.to_dict(), "target_images": len(target_u8),
            "pood_images": len(pood_u8), "crafting_seconds": round(time.perf_counter() - t0, 1), **(meta or {})}
    return Trigger(pixels, recipe.epsilon, target, info)
