"""Classifier training for the evaluation harness (SGD + momentum, cosine, crop/flip augmentation)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..models.classifiers import build_classifier
from .loop import Progress, batch_indices, cosine_with_warmup, set_lr
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

    @classmethod
    def preset(cls, name: str) -> "ClassifierRecipe":
        if name == "small":
            return cls()
        if name == "paper":  # CIFAR-10 ResNet-18
            return cls(arch="resnet18", epochs=200, batch_size=128, lr=0.1, crop_padding=4)
        if name == "tiny":
            return cls(epochs=1, batch_size=16)
        raise ValueError(f"unknown classifier preset {name!r}; choose small, paper or tiny")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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
    torch.manual_seed(recipe.seed)
    model = build_classifier(recipe.arch, images.shape[1], num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                          weight_decay=recipe.weight_decay, nesterov=True)
    per_epoch = max(len(images) // recipe.batch_size, 1)
    total = recipe.epochs * per_epoch
    bar = Progress(total, 0, desc, recipe.batch_size, progress)
    model.train()
    running = None
    for step in range(total):
        g = step_generator(recipe.seed, step)
        idx = batch_indices(len(images), recipe.batch_size, step, recipe.seed)
        x = augment(images[idx], recipe.crop_padding, recipe.flip, g)
        set_lr(opt, cosine_with_warmup(step, total, min(50, total // 10), recipe.lr))
        loss = F.cross_entropy(model(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        bar.update(step, loss=running)
    bar.close()
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    model.eval()
    return torch.cat([model(images[s : s + batch_size]).argmax(1) for s in range(0, len(images), batch_size)])


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predict(model, images) == labels).float().mean())
