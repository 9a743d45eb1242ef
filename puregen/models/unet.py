"""Epsilon-prediction UNet compatible with diffusers' ``UNet2DModel`` checkpoints.

`UNet2D` is a plain ``nn.Module`` whose parameter names, layout and numerics
follow diffusers' ``UNet2DModel`` for the subset of configurations that DDPM
models use: positional (sinusoidal) timestep embedding, ``DownBlock2D`` /
``AttnDownBlock2D`` down blocks, a ``UNetMidBlock2D`` with one self-attention,
and ``UpBlock2D`` / ``AttnUpBlock2D`` up blocks. A diffusers
``diffusion_pytorch_model.safetensors`` state dict loads into it with
``load_state_dict(strict=True)`` unchanged (see
``puregen.models.diffusers_format`` for the folder reader/writer).

The config is `puregen.models.unet_config.UNetConfig` (which rejects what
diffusers supports and we do not), the layers are in
`puregen.models.unet_blocks`, and the FLOP count of a config is
`puregen.bench.flops.count_unet_flops`.

Data flow of `UNet2D.forward` (B = batch):

    t [B] -> sinusoid [B, C0] -> linear_1 -> SiLU -> linear_2 -> temb [B, 4*C0]
    x [B, Cin, H, W] -> conv_in -> down blocks (every output kept as a skip)
      -> mid (resnet, attention, resnet)
      -> up blocks (each resnet concatenates one skip, last-in first-out)
      -> GroupNorm -> SiLU -> conv_out -> eps [B, Cout, H, W]
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .unet_blocks import DownBlock, MidBlock, TimeEmbedding, UpBlock, norm_silu, silu, timestep_embedding
from .unet_config import UNetConfig

__all__ = ["UNet2D"]


class UNet2D(nn.Module):
    """Epsilon-prediction UNet with diffusers ``UNet2DModel`` parameter names.

    ``forward(sample [B, C, H, W], timesteps) -> eps [B, C_out, H, W]``. H and W
    must be multiples of `pad_multiple` (the caller pads; the model does not).
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        if not isinstance(config, UNetConfig):
            raise TypeError(f"UNet2D needs a UNetConfig, got {type(config).__name__}")
        self.config = config
        ch = config.block_out_channels
        levels = len(ch)
        temb_dim = config.time_embed_dim

        self.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimeEmbedding(ch[0], temb_dim)

        self.down_blocks = nn.ModuleList()
        prev = ch[0]
        for i, kind in enumerate(config.down_block_types):
            self.down_blocks.append(
                DownBlock(config, prev, ch[i], kind == "AttnDownBlock2D", downsample=i < levels - 1)
            )
            prev = ch[i]

        self.mid_block = MidBlock(config, ch[-1])

        self.up_blocks = nn.ModuleList()
        rev = ch[::-1]
        prev = rev[0]
        for i, kind in enumerate(config.up_block_types):
            skip_in = rev[min(i + 1, levels - 1)]
            self.up_blocks.append(
                UpBlock(config, prev, rev[i], skip_in, kind == "AttnUpBlock2D", upsample=i < levels - 1)
            )
            prev = rev[i]

        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, ch[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], config.out_channels, 3, padding=1)

    @property
    def pad_multiple(self) -> int:
        """Input height and width must be divisible by this (2 ** number of downsamplers)."""
        return self.config.pad_multiple

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _timesteps(self, timesteps: Tensor | int | float, batch: int, device: torch.device) -> Tensor:
        if not torch.is_tensor(timesteps):
            if isinstance(timesteps, bool) or not isinstance(timesteps, (int, float)):
                raise ValueError(f"timesteps must be a tensor or a number, got {type(timesteps).__name__}")
            dtype = torch.long if isinstance(timesteps, int) else torch.float32
            timesteps = torch.tensor([timesteps], dtype=dtype, device=device)
        if timesteps.ndim == 0:
            timesteps = timesteps[None]
        if timesteps.ndim != 1 or timesteps.shape[0] not in (1, batch):
            raise ValueError(
                f"timesteps must be a scalar or have shape [{batch}], got {tuple(timesteps.shape)}"
            )
        return timesteps.to(device).expand(batch)

    def forward(self, sample: Tensor, timesteps: Tensor | int | float) -> Tensor:
        cfg = self.config
        if sample.ndim != 4 or sample.shape[1] != cfg.in_channels:
            raise ValueError(
                f"sample must have shape [B, {cfg.in_channels}, H, W], got {tuple(sample.shape)}"
            )
        m = cfg.pad_multiple
        if sample.shape[2] % m or sample.shape[3] % m:
            raise ValueError(
                f"sample height and width must be multiples of {m} (2 ** number of downsamplers), "
                f"got {sample.shape[2]}x{sample.shape[3]}; pad the input first"
            )
        t = self._timesteps(timesteps, sample.shape[0], sample.device)
        t_emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = self.time_embedding(t_emb.to(self.conv_in.weight.dtype))
        temb_act = silu(temb)  # every resnet applies SiLU before its projection

        h = self.conv_in(sample)
        skips = [h]
        for block in self.down_blocks:
            h = block(h, temb_act, skips)
        h = self.mid_block(h, temb_act)
        for block in self.up_blocks:
            h = block(h, temb_act, skips)
        h = norm_silu(h, self.conv_norm_out)
        return self.conv_out(h)
