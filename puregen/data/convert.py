"""Conversion between API images and the engine's model space.

* API / disk images: ``uint8`` NHWC (0..255), or float NHWC in [0, 1]
  (numpy arrays or torch tensors; floats are checked to be finite and in
  range).  A 3-D NHW input is read as single-channel.
* Model space (inside the engine): ``torch.float32`` NCHW in [-1, 1]:
  ``x = u8 / 127.5 - 1`` for uint8, ``x = 2 f - 1`` for floats (floats are
  *not* quantized on the way in).
* Leaving the engine (:func:`from_model_space`): clamp to [-1, 1], map with
  ``(x + 1) * 127.5``, round to nearest (``torch.round``: ties to even), cast
  to ``uint8``.  Never casts without clamping.  uint8 -> model -> uint8 is
  exact.

:func:`prepare_api_input` converts any accepted input and returns a
``restore`` callable that turns the engine's uint8 NHWC result back into the
kind the caller gave:

=====================  ===========================================
input                  restore(u8) returns
=====================  ===========================================
numpy uint8            numpy uint8
numpy float (any)      numpy float32 = u8 / 255
torch uint8            torch uint8 on the input's device
torch float (any)      torch float32 = u8 / 255 on the input's device
=====================  ===========================================

Float results are the quantized uint8 result divided by 255, so results are
identical whatever kind of input was given.  If the input was 3-D (NHW) the
result is 3-D too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from puregen.data.validation import check_image_shape, validate_float_images
from puregen.errors import InputError

__all__ = ["to_model_space", "from_model_space", "prepare_api_input", "ApiRestore"]


def _kind_of(images: Any, source: str) -> tuple[str, str]:
    """Return (container, dtype-kind): container 'numpy'|'torch', kind 'uint8'|'float'."""
    if isinstance(images, torch.Tensor):
        if images.dtype == torch.uint8:
            return "torch", "uint8"
        if images.is_floating_point():
            return "torch", "float"
        raise InputError(
            f"{source}: images tensor has dtype {images.dtype}; expected torch.uint8 (0..255) "
            f"or a float dtype in [0, 1]"
        )
    if isinstance(images, np.ndarray):
        if images.dtype == np.uint8:
            return "numpy", "uint8"
        if images.dtype.kind == "f":
            return "numpy", "float"
        raise InputError(
            f"{source}: images array has dtype {images.dtype}; expected uint8 (0..255) or a float dtype in [0, 1]"
        )
    raise InputError(
        f"{source}: images must be a numpy array or torch tensor (uint8 NHWC or float NHWC in [0, 1]), "
        f"got {type(images).__name__}"
    )


def to_model_space(images: Any, source: str = "input") -> torch.Tensor:
    """Validate API images and return ``torch.float32`` NCHW in [-1, 1].

    Accepts numpy or torch, uint8 NHWC or float NHWC in [0, 1] (3-D NHW is
    single-channel).  Torch tensors stay on their device (the result is on
    the same device); numpy input gives a CPU tensor.  The result is a new
    contiguous tensor (never a view of the input).
    """
    container, kind = _kind_of(images, source)
    if kind == "float":
        images = validate_float_images(images, source)
    else:
        images = images.reshape(check_image_shape(images.shape, source))
    if container == "numpy":
        arr = np.ascontiguousarray(images)
        if not arr.flags.writeable:  # torch.from_numpy warns on read-only arrays (mmap, frombuffer)
            arr = arr.copy()
        t = torch.from_numpy(arr)
    else:
        t = images.detach()
    t = t.permute(0, 3, 1, 2)
    if kind == "uint8":
        out = t.to(torch.float32) / 127.5 - 1.0
    else:
        out = t.to(torch.float32) * 2.0 - 1.0
    return out.contiguous()


def from_model_space(x: torch.Tensor, *, check_nan: bool = True) -> torch.Tensor:
    """Model-space ``NCHW`` float tensor -> ``torch.uint8`` NHWC on the same device.

    Clamps to [-1, 1], maps with ``(x + 1) * 127.5`` in float32, rounds to
    nearest (ties to even) and casts.  Half/bfloat16 inputs are upcast to
    float32 first.  NaN has no defined pixel value: with ``check_nan`` (the
    default) a NaN raises ``RuntimeError`` (an engine fault, not bad input).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"from_model_space expects a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"from_model_space expects NCHW with C in {{1, 3}}, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"from_model_space expects a float tensor, got {x.dtype}")
    x = x.detach().to(torch.float32)
    if check_nan and bool(torch.isnan(x).any()):
        n = int(torch.isnan(x).sum().item())
        raise RuntimeError(f"from_model_space: model output contains {n} NaN values")
    u8 = x.clamp(-1.0, 1.0).add(1.0).mul(127.5).round().to(torch.uint8)
    return u8.permute(0, 2, 3, 1).contiguous()


@dataclass(frozen=True)
class ApiRestore:
    """Callable turning the engine's uint8 NHWC tensor into the caller's kind.

    Attributes record the original input: ``container`` ('numpy'/'torch'),
    ``kind`` ('uint8'/'float'), ``device`` (torch only) and ``squeeze_channel``
    (the input was 3-D NHW).
    """

    container: str
    kind: str
    device: torch.device | None
    squeeze_channel: bool

    def __call__(self, u8: torch.Tensor | np.ndarray):
        if isinstance(u8, np.ndarray):
            u8 = torch.from_numpy(u8)
        if not isinstance(u8, torch.Tensor) or u8.dtype != torch.uint8 or u8.ndim != 4:
            raise TypeError(
                "restore expects a uint8 NHWC tensor, got "
                + (f"{u8.dtype} shape {tuple(u8.shape)}" if isinstance(u8, torch.Tensor) else type(u8).__name__)
            )
        if self.squeeze_channel:
            if u8.shape[3] != 1:
                raise ValueError(f"restore: input was single-channel NHW but result has shape {tuple(u8.shape)}")
            u8 = u8[..., 0]
        if self.container == "numpy":
            arr = u8.detach().cpu().numpy()
            if self.kind == "uint8":
                return np.ascontiguousarray(arr)
            return arr.astype(np.float32) / np.float32(255.0)
        t = u8.detach().to(self.device)
        if self.kind == "uint8":
            return t.contiguous()
        return t.to(torch.float32) / 255.0


def prepare_api_input(x: Any, source: str = "input") -> tuple[torch.Tensor, Callable[[torch.Tensor], Any]]:
    """Validate and convert API images; return ``(model_space_tensor, restore)``.

    ``model_space_tensor`` is float32 NCHW in [-1, 1] (see
    :func:`to_model_space`); ``restore(u8_nhwc)`` returns the result in the
    same kind as ``x`` (see the module table).  Float output is the quantized
    uint8 result divided by 255.
    """
    container, kind = _kind_of(x, source)
    tensor = to_model_space(x, source)
    device = x.device if container == "torch" else None
    return tensor, ApiRestore(container, kind, device, squeeze_channel=(x.ndim == 3))
