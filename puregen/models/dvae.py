"""The D-VAE network (Yu et al., ICML 2024): a VAE with a class-conditioned perturbation decoder.

An unlearnable-example perturbation is, to a rate-constrained VAE, a cheap
class-wise signal: the encoder's latent cannot carry it (the KL bound keeps
the rate low), so a second decoder fed the latent *plus a learned per-class
spatial embedding* `emb[y]` learns to output it. At purification `x - p_hat`
then removes it. Layout (published design; `width` scales every channel count):

* encoder: 3x3 conv to `width` + BN + ReLU, two basic residual blocks at
  `width`, one strided residual block to `2 width` at half resolution;
* latent: 1x1 conv heads for mean and log-variance to `latent_channels`,
  z = mu + sigma * n, then `post_conv`, a 1x1 conv back to `2 width`;
* image decoder: ConvT(2w, w, 4, stride 2) -> ConvT(w, w, 3) -> IN -> ReLU ->
  ConvT(w, w/2, 3) -> IN -> ReLU -> ConvT(w/2, C, 3) -> sigmoid (pixels in [0, 1]);
* perturbation decoder: the same without the sigmoid, fed `emb[y] + post_conv(z)`.

Images are in [0, 1] pixel units throughout this module.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class DVAEConfig:
    in_channels: int = 3
    image_height: int = 32
    image_width: int = 32
    num_classes: int = 10
    width: int = 64  # the published net's; the CPU presets use a narrower one
    latent_channels: int = 256

    def __post_init__(self):
        if self.image_height % 2 or self.image_width % 2:
            # The strided block halves the side and the decoder's ConvT doubles it: odd sides would not come back.
            raise ValueError(f"D-VAE needs even image sides, got {self.image_height}x{self.image_width}")
        if self.width < 2 or self.width % 2:
            raise ValueError(f"D-VAE width must be an even number >= 2, got {self.width}")

    @property
    def latent_size(self) -> tuple[int, int]:
        return self.image_height // 2, self.image_width // 2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DVAEConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown D-VAE config fields {unknown}")
        return cls(**d)


class BasicBlock(nn.Module):
    """The ResNet basic block; a 1x1 strided shortcut where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def _decoder(width: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(2 * width, width, 4, 2, 1),
        nn.ConvTranspose2d(width, width, 3, 1, 1),
        nn.InstanceNorm2d(width),
        nn.ReLU(),
        nn.ConvTranspose2d(width, width // 2, 3, 1, 1),
        nn.InstanceNorm2d(width // 2),
        nn.ReLU(),
        nn.ConvTranspose2d(width // 2, out_channels, 3, 1, 1),
    )


@dataclass
class DVAEOutput:
    x_hat: torch.Tensor  # the reconstruction, in [0, 1]
    p_hat: torch.Tensor  # the predicted perturbation (signed pixel units)
    mu: torch.Tensor
    logvar: torch.Tensor


class DVAE(nn.Module):
    def __init__(self, config: DVAEConfig):
        super().__init__()
        self.config = config
        w, c = config.width, config.in_channels
        self.stem = nn.Sequential(nn.Conv2d(c, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.blocks = nn.Sequential(BasicBlock(w, w), BasicBlock(w, w), BasicBlock(w, 2 * w, stride=2))
        self.mu_head = nn.Conv2d(2 * w, config.latent_channels, 1)
        self.logvar_head = nn.Conv2d(2 * w, config.latent_channels, 1)
        self.post_conv = nn.Conv2d(config.latent_channels, 2 * w, 1)
        self.image_decoder = _decoder(w, c)
        self.perturbation_decoder = _decoder(w, c)
        h, wd = config.latent_size
        # One spatial map per class: what the perturbation decoder can know without the rate-limited latent.
        # Unit-variance start: the maps tell the classes apart from the first step (at std 0.02 a toy planted
        # pattern took about twice the steps to show in p_hat: Adam moves each entry ~lr per step).
        self.class_embedding = nn.Parameter(torch.zeros(config.num_classes, 2 * w, h, wd))
        nn.init.normal_(self.class_embedding, std=1.0)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.blocks(self.stem(x))
        return self.mu_head(features), self.logvar_head(features)

    def decode(self, z: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.post_conv(z)
        x_hat = torch.sigmoid(self.image_decoder(h))
        p_hat = self.perturbation_decoder(self.class_embedding[labels].to(h.dtype) + h)
        return x_hat, p_hat

    def forward(self, x: torch.Tensor, labels: torch.Tensor, noise: torch.Tensor) -> DVAEOutput:
        """`noise`: standard normals of the latent's shape (the caller keys them: seeded per step in
        training, per sample at purification), so the network itself draws nothing."""
        mu, logvar = self.encode(x)
        z = mu + torch.exp(0.5 * logvar) * noise.to(mu.dtype)
        x_hat, p_hat = self.decode(z, labels)
        return DVAEOutput(x_hat, p_hat, mu, logvar)

    def latent_shape(self) -> tuple[int, int, int]:
        return (self.config.latent_channels, *self.config.latent_size)
