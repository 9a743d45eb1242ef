"""The two scales of `puregen eval`: the data each uses and the settings that differ between them.

* `small` (default): real Fashion-MNIST on a CPU. The victim's base set is a
  class-balanced 10,000-image subset of training rows 0-49,999; the attacker
  owns rows 50,000-59,999 (its labelled data) and scikit-learn's digits
  (public out-of-distribution data for Narcissus). Small CNN classifier.
* `paper`: CIFAR-10 with ResNet-18 and the published schedules and poison
  counts (all 50,000 training images; 500 Narcissus poisons), for GPU users.
  CIFAR-10 has no rows to spare, so the attacker's labelled data is the
  training set itself (the threat model of Gradient Matching and Bullseye
  Polytope; Narcissus only reads the target class). The published Narcissus
  crafts on Tiny-ImageNet as POOD data; `--pood DIR` gives it, and without it
  the non-target CIFAR-10 training classes stand in (the report says so).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..backends.precision import resolve_precision
from ..data import read_dataset
from ..errors import InputError
from ..training.classifier import ClassifierRecipe
from ..training.loop import fastest_training_precision
from .datasets import FASHION_MNIST_CLASSES, balanced_subset, default_fashion_mnist_root, digits_as_images, load_fashion_mnist

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SMALL_BASE_PER_CLASS = 1000
SMALL_VICTIM_ROWS = 50_000


@dataclass
class ScaleData:
    name: str
    base_images: np.ndarray  # the victim's clean training set, uint8 NHWC
    base_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    attacker_images: np.ndarray  # labelled data the attacker owns
    attacker_labels: np.ndarray
    pood_images: np.ndarray  # public out-of-distribution data (Narcissus)
    pood_labels: np.ndarray
    class_names: tuple[str, ...]
    description: str
    notes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for a in (self.base_images, self.base_labels, self.test_images, self.test_labels):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:20]


@dataclass
class ScaleSettings:
    """What the attacks, defenses and victim use at one scale (published values unless noted)."""

    classifier: ClassifierRecipe
    backdoor_target: int  # the class backdoor attacks push towards
    poison_fraction: float = 0.01
    amplify: float = 3.0  # Narcissus' test-time trigger multiplier
    targets: int = 50  # targeted attacks: cases per cell (50 give a 95% interval of about +-14 points)
    seeds: int = 3  # backdoor attacks: classifier seeds per cell
    ebm_steps: int = 150
    ddpm_t_star: int = 75
    ddpm_reverse_steps: int | None = None  # None: all t*
    precision: str = "fp32"  # of the purifiers' network evaluations
    micro_batch: int = 64
    # Bullseye Polytope's public feature extractor (trained on the other half of the classes) and the
    # epochs of the transfer victim on top of it.
    extractor_arch: str = "small-cnn"
    extractor_epochs: int = 8
    transfer_epochs: int = 10
    jpeg_qualities: tuple[int, ...] = (75,)
    full_jpeg_qualities: tuple[int, ...] = (90, 75, 50, 25)
    # The unlearnable-example table (`--family unlearnable`). Its base set: `ue_base_per_class` images per
    # class of the base set (None: all of it), since every image of a UE set is poisoned and purified and
    # D-VAE fits on each whole set. Image Shortcut Squeezing's baselines: JPEG q10 and 2-bit depth.
    ue_base_per_class: int | None = None
    ue_jpeg_quality: int = 10
    ue_bits: int = 2
    dvae_recipe: str = "paper"  # D-VAE's fitting recipe (`puregen.training.dvae.DVAERecipe`)
    # The unlearnable-example table's victim (None: `classifier`). Unlearnable examples are published
    # against networks that pool their features globally (ResNet-18); a victim whose head reads every
    # position of the last feature map learns Fashion-MNIST's real features as fast as the shortcuts.
    ue_classifier: ClassifierRecipe | None = None


def small_settings() -> ScaleSettings:
    # Fashion-MNIST is usually trained without augmentation. 10 epochs: a backdoor is learnt from its 100
    # poisons only when the victim fits them. At 3 epochs (the first tables) Narcissus without a defense
    # swung from 7% to 25% with the CPU and the crafting seed; at 10 it gave 59-75% over crafting seeds
    # 0-2 (89.9% natural accuracy against 88.6%); see docs/results-small.md.
    return ScaleSettings(
        classifier=ClassifierRecipe(arch="fast-cnn", epochs=10, batch_size=128, lr=0.05, crop_padding=0, flip=False,
                                    precision=fastest_training_precision()),
        backdoor_target=8,  # Bag, as in the demo
        # 10 of the 75 reverse steps (respacing): all 75 would take about 28 minutes per 10,000 images here.
        ddpm_reverse_steps=10,
        precision=resolve_precision("auto", torch.device("cpu")),  # bf16 only where the CPU has it natively
        # 5,000 images: five UE sets, each purified whole by the EBM and the DDPM and fitted by D-VAE (its
        # CPU recipe), fit the table's 2 hours on 2 cores (docs/results-small.md).
        ue_base_per_class=500,
        dvae_recipe="small",
        # The fast CNN (a linear head over its whole 7x7 map) lost 0.3 points to AR, 9 to LSP and 10.5 to
        # class-wise EM; the small CNN (global average pooling, as ResNet-18) at batch 32 (1,570 steps, so
        # that it fits the clean set: 89% training accuracy where batch 128 gives 86%) lost 31-40 points to
        # each of them at 85% clean accuracy (docs/results-small.md).
        ue_classifier=ClassifierRecipe(arch="small-cnn", epochs=10, batch_size=32, lr=0.05, crop_padding=0,
                                       flip=False, precision=fastest_training_precision()),
    )


def paper_settings() -> ScaleSettings:
    return ScaleSettings(classifier=ClassifierRecipe.preset("paper"), backdoor_target=2,  # Narcissus' bird
                         extractor_arch="resnet18", extractor_epochs=200, transfer_epochs=40)


def load_small(data: str | Path | None) -> ScaleData:
    root = Path(data) if data else default_fashion_mnist_root()
    train, test = load_fashion_mnist(root, "train"), load_fashion_mnist(root, "test")
    subset = balanced_subset(train.labels[:SMALL_VICTIM_ROWS], SMALL_BASE_PER_CLASS, seed=0)
    digits = digits_as_images(train.images.shape[1])
    return ScaleData(
        "small", train.images[subset], train.labels[subset].astype(np.int64), test.images,
        test.labels.astype(np.int64), train.images[SMALL_VICTIM_ROWS:],
        train.labels[SMALL_VICTIM_ROWS:].astype(np.int64), digits.images, digits.labels, FASHION_MNIST_CLASSES,
        f"Fashion-MNIST ({root}): 10,000-image class-balanced base set from training rows 0-49,999; the attacker "
        f"owns rows 50,000-59,999 and scikit-learn's digits (upsampled to 28x28) as public OOD data",
    )


def load_paper(data: str | Path | None, pood: str | Path | None = None) -> ScaleData:
    if not data:
        raise InputError("--scale paper needs --data DIR: a folder with the CIFAR-10 python batches "
                         "(cifar-10-batches-py, from https://www.cs.toronto.edu/~kriz/cifar.html)")
    train = read_dataset(data, format="cifar", split="train", num_classes=10)
    test = read_dataset(data, format="cifar", split="test", num_classes=10)
    if train.labels is None or test.labels is None:
        raise InputError(f"{data}: the CIFAR-10 batches carry no labels")
    if train.images.shape[1:] != (32, 32, 3):
        raise InputError(f"{data}: CIFAR-10 images are 32x32x3, these are {train.images.shape[1:]}")
    notes = []
    if pood:
        ood = read_dataset(pood)
        if ood.labels is None:
            raise InputError(f"{pood}: the POOD data needs labels (the Narcissus surrogate is a classifier)")
        pood_images, pood_labels = ood.images, ood.labels.astype(np.int64)
    else:
        pood_images, pood_labels = train.images, train.labels.astype(np.int64)
        notes.append("No --pood data: the Narcissus surrogate trains on the CIFAR-10 training classes other than the "
                     "target (the published attack uses Tiny-ImageNet).")
    return ScaleData(
        "paper", train.images, train.labels.astype(np.int64), test.images, test.labels.astype(np.int64),
        train.images, train.labels.astype(np.int64), pood_images, pood_labels, CIFAR10_CLASSES,
        f"CIFAR-10 ({data}): all {len(train.images)} training images; the attacker knows the training set", notes,
    )


def scale_settings(name: str) -> ScaleSettings:
    if name == "small":
        return small_settings()
    if name == "paper":
        return paper_settings()
    raise InputError(f"unknown scale {name!r}; choose small or paper")


def unlearnable_data(data: ScaleData, settings: ScaleSettings) -> ScaleData:
    """The base set of the unlearnable-example table: `settings.ue_base_per_class` images per class of the
    scale's base set (class-balanced, seed 0), or all of it where that is None or more than each class has."""
    per_class = settings.ue_base_per_class
    data = dataclasses.replace(data, notes=[])  # the scale's notes are about the poisoning table's attacks
    if per_class is None or per_class >= np.bincount(data.base_labels).min():
        return data
    keep = balanced_subset(data.base_labels, per_class, seed=0, num_classes=data.num_classes)
    return dataclasses.replace(data, base_images=data.base_images[keep], base_labels=data.base_labels[keep],
                               description=data.description + f"; the unlearnable-example table uses "
                               f"{len(keep):,} of the base images ({per_class} per class, class-balanced)")


def smoke_data(data: ScaleData, per_class: int = 20, test_images: int = 500) -> ScaleData:
    """A few images per class of the base set and the first test images: enough for every stage to run."""
    keep = np.sort(np.concatenate([np.flatnonzero(data.base_labels == c)[:per_class] for c in range(data.num_classes)]))
    return dataclasses.replace(data, base_images=data.base_images[keep], base_labels=data.base_labels[keep],
                               test_images=data.test_images[:test_images], test_labels=data.test_labels[:test_images],
                               description=data.description + f" (smoke test: {len(keep)} base images)")


def smoke_settings(settings: ScaleSettings) -> ScaleSettings:
    """The smallest settings that still run every stage: a pipeline check, not a measurement."""
    return dataclasses.replace(
        settings, classifier=dataclasses.replace(settings.classifier, epochs=1), targets=2, seeds=1, ebm_steps=2,
        extractor_epochs=1, transfer_epochs=1,
        ddpm_t_star=4, ddpm_reverse_steps=None, micro_batch=8,
    )
