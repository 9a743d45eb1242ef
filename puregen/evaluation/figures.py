"""Image grids for reports (PNG through Pillow)."""

from __future__ import annotations

import numpy as np


def image_grid(images_u8: np.ndarray, rows: int, pad: int = 2, scale: int = 1):
    """A Pillow image of uint8 NHWC images laid out row-major on a white canvas."""
    from PIL import Image

    n, h, w, c = images_u8.shape
    cols = -(-n // rows)
    canvas = np.full((rows * (h + pad), cols * (w + pad), c), 255, np.uint8)
    half = pad // 2
    for i, img in enumerate(images_u8):
        r, k = divmod(i, cols)
        canvas[r * (h + pad) + half : r * (h + pad) + half + h, k * (w + pad) + half : k * (w + pad) + half + w] = img
    if scale > 1:
        canvas = canvas.repeat(scale, axis=0).repeat(scale, axis=1)
    return Image.fromarray(canvas[..., 0] if c == 1 else canvas)
