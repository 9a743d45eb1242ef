"""Datasets for the evaluation harness, as uint8 NHWC images with int64 labels."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data import read_dataset
from ..data.dataset import ImageDataset
from ..errors import InputError

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def default_fashion_mnist_root() -> Path:
    """`$PUREGEN_FASHION_MNIST`, else the shared data folder next to the repository."""
    env = os.environ.get("PUREGEN_FASHION_MNIST")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "fashion-mnist"


def load_fashion_mnist(root: str | os.PathLike, split: str) -> ImageDataset:
    """One split ("train" or "test") of Fashion-MNIST from its IDX files in `root`."""
    root = Path(root)
    images_name, _ = FASHION_MNIST_FILES[split]
    path = root / images_name
    if not path.is_file():
        raise InputError(
            f"{path}: Fashion-MNIST {split} images not found; pass --data DIR with the four IDX files "
            f"(or set PUREGEN_FASHION_MNIST)"
        )
    ds = read_dataset(path, num_classes=10)
    if ds.labels is None:
        raise InputError(f"{path}: the labels file next to it is missing")
    return ds


def balanced_subset(labels: np.ndarray, per_class: int, seed: int, num_classes: int = 10) -> np.ndarray:
    """Sorted indices of `per_class` randomly chosen images of every class."""
    rng = np.random.default_rng(seed)
    picked = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if len(members) < per_class:
            raise InputError(f"class {c} has {len(members)} images, fewer than the {per_class} asked for")
        picked.append(rng.choice(members, per_class, replace=False))
    return np.sort(np.concatenate(picked))


def digits_as_images(size: int = 28) -> ImageDataset:
    """scikit-learn's 8x8 handwritten digits upsampled to `size` x `size` (public out-of-distribution data)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise InputError("scikit-learn is needed for the digits data: pip install 'puregen[eval]'") from e
    digits = load_digits()
    small = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]
    big = F.interpolate(small, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    u8 = (big * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return ImageDataset(u8, digits.target.astype(np.int64), source="sklearn.datasets.load_digits", num_classes=10)
