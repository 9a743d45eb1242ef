"""`grayscale`: colour to grey, a baseline against colour-channel shortcuts.

Image Shortcut Squeezing (Liu et al., ICML 2023) found that dropping colour
removes many unlearnable-example perturbations, which often live in the
differences between channels. RGB images become their luma (ITU-R BT.601,
as PIL's "L" mode computes it) copied to all three channels, so the image
keeps its shape; a grey image passes through unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import InputError
from ..base import Method
from ..options import MethodConfig
from ..registry import register


@dataclass(frozen=True)
class GrayscaleConfig(MethodConfig):
    pass


@register
class GrayscaleConversion(Method):
    name = "grayscale"
    label = "Grayscale"
    help = "RGB to grey (BT.601 luma in every channel; grey images pass through; no network)"
    Config = GrayscaleConfig
    pixels = True
    min_side = 1

    def network_evaluations(self) -> int:
        return 1

    def purify_pixels(self, images_u8: torch.Tensor) -> torch.Tensor:
        if images_u8.shape[-1] == 1:
            return images_u8.clone()
        if images_u8.shape[-1] != 3:
            raise InputError(f"grayscale takes grey or RGB images, these have {images_u8.shape[-1]} channels")
        r, g, b = images_u8.to(torch.int32).unbind(-1)
        # PIL's integer luma: (R*19595 + G*38470 + B*7471 + 0x8000) >> 16.
        luma = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16
        return luma.to(torch.uint8)[..., None].expand(*luma.shape, 3).contiguous()
