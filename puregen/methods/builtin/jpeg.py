"""`jpeg`: JPEG re-compression, the classic input-transformation baseline."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch

from ..base import Method
from ..options import MethodConfig, option, within
from ..registry import register


@dataclass(frozen=True)
class JPEGConfig(MethodConfig):
    quality: int = option(75, "JPEG quality for --method jpeg (default 75)", check=within(1, 100), name="jpeg_quality")


@register
class JPEGRecompression(Method):
    name = "jpeg"
    help = "JPEG re-compression at --jpeg-quality (a baseline; no network)"
    Config = JPEGConfig
    pixels = True
    min_side = 1

    def network_evaluations(self) -> int:
        return 1

    def purify_pixels(self, images_u8: torch.Tensor) -> torch.Tensor:
        """JPEG re-compression of each uint8 NHWC image (PIL, 4:2:0 defaults)."""
        from PIL import Image

        arr = images_u8.numpy()
        out = np.empty_like(arr)
        for i, img in enumerate(arr):
            grey = img.shape[-1] == 1
            pil = Image.fromarray(img[..., 0] if grey else img, mode="L" if grey else "RGB")
            buf = io.BytesIO()
            pil.save(buf, format="JPEG", quality=self.config.quality)
            buf.seek(0)
            dec = np.asarray(Image.open(buf).convert("L" if grey else "RGB"))
            out[i] = dec[..., None] if grey else dec
        return torch.from_numpy(out)
