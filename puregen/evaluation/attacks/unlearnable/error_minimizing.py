"""Error-minimising noise, sample-wise and class-wise.

Huang et al., "Unlearnable Examples: Making Personal Data Unexploitable"
(ICLR 2021). Adversarial examples *maximise* a model's loss; this noise
*minimises* it: it makes each training image so easy to fit that a model
trained on it has nothing left to learn from the image itself, and so
learns the noise and fails on clean test images. The bi-level min-min
problem

    min_theta  E_(x, y)  min_{||delta||_inf <= eps}  L(f_theta(x + delta), y)

is solved by alternation, as in the paper's algorithm:

1. train the model `train_steps` (the paper's M = 10) SGD steps on the
   currently perturbed data;
2. for every training image, `pgd_steps` (20) signed-gradient steps of size
   `step_size` (eps / 10) that *lower* the loss with respect to the noise,
   projected onto the L-inf ball and the pixel range;
3. stop once the model classifies at least `stop_accuracy` (99%) of the
   perturbed training set correctly, or after `max_rounds`.

Sample-wise noise is one delta per image. Class-wise noise is one delta per
class, shared by its images: the loss of a batch is minimised over the
class deltas it touches, so each moves by the sign of the gradient summed
over its images in the batch.

Our choices (the paper uses ResNet-18 on CIFAR-10 with SGD, lr 0.1): the
crafting model is the repo's classifier of `arch` (the victim's by default
in the suite) trained with the paper's SGD settings and without
augmentation; the noise starts uniform in [-eps, eps], is optimised in
float pixel units and is rounded to whole uint8 levels inside the budget at
the end (the stored accuracy, `train_accuracy_stored`, is measured on the
rounded images).
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
from ....models.classifiers import build_classifier
from ....training.classifier import in_classifier_layout
from ....training.loop import Progress, batch_indices
from .budgets import add_levels, change_stats, check_images_labels, linf_levels, linf_noise_levels


@dataclass
class ErrorMinimizingRecipe:
    epsilon: float = 8 / 255  # L-inf budget, pixel units
    class_wise: bool = False
    step_size: float = 0.8 / 255  # PGD step, pixel units (the paper's eps / 10)
    pgd_steps: int = 20
    train_steps: int = 10  # model steps per round
    stop_accuracy: float = 0.99  # on the perturbed training set
    max_rounds: int = 20
    arch: str = "small-cnn"  # the crafting model, when none is passed in
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check(self) -> None:
        linf_levels(self.epsilon)
        if not (0 < self.step_size <= self.epsilon and math.isfinite(self.step_size)):
            raise InputError(f"error-minimising step_size must be in (0, epsilon], got {self.step_size}")
        for name in ("pgd_steps", "train_steps", "max_rounds", "batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"error-minimising {name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.stop_accuracy <= 1:
            raise InputError(f"error-minimising stop_accuracy must be in (0, 1], got {self.stop_accuracy}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise InputError(f"error-minimising lr must be positive, got {self.lr}")


class _Noise:
    """The noise being optimised (pixel units, NCHW) and how it reaches a batch of images."""

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor, num_classes: int, recipe: ErrorMinimizingRecipe):
        self.pixels, self.labels, self.recipe = pixels, labels, recipe
        rows = num_classes if recipe.class_wise else len(pixels)
        g = torch.Generator().manual_seed(recipe.seed)
        self.delta = (torch.rand((rows, *pixels.shape[1:]), generator=g) * 2 - 1) * recipe.epsilon

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        return self.labels[idx] if self.recipe.class_wise else idx

    def images(self, idx: torch.Tensor, delta: torch.Tensor | None = None) -> torch.Tensor:
        """Model-space perturbed images of rows `idx`. `delta` stands in for the stored noise: all the class
        deltas (class-wise), or the batch's own rows (sample-wise)."""
        if delta is None:
            d = self.delta[self.rows(idx)]
        else:
            d = delta[self.labels[idx]] if self.recipe.class_wise else delta
        return in_classifier_layout(((self.pixels[idx] + d).clamp(0, 1)) * 2 - 1)

    def project(self, delta: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        delta = delta.clamp(-self.recipe.epsilon, self.recipe.epsilon)
        if idx is None:  # class-wise: one delta serves many images; the pixel range is clipped when applied
            return delta
        return (self.pixels[idx] + delta).clamp(0, 1) - self.pixels[idx]


def _train_model(model, opt, noise: _Noise, labels: torch.Tensor, recipe: ErrorMinimizingRecipe, step: int) -> int:
    model.train()
    n = len(labels)
    for _ in range(recipe.train_steps):
        idx = batch_indices(n, recipe.batch_size, step, recipe.seed)
        loss = F.cross_entropy(model(noise.images(idx)), labels[idx])
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"crafting model's loss became {loss.item()} at step {step}; lower the lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
    return step


def _minimise_noise(model, noise: _Noise, labels: torch.Tensor, recipe: ErrorMinimizingRecipe) -> None:
    """One pass of PGD over the whole training set, lowering the loss with respect to the noise."""
    model.eval()  # batch statistics must not follow the noise
    model.requires_grad_(False)
    try:
        for s in range(0, len(labels), recipe.batch_size):
            idx = torch.arange(s, min(s + recipe.batch_size, len(labels)))
            delta = noise.delta.clone() if recipe.class_wise else noise.delta[idx].clone()
            for _ in range(recipe.pgd_steps):
                delta.requires_grad_(True)
                loss = F.cross_entropy(model(noise.images(idx, delta)), labels[idx])
                (grad,) = torch.autograd.grad(loss, delta)
                with torch.no_grad():  # descend: the noise makes the images easier, not harder
                    delta = noise.project(delta - recipe.step_size * grad.sign(), None if recipe.class_wise else idx)
            if recipe.class_wise:
                noise.delta = delta.detach()
            else:
                noise.delta[idx] = delta.detach()
    finally:
        model.requires_grad_(True)


@torch.no_grad()
def _accuracy(model, noise: _Noise, labels: torch.Tensor, batch_size: int) -> float:
    model.eval()
    hits = 0
    for s in range(0, len(labels), batch_size):
        idx = torch.arange(s, min(s + batch_size, len(labels)))
        hits += int((model(noise.images(idx)).argmax(1) == labels[idx]).sum())
    return hits / len(labels)


def craft_error_minimizing(images: np.ndarray, labels: np.ndarray, recipe: ErrorMinimizingRecipe | None = None, *,
                           num_classes: int | None = None, model: nn.Module | None = None,
                           progress: bool = True) -> tuple[np.ndarray, dict]:
    """Error-minimising noise on every image; returns (uint8 poisoned images, metadata).

    `model` is a freshly initialised network to craft with (it is trained here); by default one of
    `recipe.arch` seeded with `recipe.seed`."""
    t0 = time.perf_counter()
    recipe = recipe or ErrorMinimizingRecipe()
    recipe.check()
    labels_np, num_classes = check_images_labels(images, labels, num_classes)
    pixels = (to_model_space(images, "images") + 1) / 2
    y = torch.from_numpy(labels_np)
    if model is None:
        torch.manual_seed(recipe.seed)
        model = build_classifier(recipe.arch, images.shape[3], num_classes)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                          weight_decay=recipe.weight_decay)
    noise = _Noise(pixels, y, num_classes, recipe)
    bar = Progress(recipe.max_rounds, 0, f"error-minimising noise ({'class' if recipe.class_wise else 'sample'})",
                   len(y), progress)
    step, acc, history = 0, 0.0, []
    for r in range(recipe.max_rounds):
        step = _train_model(model, opt, noise, y, recipe, step)
        _minimise_noise(model, noise, y, recipe)
        acc = _accuracy(model, noise, y, recipe.batch_size)
        history.append(round(acc, 4))
        bar.update(r, train_acc=acc)
        if acc >= recipe.stop_accuracy:
            break
    bar.close()
    delta = noise.delta.permute(0, 2, 3, 1).numpy()
    levels = linf_noise_levels(delta, recipe.epsilon)
    poisoned = add_levels(images, levels[labels_np] if recipe.class_wise else levels)
    noise.delta = torch.zeros_like(noise.delta)  # measure the stored uint8 images themselves
    noise.pixels = (to_model_space(poisoned) + 1) / 2
    stored = _accuracy(model, noise, y, recipe.batch_size)
    name = "em-class" if recipe.class_wise else "em-sample"
    info = {"attack": name, "paper": "Huang et al., Unlearnable Examples, ICLR 2021", "norm": "linf",
            "budget": recipe.epsilon, "budget_levels": linf_levels(recipe.epsilon), "budget_unit": "pixel units",
            "class_wise": recipe.class_wise, "recipe": recipe.to_dict(), "num_classes": num_classes,
            "rounds": len(history), "reached_stop_accuracy": acc >= recipe.stop_accuracy, "train_accuracy": history,
            "train_accuracy_stored": round(stored, 4), **change_stats(images, poisoned),
            "crafting_seconds": round(time.perf_counter() - t0, 2)}
    return poisoned, info
