"""The EBM critic: a ResNet energy network with the SNGAN-discriminator shape.

No spectral norm and no batch-norm, so each image's energy depends on that
image alone. Parameter names follow the published PureGen checkpoints
(`block1.c1`, ..., `l5.weight`) so their state dicts load unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class EBMConfig:
    """Architecture of the critic. `nf` is the width of every block."""

    in_channels: int = 3
    nf: int = 128

    @classmethod
    def paper(cls) -> "EBMConfig":
        return cls(in_channels=3, nf=128)

    @classmethod
    def tiny(cls, in_channels: int = 1) -> "EBMConfig":
        return cls(in_channels=in_channels, nf=16)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EBMConfig":
        cfg = cls(in_channels=int(d["in_channels"]), nf=int(d["nf"]))
        if cfg.in_channels < 1 or cfg.nf < 1:
            raise ValueError(f"invalid EBM config {d}")
        return cfg


def _conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1)


class OptimizedBlock(nn.Module):
    """First block: conv-relu-conv-pool, with a pool + 1x1-conv shortcut."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.c1 = _conv3x3(cin, cout)
        self.c2 = _conv3x3(cout, cout)
        self.c_sc = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.avg_pool2d(self.c2(F.relu(self.c1(x))), 2)
        return h + self.c_sc(F.avg_pool2d(x, 2))


class ResBlock(nn.Module):
    """Pre-activation residual block, optionally down-sampling by 2."""

    def __init__(self, cin: int, cout: int, down: bool = False):
        super().__init__()
        self.down = down
        self.c1 = _conv3x3(cin, cout)
        self.c2 = _conv3x3(cout, cout)
        self.c_sc = nn.Conv2d(cin, cout, 1) if (cin != cout or down) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c2(F.relu(self.c1(F.relu(x))))
        sc = x if self.c_sc is None else self.c_sc(x)
        if self.down:
            h = F.avg_pool2d(h, 2)
            sc = F.avg_pool2d(sc, 2)
        return h + sc


class EBM(nn.Module):
    """Energy G(x): one scalar per image, lower for images like the data."""

    def __init__(self, config: EBMConfig = EBMConfig()):
        super().__init__()
        self.config = config
        nf = config.nf
        self.block1 = OptimizedBlock(config.in_channels, nf)
        self.block2 = ResBlock(nf, nf, down=True)
        self.block3 = ResBlock(nf, nf)
        self.block4 = ResBlock(nf, nf)
        self.l5 = nn.Linear(nf, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block4(self.block3(self.block2(self.block1(x))))
        # A mean (not a sum) keeps the energy scale, and so `temp`, independent
        # of the image area.
        h = F.relu(h).mean(dim=(2, 3))
        return self.l5(h).squeeze(1)
