"""Classifier training for the evaluation harness (SGD + momentum, cosine, crop/flip augmentation)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..models.classifiers import build_classifier
from .loop import (
    Progress,
    StopSignals,
    TrainingData,
    autocast,
    batch_indices,
    check_precision,
    concrete_precision,
    cosine_with_warmup,
    open_run,
    prepare_run,
    save_run,
    set_lr,
    stop_step,
)
from .state import step_generator


@dataclass
class ClassifierRecipe:
    arch: str = "small-cnn"
    epochs: int = 8
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    crop_padding: int = 2
    flip: bool = True
    seed: int = 0
    # "bf16": autocast the forward and backward to bfloat16 (weights stay fp32); about 2.5x faster on CPUs
    # with AVX512-BF16 or AMX, slower without. "auto" picks by that rule (loop.fastest_training_precision); a
    # run folder fixes it when the run starts and records it in the recipe.
    precision: str = "fp32"
    # Bernoulli noise added to every augmented batch, drawn afresh each step: each pixel moves by
    # +input_noise or -input_noise (pixel units, so 8/255 is 8 levels) with equal odds, the kind FrieNDs
    # (Liu et al., NeurIPS 2022) trains with. 0 = off.
    input_noise: float = 0.0
    # PGD adversarial training (Madry et al., ICLR 2018): every batch is replaced by its L-inf PGD adversarial
    # examples under the current model, from a uniform random start, with `adversarial_steps` signed-gradient
    # steps of `adversarial_step_size` (default 2.5 eps / steps, Madry's rule). Budget in pixel units; 0 = off.
    # The auxiliary network of adversarially guided purification is trained this way.
    adversarial_epsilon: float = 0.0
    adversarial_steps: int = 10
    adversarial_step_size: float | None = None

    @classmethod
    def preset(cls, name: str) -> ClassifierRecipe:
        if name == "small":
            return cls()
        if name == "paper":  # CIFAR-10 ResNet-18
            return cls(arch="resnet18", epochs=200, batch_size=128, lr=0.1, crop_padding=4)
        if name == "tiny":
            return cls(epochs=1, batch_size=16)
        raise InputError(f"unknown classifier preset {name!r}; choose small, paper or tiny")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if not d["input_noise"]:  # absent when off: run folders written before the field still resume
            del d["input_noise"]
        if not d["adversarial_epsilon"]:  # likewise
            for k in ("adversarial_epsilon", "adversarial_steps", "adversarial_step_size"):
                del d[k]
        return d

    def check(self) -> None:
        if not (math.isfinite(self.adversarial_epsilon) and 0 <= self.adversarial_epsilon <= 1):
            raise InputError(f"--adversarial must be an L-inf budget in [0, 1] pixel units, got "
                             f"{self.adversarial_epsilon}")
        if self.adversarial_epsilon and self.adversarial_steps < 1:
            raise InputError(f"--adversarial-steps must be at least 1, got {self.adversarial_steps}")
        if self.adversarial_step_size is not None and not 0 < self.adversarial_step_size <= 1:
            raise InputError(f"the adversarial step size must be in (0, 1] pixel units, got "
                             f"{self.adversarial_step_size}")


def augment(x: torch.Tensor, padding: int, flip: bool, g: torch.Generator) -> torch.Tensor:
    """Random crops of a reflect-padded batch and random horizontal flips (one draw per image)."""
    n, _, h, w = x.shape
    if padding:
        padded = F.pad(x, (padding,) * 4, mode="reflect")
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=g)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=g)
        rows = (dy[:, None] + torch.arange(h)[None]).view(n, 1, h, 1).expand(n, x.shape[1], h, w + 2 * padding)
        x = padded.gather(2, rows)
        cols = (dx[:, None] + torch.arange(w)[None]).view(n, 1, 1, w).expand(n, x.shape[1], h, w)
        x = x.gather(3, cols)
    if flip:
        mask = torch.rand(n, generator=g) < 0.5
        x = torch.where(mask.view(n, 1, 1, 1), x.flip(3), x)
    return x


def pgd_examples(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilon: float, steps: int,
                 step_size: float | None, g: torch.Generator, precision: str = "fp32") -> torch.Tensor:
    """L-inf PGD adversarial examples of model-space images (budget `epsilon` in pixel units: twice that in
    model space), from a uniform start drawn from `g`; the model's mode (train/eval) is left as it was."""
    eps = 2 * epsilon
    alpha = 2 * (step_size if step_size is not None else 2.5 * epsilon / steps)
    was_training = model.training
    model.eval()  # the batch-norm statistics are not updated by the attack's passes
    delta = (torch.rand(x.shape, generator=g, dtype=x.dtype) * 2 - 1) * eps
    adv = (x + delta).clamp(-1, 1)
    for _ in range(steps):
        adv = adv.detach().requires_grad_(True)
        with autocast(precision):
            loss = F.cross_entropy(model(in_classifier_layout(adv)).float(), y)
        (grad,) = torch.autograd.grad(loss, adv)
        adv = torch.min(torch.max(adv.detach() + alpha * grad.sign(), x - eps), x + eps).clamp(-1, 1)
    model.train(was_training)
    return adv.detach()


