"""The image forms a loader's items carry, stacked into one engine batch and given back in their own form.

An item's image is a numpy array or torch tensor (uint8 HWC or HW, or float in [0, 1], as
`prepare_api_input` takes them), a PIL image, or nested lists of integers (how `datasets` gives an
array column). A purified image goes back in the form it came: PIL stays PIL in its mode, a torch
tensor stays torch, a float image is the uint8 result / 255, an HW image stays HW.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..data.convert import from_model_space, prepare_api_input
from ..errors import InputError

Restore = Callable[[np.ndarray], Any]  # uint8 HWC -> the item's own form


def _is_pil(image) -> bool:
    try:
        from PIL import Image
    except ImportError:  # no Pillow: no PIL images to meet
        return False
    return isinstance(image, Image.Image)


def _restore_pil(mode: str) -> Restore:
    def restore(u8: np.ndarray):
        from PIL import Image

        return Image.fromarray(u8[..., 0] if u8.shape[-1] == 1 else u8, mode=mode)
    return restore


def _restore_array(ndim: int, container: str, kind: str, dtype) -> Restore:
    def restore(u8: np.ndarray):
        out = u8[..., 0] if ndim == 2 else u8
        out = out.astype(np.float32) / np.float32(255.0) if kind == "float" else out.astype(dtype, copy=False)
        return torch.from_numpy(np.ascontiguousarray(out)) if container == "torch" else np.ascontiguousarray(out)
    return restore


def item_array(image, source: str) -> tuple[np.ndarray, Restore]:
    """One item's image as a numpy HWC array (HW gains a channel axis) and how to give a purified uint8 HWC
    image back in the item's form."""
    if _is_pil(image):
        if image.mode not in ("L", "RGB"):
            raise InputError(f"{source}: PIL image of mode {image.mode!r}; convert it to 'L' or 'RGB' first")
        arr = np.asarray(image)
        return (arr[..., None] if arr.ndim == 2 else arr), _restore_pil(image.mode)
    if torch.is_tensor(image):
        arr, container = image.detach().cpu().numpy(), "torch"
    elif isinstance(image, np.ndarray):
        arr, container = image, "numpy"
    elif isinstance(image, (list, tuple)):
        arr, container = np.asarray(image), "numpy"
    else:
        raise InputError(f"{source}: an image must be a numpy array, torch tensor, PIL image or nested list, "
                         f"got {type(image).__name__}")
    if arr.ndim not in (2, 3):
        raise InputError(f"{source}: an image must be HWC or HW, got shape {arr.shape}")
    dtype = arr.dtype
    if dtype.kind in "iu" and dtype != np.uint8:
        # Integer pixels that are not uint8 (lists from `datasets` read as int64): in range, they are uint8.
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise InputError(f"{source}: integer pixels must be in 0..255, got {arr.min()}..{arr.max()}")
        arr = arr.astype(np.uint8)
    kind = "float" if arr.dtype.kind == "f" else "uint8"
    restore = _restore_array(arr.ndim, container, kind, dtype if kind == "uint8" else np.float32)
    return (arr[..., None] if arr.ndim == 2 else arr), restore


def stack_items(images: Sequence, source: str) -> tuple[torch.Tensor, list[Restore]]:
    """The images as one uint8 NHWC batch, quantized as `Purifier.purify` quantizes its input, and their restorers."""
    arrays, restorers = zip(*(item_array(image, f"{source}, image {k}") for k, image in enumerate(images)))
    if len({(a.shape, a.dtype.kind) for a in arrays}) != 1:
        raise InputError(f"{source}: the images of one batch must share one shape and pixel type, got "
                         + ", ".join(sorted({f"{a.shape} {a.dtype}" for a in arrays})))
    x_model, _ = prepare_api_input(np.stack(arrays), source=source)
    return from_model_space(x_model), list(restorers)
