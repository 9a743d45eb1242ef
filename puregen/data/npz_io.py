"""``.npz`` / ``.npy`` image files (always loaded with ``allow_pickle=False``).

* ``.npz``: images in array ``x`` (alias ``images``), uint8 NHWC (3-D NHW is
  single-channel); optional labels in ``y`` (alias ``labels``), integers.
  Other arrays in the archive are ignored; having both a name and its alias
  is refused as ambiguous.
* ``.npy``: one uint8 image array; labels are ``None``.

Files must hold uint8 images: float arrays are refused (convert and quantize
before saving).  Truncated or corrupt files raise ``InputError``
("truncated or corrupt").
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from puregen.data.atomic import atomic_write_file, write_npz_atomic
from puregen.data.dataset import ImageDataset
from puregen.data.validation import validate_images_uint8, validate_labels
from puregen.errors import InputError

__all__ = ["IMAGE_KEYS", "LABEL_KEYS", "read_npz", "read_npy", "write_npz", "write_npy"]

IMAGE_KEYS = ("x", "images")
LABEL_KEYS = ("y", "labels")


def _open_error(src: str, e: BaseException) -> InputError:
    if isinstance(e, FileNotFoundError):
        return InputError(f"{src}: no such file")
    if isinstance(e, IsADirectoryError):
        return InputError(f"{src}: is a directory, expected a file")
    if isinstance(e, PermissionError):
        return InputError(f"{src}: permission denied")
    if isinstance(e, ValueError) and "allow_pickle" in str(e):
        return InputError(f"{src}: holds pickled (object) data, which is refused; arrays must be plain uint8/int")
    return InputError(f"{src}: truncated or corrupt file ({type(e).__name__}: {e})")


def _check_magic(path: Path, src: str, what: str) -> None:
    """Refuse files that are neither zip nor .npy before np.load could treat them as a pickle."""
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except Exception as e:
        raise _open_error(src, e) from None
    if not (head.startswith(b"PK") or head == b"\x93NUMPY"):
        raise InputError(f"{src}: truncated or corrupt file (not {what}: no zip or .npy header)")


def _pick_key(keys: list[str], names: tuple[str, str], src: str, required: bool) -> str | None:
    present = [k for k in names if k in keys]
    if len(present) > 1:
        raise InputError(f"{src}: has both arrays {names[0]!r} and {names[1]!r}; keep only one")
    if present:
        return present[0]
    if required:
        found = ", ".join(repr(k) for k in keys) or "none"
        raise InputError(
            f"{src}: no image array; expected {names[0]!r} (or {names[1]!r}), found arrays: {found}"
        )
    return None


def _member(z: Any, key: str, src: str) -> np.ndarray:
    try:
        return z[key]
    except Exception as e:
        raise _open_error(src, e) from None


def _load(path: Path, src: str, expected: str) -> Any:
    """``np.load`` without pickles, after a magic-number check; errors name the file."""
    _check_magic(path, src, expected)
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:
        raise _open_error(src, e) from None


def read_npz(path: str | os.PathLike, *, num_classes: int | None = None) -> ImageDataset:
    """Read an ``.npz`` with ``x``/``images`` and optional ``y``/``labels``."""
    path = Path(path)
    src = str(path)
    z = _load(path, src, "an .npz archive")
    if isinstance(z, np.ndarray):  # a .npy payload under an .npz name
        images = validate_images_uint8(z, src, name="array")
        return ImageDataset(images, None, src, num_classes)
    with z:
        keys = list(z.files)
        ik = _pick_key(keys, IMAGE_KEYS, src, required=True)
        lk = _pick_key(keys, LABEL_KEYS, src, required=False)
        images = _member(z, ik, src)
        labels = _member(z, lk, src) if lk is not None else None
    images = validate_images_uint8(images, src, name=f"array {ik!r}")
    if labels is not None:
        labels = validate_labels(labels, images.shape[0], src, num_classes, name=f"array {lk!r}")
    return ImageDataset(images, labels, src, num_classes)


def read_npy(path: str | os.PathLike, *, num_classes: int | None = None) -> ImageDataset:
    """Read a ``.npy`` holding uint8 images (no labels)."""
    path = Path(path)
    src = str(path)
    arr = _load(path, src, "a .npy array")
    if not isinstance(arr, np.ndarray):
        arr.close()
        raise InputError(f"{src}: is an .npz archive, not a .npy array; name it .npz")
    images = validate_images_uint8(arr, src, name="array")
    return ImageDataset(images, None, src, num_classes)


def write_npz(path: str | os.PathLike, images: np.ndarray, labels: Any = None) -> Path:
    """Atomically write images (``x``) and, if given, labels (``y``, int64) to ``path``."""
    src = str(path)
    images = validate_images_uint8(images, src)
    arrays = {"x": images}
    if labels is not None:
        arrays["y"] = validate_labels(labels, images.shape[0], src)
    return write_npz_atomic(path, **arrays)


def write_npy(path: str | os.PathLike, images: np.ndarray) -> Path:
    """Atomically write uint8 images to a ``.npy`` file."""
    path = Path(path)
    images = validate_images_uint8(images, str(path))
    with atomic_write_file(path) as f:
        np.save(f, images, allow_pickle=False)
    return path

