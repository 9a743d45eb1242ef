"""The layers of `UNet2D`, under diffusers' parameter names and with its numerics.

The sinusoidal timestep embedding and its MLP, ``ResnetBlock2D``, the
spatial self-attention, the down/up samplers and the ``DownBlock2D`` /
``AttnDownBlock2D``, ``UNetMidBlock2D`` and ``UpBlock2D`` / ``AttnUpBlock2D``
blocks; and the SiLU they all use, whose bits do not depend on a sample's
place in the batch (GroupNorm + SiLU fused on CUDA at inference).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels.group_norm_silu import group_norm_silu
from .unet_config import UNetConfig

__all__ = [
    "silu",
    "norm_silu",
    "timestep_embedding",
    "TimeEmbedding",
    "ResBlock",
    "SelfAttention",
    "Downsample",
    "Upsample",
    "DownBlock",
    "UpBlock",
    "MidBlock",
]


# On CUDA, inference runs GroupNorm + SiLU as one fused Triton kernel (the
# `puregen::group_norm_silu` op); training and CPU keep the unfused ops (the op
# has no autograd, and on CPU its implementation is those same ops).
FUSED_NORM_SILU_ON_CUDA = True


def _fused_norm_silu_applies(x: Tensor) -> bool:
    return FUSED_NORM_SILU_ON_CUDA and x.is_cuda and not torch.is_grad_enabled()


_ATEN_GRAIN_SIZE = 32768  # elements per task below which ATen does not split an elementwise op further


def _threads_split_on_samples(x: Tensor) -> bool:
    """Whether ATen's split of an elementwise op over `x` between threads falls on sample boundaries, with
    each sample starting at a multiple of every vector width (64 elements), so every sample is computed
    the same way wherever it sits."""
    per_sample = x[0].numel()
    dense = x.stride(0) == per_sample and x.is_contiguous(memory_format=(
        torch.channels_last if x.dim() == 4 and not x.is_contiguous() else torch.contiguous_format))
    tasks = min(torch.get_num_threads(), max(1, -(-x.numel() // _ATEN_GRAIN_SIZE)))
    return dense and x.shape[0] % tasks == 0 and per_sample % 64 == 0


def silu(x: Tensor) -> Tensor:
    """SiLU in which a sample's bits do not depend on its place in the batch.

    On CPU, ATen's vectorised SiLU splits a tensor between threads and runs
    the last elements of each share on a scalar path that rounds otherwise, so
    unless the shares end on sample boundaries (`_threads_split_on_samples`:
    2 threads and the engine's micro-batch of 16 do), a sample's bits depend on
    its row in the batch (3 threads, fp32: rows 13, 15, 18, 20 of 21 of the
    tiny UNet changed with the job's cut). At inference such a batch gets one
    call per sample, whose split depends on the sample's shape alone (forced
    on 2 cores, those calls cost about 10% of a DDPM step in fp32 and 20% in
    bf16; nothing where the shares already fall on samples). Training,
    tracing and CUDA keep the one call.
    """
    if (x.is_cuda or x.dim() < 2 or x.shape[0] == 1 or torch.is_grad_enabled() or torch.jit.is_tracing()
            or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export() or _threads_split_on_samples(x)):
        return F.silu(x)
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        torch.ops.aten.silu.out(x[i], out=out[i])
    return out


def norm_silu(x: Tensor, norm: nn.GroupNorm) -> Tensor:
    """``silu(norm(x))``, fused on CUDA at inference."""
    if _fused_norm_silu_applies(x):
        return group_norm_silu(x, norm)
    return silu(norm(x))


def timestep_embedding(
    timesteps: Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 10000.0
) -> Tensor:
    """Sinusoidal embedding [B] -> [B, dim] in float32 (DDPM / diffusers ``Timesteps``).

    Frequencies are ``exp(-ln(max_period) * i / (dim/2 - freq_shift))`` for
    ``i < dim/2``; the output is ``[sin, cos]``, or ``[cos, sin]`` when
    ``flip_sin_to_cos``; an odd ``dim`` gets a zero last column.
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) * -math.log(max_period)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = timesteps.float()[:, None] * freqs[None, :]
    sin, cos = torch.sin(args), torch.cos(args)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimeEmbedding(nn.Module):
    """``linear_1 -> SiLU -> linear_2`` (diffusers ``TimestepEmbedding``)."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(silu(self.linear_1(x)))


class ResBlock(nn.Module):
    """Pre-norm residual block with additive time conditioning (diffusers ``ResnetBlock2D``).

    ``out = (shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))) + proj(silu(temb)))))) / scale``

    `forward` takes ``silu(temb)`` (computed once per UNet call, not per block).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        temb_dim: int,
        groups: int,
        eps: float,
        dropout: float = 0.0,
        output_scale_factor: float = 1.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None
        self.dropout = float(dropout)
        self.output_scale_factor = float(output_scale_factor)

    def forward(self, x: Tensor, temb_act: Tensor) -> Tensor:
        h = self.conv1(norm_silu(x, self.norm1))
        h = h + self.time_emb_proj(temb_act)[:, :, None, None]
        h = norm_silu(h, self.norm2)
        if self.dropout > 0.0:
            h = F.dropout(h, self.dropout, self.training)
        h = self.conv2(h)
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class SelfAttention(nn.Module):
    """Spatial multi-head self-attention with a residual connection.

    Same parameters and numerics as diffusers ``Attention(..., norm_num_groups,
    residual_connection=True)`` run by ``AttnProcessor2_0``: GroupNorm over the
    channels, ``to_q/to_k/to_v`` linears on the H*W tokens, SDPA with scale
    ``head_dim ** -0.5``, ``to_out.0``, add the input, divide by
    ``rescale_output_factor``.
    """

    def __init__(
        self, channels: int, head_dim: int, groups: int, eps: float, rescale_output_factor: float = 1.0
    ) -> None:
        super().__init__()
        self.heads = channels // head_dim
        self.head_dim = head_dim
        inner = self.heads * head_dim
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, inner)
        self.to_k = nn.Linear(channels, inner)
        self.to_v = nn.Linear(channels, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, channels)])
        self.rescale_output_factor = float(rescale_output_factor)

    def forward(self, x: Tensor) -> Tensor:
        b, c, hgt, wid = x.shape
        n = hgt * wid
        tokens = self.group_norm(x).reshape(b, c, n).transpose(1, 2)  # [B, N, C]

        def split(t: Tensor) -> Tensor:  # [B, N, heads*d] -> [B, heads, N, d]
            return t.view(b, n, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.to_q(tokens)), split(self.to_k(tokens)), split(self.to_v(tokens))
        attn = F.scaled_dot_product_attention(q, k, v)
        attn = attn.transpose(1, 2).reshape(b, n, self.heads * self.head_dim)
        out = self.to_out[0](attn).transpose(1, 2).reshape(b, c, hgt, wid)
        out = out + x
        if self.rescale_output_factor != 1.0:
            out = out / self.rescale_output_factor
        return out