def in_classifier_layout(x: torch.Tensor) -> torch.Tensor:
    """Classifiers and their inputs are channels_last in every precision: the CPU convolutions and pools
    ran 1.3-1.4x faster on it than on NCHW in fp32 too."""
    return x.contiguous(memory_format=torch.channels_last)


def _setup(in_channels: int, num_classes: int, recipe: ClassifierRecipe):
    check_precision(recipe.precision)
    torch.manual_seed(recipe.seed)
    model = build_classifier(recipe.arch, in_channels, num_classes).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                          weight_decay=recipe.weight_decay, nesterov=True)
    return model, opt


def total_steps(n: int, recipe: ClassifierRecipe) -> int:
    return recipe.epochs * max(n // recipe.batch_size, 1)


def _fit(model, opt, images, labels, recipe: ClassifierRecipe, start: int, stop: int, bar: Progress,
         after_step: Callable[[int, float], None] | None = None) -> None:
    """Steps `start` .. `stop`; every step's batch and augmentation are keyed by its index."""
    total = total_steps(len(images), recipe)
    model.train()
    running = None
    try:
        for step in range(start, stop):
            g = step_generator(recipe.seed, step)
            idx = batch_indices(len(images), recipe.batch_size, step, recipe.seed)
            x = augment(images[idx], recipe.crop_padding, recipe.flip, g)
            if recipe.input_noise:  # nothing is drawn from g when off, so runs without noise are unchanged
                signs = torch.randint(0, 2, x.shape, generator=g, dtype=x.dtype) * 2 - 1
                x = (x + signs * (2 * recipe.input_noise)).clamp(-1, 1)  # model space spans twice pixel units
            if recipe.adversarial_epsilon:
                x = pgd_examples(model, x, labels[idx], recipe.adversarial_epsilon, recipe.adversarial_steps,
                                 recipe.adversarial_step_size, g, recipe.precision)
            set_lr(opt, cosine_with_warmup(step, total, min(50, total // 10), recipe.lr))
            x = in_classifier_layout(x)
            with autocast(recipe.precision):
                loss = F.cross_entropy(model(x).float(), labels[idx])
            if not math.isfinite(loss.item()):
                raise RuntimeError(f"classifier loss became {loss.item()} at step {step}; lower the learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
            bar.update(step, loss=running)
            if after_step is not None:
                after_step(step, running)
    finally:
        bar.close()
    model.eval()


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    recipe: ClassifierRecipe,
    *,
    progress: bool = True,
    desc: str = "train classifier",
) -> nn.Module:
    """Train a classifier on model-space images (float32 NCHW in [-1, 1]); returns it in eval mode."""
    recipe = dataclasses.replace(recipe, precision=concrete_precision(recipe.precision))
    recipe.check()
    model, opt = _setup(images.shape[1], num_classes, recipe)
    total = total_steps(len(images), recipe)
    _fit(model, opt, images, labels, recipe, 0, total, Progress(total, 0, desc, recipe.batch_size, progress))
    return model


def train_classifier_run(
    data: TrainingData,
    run_dir: str | Path,
    recipe: ClassifierRecipe,
    *,
    num_classes: int | None = None,
    resume: bool = False,
    checkpoint_every: int = 200,
    progress: bool = True,
    max_steps_this_call: int | None = None,
) -> dict:
    """Train (or continue) a classifier into a run folder that is also a loadable checkpoint."""
    run_dir = Path(run_dir)
    if data.labels is None:
        raise InputError(f"{data.source}: classifier training needs labels, and this dataset has none")
    num_classes = num_classes or int(data.labels.max()) + 1
    if num_classes < 2:
        raise InputError(f"{data.source}: classifier training needs at least 2 classes")
    recipe.check()
    recipe = prepare_run(run_dir, recipe, resume=resume)
    model, opt = _setup(data.images.shape[1], num_classes, recipe)
    start, history, _ = open_run(run_dir, resume=resume, model=model, optimizer=opt, recipe=recipe.to_dict(),
                                 data=data)
    total = total_steps(len(data), recipe)
    stop = stop_step(start, total, max_steps_this_call)

    def save(step: int) -> None:
        save_run(run_dir, "classifier", recipe.to_dict(), data, history, step=step, model=model, optimizer=opt)

    bar = Progress(total, start, "train classifier", recipe.batch_size, progress)
    with StopSignals() as signals:

        def after_step(step: int, running: float) -> None:
            if (step + 1) % 50 == 0:
                history.append({"step": step + 1, "loss": round(running, 6)})
            signals.end_of_step(step + 1, stop, run_dir, lambda: save(step + 1),
                                due=(step + 1) % checkpoint_every == 0 or step + 1 == stop)

        _fit(model, opt, data.images, data.labels, recipe, start, stop, bar, after_step)
    return {"step": stop, "history": history, "run_dir": str(run_dir), "precision": recipe.precision}


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 512, precision: str = "fp32") -> torch.Tensor:
    model.eval()
    preds = []
    for s in range(0, len(images), batch_size):
        x = in_classifier_layout(images[s : s + batch_size])
        with autocast(precision):
            preds.append(model(x).float().argmax(1))
    return torch.cat(preds)


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, precision: str = "fp32") -> float:
    return float((predict(model, images, precision=precision) == labels).float().mean())
