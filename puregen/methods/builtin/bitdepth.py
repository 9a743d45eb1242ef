"""`bitdepth`: bit-depth reduction, a baseline against unlearnable examples.

Image Shortcut Squeezing (Liu et al., ICML 2023) showed that squeezing an
image to a few grey levels per channel wipes out perturbations too small to
survive the rounding; D-VAE (Yu et al., ICML 2024) compares against it.
Each channel is rounded to the nearest of ``2**bits`` evenly spaced levels
of [0, 255] (2 bits: 0, 85, 170, 255), the squeezer of Xu et al.'s
feature squeezing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import Method
from ..options import MethodConfig, option, within
from ..registry import register


@dataclass(frozen=True)
class BitDepthConfig(MethodConfig):
    bits: int = option(2, "bits per channel kept by --method bitdepth (default 2: four levels)", check=within(1, 7))


@register
class BitDepthReduction(Method):
    name = "bitdepth"
    label = "Bit depth"
    help = "bit-depth reduction to --bits per channel (a baseline against unlearnable examples; no network)"
    Config = BitDepthConfig
    pixels = True
    min_side = 1

    def network_evaluations(self) -> int:
        return 1

    def purify_pixels(self, images_u8: torch.Tensor) -> torch.Tensor:
        levels = 2**self.config.bits - 1
        # Integer arithmetic, round half up: (v * levels + 127) // 255 is round(v * levels / 255).
        q = (images_u8.to(torch.int32) * levels + 127) // 255
        return ((q * 255 + levels // 2) // levels).to(torch.uint8)