class Downsample(nn.Module):
    """Stride-2 3x3 conv. ``padding=0`` pads right/bottom by one first (diffusers)."""

    def __init__(self, channels: int, padding: int = 1) -> None:
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    """``DownBlock2D`` / ``AttnDownBlock2D``: resnets (each optionally followed by attention)."""

    def __init__(
        self, cfg: UNetConfig, in_ch: int, out_ch: int, attention: bool, downsample: bool
    ) -> None:
        super().__init__()
        t, g, eps = cfg.time_embed_dim, cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList(
            ResBlock(in_ch if j == 0 else out_ch, out_ch, t, g, eps, cfg.dropout)
            for j in range(cfg.layers_per_block)
        )
        if attention:
            self.attentions = nn.ModuleList(
                SelfAttention(out_ch, cfg.head_dim(out_ch), g, eps) for _ in range(cfg.layers_per_block)
            )
        else:
            self.attentions = None
        if downsample:
            self.downsamplers = nn.ModuleList([Downsample(out_ch, cfg.downsample_padding)])
        else:
            self.downsamplers = None

    def forward(self, h: Tensor, temb_act: Tensor, skips: list[Tensor]) -> Tensor:
        for j, resnet in enumerate(self.resnets):
            h = resnet(h, temb_act)
            if self.attentions is not None:
                h = self.attentions[j](h)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h


class UpBlock(nn.Module):
    """``UpBlock2D`` / ``AttnUpBlock2D``: ``layers_per_block + 1`` resnets over ``cat([h, skip])``."""

    def __init__(
        self,
        cfg: UNetConfig,
        prev_ch: int,
        out_ch: int,
        skip_in_ch: int,
        attention: bool,
        upsample: bool,
    ) -> None:
        super().__init__()
        t, g, eps = cfg.time_embed_dim, cfg.norm_num_groups, cfg.norm_eps
        n = cfg.layers_per_block + 1
        resnets = []
        for j in range(n):
            # The last resnet of the block consumes the skip saved *before* the
            # matching down block ran (its input channels); the others consume
            # skips with this block's channels.
            skip_ch = skip_in_ch if j == n - 1 else out_ch
            h_ch = prev_ch if j == 0 else out_ch
            resnets.append(ResBlock(h_ch + skip_ch, out_ch, t, g, eps, cfg.dropout))
        self.resnets = nn.ModuleList(resnets)
        if attention:
            self.attentions = nn.ModuleList(
                SelfAttention(out_ch, cfg.head_dim(out_ch), g, eps) for _ in range(n)
            )
        else:
            self.attentions = None
        self.upsamplers = nn.ModuleList([Upsample(out_ch)]) if upsample else None

    def forward(self, h: Tensor, temb_act: Tensor, skips: list[Tensor]) -> Tensor:
        for j, resnet in enumerate(self.resnets):
            h = resnet(torch.cat([h, skips.pop()], dim=1), temb_act)
            if self.attentions is not None:
                h = self.attentions[j](h)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h)
        return h


class MidBlock(nn.Module):
    """``UNetMidBlock2D`` with one layer: resnet, attention, resnet."""

    def __init__(self, cfg: UNetConfig, ch: int) -> None:
        super().__init__()
        t, g, eps, s = cfg.time_embed_dim, cfg.norm_num_groups, cfg.norm_eps, cfg.mid_block_scale_factor
        self.resnets = nn.ModuleList(ResBlock(ch, ch, t, g, eps, cfg.dropout, s) for _ in range(2))
        self.attentions = nn.ModuleList([SelfAttention(ch, cfg.head_dim(ch), g, eps, s)])

    def forward(self, h: Tensor, temb_act: Tensor) -> Tensor:
        h = self.resnets[0](h, temb_act)
        h = self.attentions[0](h)
        return self.resnets[1](h, temb_act)
