"""Targeted adversarial poisoning (TAP).

Fowl et al., "Adversarial Examples Make Strong Poisons" (NeurIPS 2021).
Train a model on the clean set, then turn every training image into a
*targeted* adversarial example for it: pushed, inside an L-inf budget,
towards another class fixed by a permutation of the labels (y -> y + 1 mod
K here), and keep the true label. The perturbations carry features of the
target class that a network picks up and that do not occur in clean images,
so a model trained on the set fits them and does badly on clean test data.

PGD with signed-gradient steps descending the cross-entropy towards the
permuted class, projected onto the budget and the pixel range after every
step. Our choices: no random start (the poisons are a function of the model
alone), the step size defaults to 2.5 * epsilon / steps (the rule of Madry
et al.), and the paper's differentiable augmentation and model ensembles
are left out. The paper's budget, 8/255, is the default; the paper runs 250
steps, and so do we.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ....data import to_model_space
from ....errors import InputError
from ....training.classifier import in_classifier_layout
from ....training.loop import Progress
from .budgets import add_levels, change_stats, check_images_labels, linf_levels, linf_noise_levels


@dataclass
class AdversarialPoisonRecipe:
    epsilon: float = 8 / 255  # L-inf budget, pixel units
    steps: int = 250
    step_size: float | None = None  # pixel units; None: 2.5 * epsilon / steps
    class_shift: int = 1  # the label permutation: y -> (y + class_shift) mod K
    batch_size: int = 256

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check(self, num_classes: int) -> None:
        linf_levels(self.epsilon)
        if self.steps < 1 or self.batch_size < 1:
            raise InputError(f"adversarial poisoning steps and batch_size must be at least 1, got {self.steps}, "
                             f"{self.batch_size}")
        if self.step_size is not None and not (self.step_size > 0 and math.isfinite(self.step_size)):
            raise InputError(f"adversarial poisoning step_size must be positive, got {self.step_size}")
        if self.class_shift % num_classes == 0:
            raise InputError(f"class_shift {self.class_shift} maps every class to itself with {num_classes} classes")

    def step(self) -> float:
        return self.step_size if self.step_size is not None else 2.5 * self.epsilon / self.steps


def _attack_batch(model: nn.Module, clean: torch.Tensor, targets: torch.Tensor, recipe: AdversarialPoisonRecipe):
    delta = torch.zeros_like(clean)
    for _ in range(recipe.steps):
        delta.requires_grad_(True)
        x = in_classifier_layout((clean + delta) * 2 - 1)
        loss = F.cross_entropy(model(x), targets)
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():  # towards the target class: descend its loss
            delta = (delta - recipe.step() * grad.sign()).clamp(-recipe.epsilon, recipe.epsilon)
            delta = (clean + delta).clamp(0, 1) - clean
    return delta.detach()


def craft_adversarial_poisons(model: nn.Module, images: np.ndarray, labels: np.ndarray,
                              recipe: AdversarialPoisonRecipe | None = None, *, num_classes: int | None = None,
                              progress: bool = True) -> tuple[np.ndarray, dict]:
    """Every image as a targeted adversarial example of `model` (trained on the clean set) towards class
    y + class_shift; returns (uint8 poisoned images, metadata). The labels are not changed."""
    t0 = time.perf_counter()
    recipe = recipe or AdversarialPoisonRecipe()
    labels_np, num_classes = check_images_labels(images, labels, num_classes)
    recipe.check(num_classes)
    pixels = (to_model_space(images, "images") + 1) / 2
    targets = torch.from_numpy((labels_np + recipe.class_shift) % num_classes)
    was_training = model.training
    model.eval()
    model.requires_grad_(False)
    delta = torch.empty_like(pixels)
    batches = range(0, len(pixels), recipe.batch_size)
    bar = Progress(len(batches), 0, "adversarial poisons", recipe.batch_size, progress)
    hits = 0
    try:
        for i, s in enumerate(batches):
            rows = slice(s, s + recipe.batch_size)
            delta[rows] = _attack_batch(model, pixels[rows], targets[rows], recipe)
            bar.update(i)
        levels = linf_noise_levels(delta.permute(0, 2, 3, 1).numpy(), recipe.epsilon)
        poisoned = add_levels(images, levels)
        with torch.no_grad():  # how many stored poisons the crafting model puts in their target class
            for s in batches:
                x = in_classifier_layout(to_model_space(poisoned[s : s + recipe.batch_size]))
                hits += int((model(x).argmax(1) == targets[s : s + recipe.batch_size]).sum())
    finally:
        bar.close()
        model.requires_grad_(True)
        model.train(was_training)
    info = {"attack": "tap", "paper": "Fowl et al., Adversarial Examples Make Strong Poisons, NeurIPS 2021",
            "norm": "linf", "budget": recipe.epsilon, "budget_levels": linf_levels(recipe.epsilon),
            "budget_unit": "pixel units", "class_wise": False, "recipe": recipe.to_dict(),
            "num_classes": num_classes, "target_rule": f"(y + {recipe.class_shift}) mod {num_classes}",
            "reach_target_rate": round(hits / len(images), 4), **change_stats(images, poisoned),
            "crafting_seconds": round(time.perf_counter() - t0, 2)}
    return poisoned, info
