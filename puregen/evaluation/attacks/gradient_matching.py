"""Gradient matching: a targeted clean-label poison ("Witches' Brew").

Geiping et al., "Witches' Brew: Industrial Scale Data Poisoning via Gradient
Matching" (ICLR 2021). The attacker wants one target test image (true class
A) to be classified as an adversarial class B by a model trained from scratch
on the poisoned training set. It may perturb a few training images of class B
(their labels stay B) within an L-inf budget:

1. train a model on clean data (the attacker's own copy of the victim);
2. compute the adversarial gradient: the parameter gradient of the loss of the
   target image labelled B. A training step along it would move the target
   towards B;
3. perturb the poisons so that the training gradient on them (with their
   honest labels) points the same way, minimising 1 - cosine similarity
   between the two gradients over all parameters. Training on the poisons then
   takes steps that also push the target towards B.

The perturbation is optimised with signed Adam, under differentiable data
augmentation (so the alignment survives the victim's augmentation), with the
published step decay and random restarts (the restart with the lowest final
loss is kept), projecting to the budget and the valid pixel range every step.
"""

from __future__ import annotations

import dataclasses
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...data import from_model_space, to_model_space
from ...errors import InputError
from ...training.classifier import augment
from ...training.loop import Progress
from ...training.state import step_generator

# The paper's differentiable augmentation for small images: random crops of a padded image and flips.
AUG_PADDING = 2
AUG_FLIP = True
# Step decay by 10x at these fractions of the steps, as published.
LR_MILESTONES = (3 / 8, 5 / 8, 7 / 8)


@dataclass
class GradientMatchingRecipe:
    epsilon: float = 16 / 255  # L-inf budget in [0, 1] pixel units
    # The paper uses 240 steps and 8 restarts on GPUs; 30 steps craft one small-scale target (100 poisons,
    # small CNN, 28x28) in ~14 s of one CPU core.
    steps: int = 30
    restarts: int = 1
    # The signed-Adam step as a fraction of epsilon (the paper's tau = 0.1). With few steps 0.3 reaches a lower
    # loss (30 steps on Fashion-MNIST: 0.23 at 0.1, 0.16 at 0.3).
    lr: float = 0.1
    augment: bool = True
    # Poisons whose gradient is matched together; more poisons than this are crafted batch by batch, as published.
    batch_size: int = 128
    seed: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _trainable(model: nn.Module) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InputError("gradient matching needs a model with trainable parameters (all have requires_grad off)")
    return params


def adversarial_gradient(model: nn.Module, target: torch.Tensor, adversarial_class: int) -> list[torch.Tensor]:
    """The parameter gradient of the loss of `target` (model space, CHW or 1CHW) labelled `adversarial_class`."""
    params = _trainable(model)
    if target.ndim == 3:
        target = target[None]
    if target.ndim != 4 or target.shape[0] != 1:
        raise InputError(f"the target must be one image (CHW or 1CHW), got shape {tuple(target.shape)}")
    label = torch.tensor([adversarial_class], dtype=torch.int64)
    loss = F.cross_entropy(model(target.detach()).float(), label)
    return [g.detach() for g in torch.autograd.grad(loss, params)]


def gradient_matching_loss(model: nn.Module, poisons: torch.Tensor, poison_labels: torch.Tensor,
                           target_grad: list[torch.Tensor]) -> torch.Tensor:
    """1 - cosine similarity between the poisons' training gradient and `target_grad`, over all parameters.

    `poisons` are model-space images (NCHW in [-1, 1]); the result is differentiable in them. Call it with the
    model in eval mode: the attacker matches the gradient of a fixed network, BatchNorm statistics included.
    """
    params = _trainable(model)
    if len(target_grad) != len(params) or any(t.shape != p.shape for t, p in zip(target_grad, params)):
        raise InputError("target_grad does not match the model's trainable parameters; "
                         "compute it with adversarial_gradient on the same model")
    # NCHW even for channels_last classifiers: the double backward ran slower in channels_last (a 30-step
    # small-scale target took 5.4 s instead of 4.4 s on 2 cores, with identical poisons).
    loss = F.cross_entropy(model(poisons).float(), poison_labels)
    # create_graph: the cosine is optimised through the gradient itself (a second-order derivative in the poisons).
    grads = torch.autograd.grad(loss, params, create_graph=True)
    dot = sum((g * t).sum() for g, t in zip(grads, target_grad))
    poison_norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
    target_norm = torch.sqrt(sum(t.pow(2).sum() for t in target_grad))
    return 1 - dot / (poison_norm * target_norm).clamp_min(1e-12)


