"""FLOPs of an architecture, computed from its config alone (nothing runs).

`puregen.bench.measure.counted_flops` counts what a call actually ran; the
count here is what the architecture defines (tests/test_unet.py checks it
against torch's FLOP counter, tests/test_update_formulas.py the EBM's).
"""

from __future__ import annotations

from ..models.ebm import EBMConfig
from ..models.unet_config import UNetConfig

__all__ = ["count_ebm_flops", "count_unet_flops"]


def count_unet_flops(config: UNetConfig, height: int, width: int) -> int:
    """FLOPs (2 x multiply-adds) of one forward for one ``height x width`` image.

    Counts convolutions, linear layers (time embedding, time projections,
    attention q/k/v/out) and the two attention matmuls (``QK^T`` and ``PV``).
    Norms, activations, softmax, bias and residual adds are not counted.
    """
    cfg = config
    m = cfg.pad_multiple
    if height % m or width % m:
        raise ValueError(f"height and width must be multiples of {m}, got {height}x{width}")
    ch = cfg.block_out_channels
    temb = cfg.time_embed_dim
    total = 0

    def conv(cin: int, cout: int, k: int, hw: int) -> int:
        return 2 * cin * cout * k * k * hw

    def resnet(cin: int, cout: int, hw: int) -> int:
        f = conv(cin, cout, 3, hw) + conv(cout, cout, 3, hw) + 2 * temb * cout
        if cin != cout:
            f += conv(cin, cout, 1, hw)
        return f

    def attention(c: int, hw: int) -> int:
        inner = (c // cfg.head_dim(c)) * cfg.head_dim(c)
        return 2 * hw * c * inner * 4 + 2 * 2 * hw * hw * inner

    # time embedding MLP
    total += 2 * ch[0] * temb + 2 * temb * temb
    h, w = height, width
    total += conv(cfg.in_channels, ch[0], 3, h * w)
    skip_ch = [ch[0]]
    prev = ch[0]
    for i, kind in enumerate(cfg.down_block_types):
        for j in range(cfg.layers_per_block):
            total += resnet(prev if j == 0 else ch[i], ch[i], h * w)
            if kind == "AttnDownBlock2D":
                total += attention(ch[i], h * w)
            skip_ch.append(ch[i])
        prev = ch[i]
        if i < len(ch) - 1:
            h, w = h // 2, w // 2
            total += conv(ch[i], ch[i], 3, h * w)
            skip_ch.append(ch[i])
    total += 2 * resnet(ch[-1], ch[-1], h * w) + attention(ch[-1], h * w)
    rev = ch[::-1]
    for i, kind in enumerate(cfg.up_block_types):
        for _ in range(cfg.layers_per_block + 1):
            total += resnet(prev + skip_ch.pop(), rev[i], h * w)
            prev = rev[i]
            if kind == "AttnUpBlock2D":
                total += attention(rev[i], h * w)
        if i < len(ch) - 1:
            h, w = h * 2, w * 2
            total += conv(rev[i], rev[i], 3, h * w)
    total += conv(ch[0], cfg.out_channels, 3, h * w)
    return total


def count_ebm_flops(config: EBMConfig, height: int, width: int) -> int:
    """FLOPs (2 x multiply-adds) of one forward pass of one image, convs and linear."""
    nf, cin = config.nf, config.in_channels
    hw = height * width
    q = (height // 2) * (width // 2)
    e = (height // 4) * (width // 4)
    conv3 = lambda a, b, n: 2 * a * b * 9 * n  # noqa: E731
    flops = conv3(cin, nf, hw) + conv3(nf, nf, hw) + 2 * cin * nf * q  # block1
    flops += 2 * conv3(nf, nf, q) + 2 * nf * nf * q  # block2 (shortcut before pooling)
    flops += 4 * conv3(nf, nf, e)  # blocks 3 and 4
    return flops + 2 * nf