def _check_recipe(recipe: GradientMatchingRecipe) -> None:
    if not (math.isfinite(recipe.epsilon) and 0 < recipe.epsilon <= 1):
        raise InputError(f"gradient matching: epsilon must be in (0, 1] pixel units, got {recipe.epsilon}")
    if not (math.isfinite(recipe.lr) and recipe.lr > 0):
        raise InputError(f"gradient matching: lr must be a positive fraction of epsilon, got {recipe.lr}")
    for name in ("steps", "restarts", "batch_size"):
        value = getattr(recipe, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"gradient matching: {name} must be a positive integer, got {value!r}")


def _check_images(poisons_u8, poison_labels, target_u8) -> tuple[np.ndarray, torch.Tensor]:
    """The target as a 1HWC batch and the labels as an int64 tensor (a copy: the caller's array is untouched)."""
    for name, arr in (("poison images", poisons_u8), ("target image", target_u8)):
        if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8:
            raise InputError(f"gradient matching: the {name} must be a uint8 numpy array, "
                             f"got {getattr(arr, 'dtype', type(arr).__name__)}")
    if poisons_u8.ndim != 4 or len(poisons_u8) == 0:
        raise InputError(f"gradient matching: poison images must be a non-empty NHWC batch, got {poisons_u8.shape}")
    target = target_u8[None] if target_u8.ndim == 3 else target_u8
    if target.shape != (1, *poisons_u8.shape[1:]):
        raise InputError(f"gradient matching: the target image has shape {target_u8.shape}; expected one image "
                         f"shaped like the poisons, {poisons_u8.shape[1:]}")
    if not isinstance(poison_labels, np.ndarray) or poison_labels.dtype.kind not in "iu":
        raise InputError(f"gradient matching: poison labels must be an integer numpy array, "
                         f"got {getattr(poison_labels, 'dtype', type(poison_labels).__name__)}")
    if poison_labels.shape != (len(poisons_u8),):
        raise InputError(f"gradient matching: {len(poisons_u8)} poison images but poison labels of shape "
                         f"{poison_labels.shape}")
    return target, torch.from_numpy(poison_labels.astype(np.int64))


def _check_classes(num_classes: int, labels: torch.Tensor, adversarial_class) -> None:
    if isinstance(adversarial_class, bool) or not isinstance(adversarial_class, (int, np.integer)) \
            or not 0 <= adversarial_class < num_classes:
        raise InputError(f"gradient matching: the adversarial class must be an integer in [0, {num_classes}) "
                         f"(the model's outputs), got {adversarial_class!r}")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise InputError(f"gradient matching: poison labels must be in [0, {num_classes}), "
                         f"got {int(labels.min())}..{int(labels.max())}")


@contextmanager
def _frozen_for_matching(model: nn.Module):
    """Eval mode (fixed BatchNorm statistics) with gradients enabled; the caller's settings come back after.

    Gradients are taken with torch.autograd.grad, so the parameters' .grad is never written."""
    training, flags = model.training, [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(True)
    try:
        yield
    finally:
        model.train(training)
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


def _batches(n: int, batch_size: int) -> list[slice]:
    return [slice(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def _matching_loss(model, poisons, labels, target_grad, batch_size) -> float:
    """The mean loss over the poison batches, without augmentation (comparable across restarts)."""
    losses = [gradient_matching_loss(model, poisons[b], labels[b], target_grad).item()
              for b in _batches(len(poisons), batch_size)]
    return float(np.mean(losses))


def _project(delta: torch.Tensor, clean: torch.Tensor, budget: float) -> torch.Tensor:
    """Inside the L-inf budget and such that clean + delta stays a valid image."""
    return (clean + delta.clamp(-budget, budget)).clamp(-1, 1) - clean


def _craft_restart(model, clean, labels, target_grad, recipe: GradientMatchingRecipe, restart: int,
                   bar: Progress) -> torch.Tensor:
    """One signed-Adam run from a random start; returns the projected perturbation (model-space units)."""
    budget = 2 * recipe.epsilon  # model space spans [-1, 1]
    init = torch.rand(clean.shape, generator=step_generator(recipe.seed + 1, restart))
    delta = _project((2 * init - 1) * budget, clean, budget).requires_grad_(True)
    opt = torch.optim.Adam([delta], lr=recipe.lr * budget)
    milestones = sorted({max(int(f * recipe.steps), 1) for f in LR_MILESTONES})
    schedule = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=0.1)
    batches = _batches(len(clean), recipe.batch_size)
    for step in range(recipe.steps):
        g = step_generator(recipe.seed, restart * recipe.steps + step)
        grad, total = torch.zeros_like(delta), 0.0
        for b in batches:
            x = clean[b] + delta[b]
            if recipe.augment:
                x = augment(x, AUG_PADDING, AUG_FLIP, g)
            loss = gradient_matching_loss(model, x, labels[b], target_grad)
            grad += torch.autograd.grad(loss, delta)[0]
            total += loss.item() / len(batches)
        # Signed Adam: Adam's moments see only the sign, so every pixel moves at the same pace whatever its scale.
        delta.grad = grad.sign()
        opt.step()
        schedule.step()
        with torch.no_grad():
            delta.copy_(_project(delta, clean, budget))
        bar.update(restart * recipe.steps + step, loss=total)
    return delta.detach()


def _quantize(clean_u8: np.ndarray, poisoned: torch.Tensor, epsilon: float) -> np.ndarray:
    """uint8 images, clipped so that rounding never takes a pixel past the budget."""
    levels = int(round(epsilon * 255))
    u8 = from_model_space(poisoned).numpy().astype(np.int16)
    base = clean_u8.astype(np.int16)
    return np.clip(u8, base - levels, base + levels).clip(0, 255).astype(np.uint8)


def craft_gradient_matching(model: nn.Module, poisons_u8: np.ndarray, poison_labels: np.ndarray,
                            target_u8: np.ndarray, adversarial_class: int, recipe: GradientMatchingRecipe, *,
                            progress: bool = True) -> tuple[np.ndarray, dict]:
    """Perturb `poisons_u8` (uint8 NHWC, labels unchanged) so that training on them moves `target_u8` (one
    uint8 HWC or 1HWC image) towards `adversarial_class`; `model` is the attacker's model trained on clean data.

    Returns the poisoned uint8 images (each pixel within round(epsilon * 255) levels of the original) and a
    description of the crafting: the matching loss of the clean poisons (`loss_start`), of the returned
    poisons (`loss_end`) and of every restart's final poisons before rounding (`restart_losses`).
    """
    t0 = time.perf_counter()
    _check_recipe(recipe)
    target_batch, labels = _check_images(poisons_u8, poison_labels, target_u8)
    clean = to_model_space(poisons_u8, "poison images")
    target = to_model_space(target_batch, "target image")
    with _frozen_for_matching(model):
        with torch.no_grad():
            num_classes = model(target).shape[1]
        _check_classes(num_classes, labels, adversarial_class)
        target_grad = adversarial_gradient(model, target, int(adversarial_class))
        loss_start = _matching_loss(model, clean, labels, target_grad, recipe.batch_size)
        bar = Progress(recipe.steps * recipe.restarts, 0, "gradient matching", len(clean), progress)
        best, best_loss, restart_losses = None, math.inf, []
        for restart in range(recipe.restarts):
            delta = _craft_restart(model, clean, labels, target_grad, recipe, restart, bar)
            loss = _matching_loss(model, clean + delta, labels, target_grad, recipe.batch_size)
            restart_losses.append(round(loss, 6))
            if loss < best_loss:
                best, best_loss = delta, loss
        bar.close()
        poisoned = _quantize(poisons_u8, clean + best, recipe.epsilon)
        loss_end = _matching_loss(model, to_model_space(poisoned), labels, target_grad, recipe.batch_size)
    info = {"attack": "gradient-matching", "recipe": recipe.to_dict(), "poisons": len(poisons_u8),
            "adversarial_class": int(adversarial_class), "loss_start": round(loss_start, 6),
            "loss_end": round(loss_end, 6), "restart_losses": restart_losses,
            "crafting_seconds": round(time.perf_counter() - t0, 1)}
    return poisoned, info
