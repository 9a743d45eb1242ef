"""Epsilon-prediction UNet compatible with diffusers' ``UNet2DModel`` checkpoints.

`UNet2D` is a plain ``nn.Module`` whose parameter names, layout and numerics
follow diffusers' ``UNet2DModel`` for the subset of configurations that DDPM
models use: positional (sinusoidal) timestep embedding, ``DownBlock2D`` /
``AttnDownBlock2D`` down blocks, a ``UNetMidBlock2D`` with one self-attention,
and ``UpBlock2D`` / ``AttnUpBlock2D`` up blocks. A diffusers
``diffusion_pytorch_model.safetensors`` state dict loads into it with
``load_state_dict(strict=True)`` unchanged (see
``puregen.models.diffusers_format`` for the folder reader/writer).

Everything that diffusers supports and we do not (class conditioning, Fourier
or learned time embeddings, scale-shift time conditioning, ResNet
down/up-samplers, other block types, ...) is rejected by `UNetConfig` with a
`ValueError` that names the field and the value.

Data flow of `UNet2D.forward` (B = batch):

    t [B] -> sinusoid [B, C0] -> linear_1 -> SiLU -> linear_2 -> temb [B, 4*C0]
    x [B, Cin, H, W] -> conv_in -> down blocks (every output kept as a skip)
      -> mid (resnet, attention, resnet)
      -> up blocks (each resnet concatenates one skip, last-in first-out)
      -> GroupNorm -> SiLU -> conv_out -> eps [B, Cout, H, W]
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels.group_norm_silu import group_norm_silu

__all__ = [
    "SUPPORTED_DOWN_BLOCKS",
    "SUPPORTED_UP_BLOCKS",
    "UNetConfig",
    "UNet2D",
    "count_flops",
    "timestep_embedding",
]

SUPPORTED_DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D")
SUPPORTED_UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D")
DIFFUSERS_CLASS_NAME = "UNet2DModel"


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


# --------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class UNetConfig:
    """The ``UNet2DModel`` config fields, with diffusers' defaults.

    Field names and defaults are those of ``diffusers.UNet2DModel.__init__`` so
    a ``config.json`` that omits a key means the same thing here as there.
    Fields that select features puregen does not implement must keep their
    default value (or an equivalent one); anything else raises ``ValueError``.
    """

    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 3
    out_channels: int = 3
    center_input_sample: bool = False  # must be False
    time_embedding_type: str = "positional"  # must be "positional"
    time_embedding_dim: int | None = None  # None -> 4 * block_out_channels[0]
    freq_shift: float = 0
    flip_sin_to_cos: bool = True
    down_block_types: tuple[str, ...] = (
        "DownBlock2D",
        "AttnDownBlock2D",
        "AttnDownBlock2D",
        "AttnDownBlock2D",
    )
    mid_block_type: str | None = "UNetMidBlock2D"  # must be "UNetMidBlock2D"
    up_block_types: tuple[str, ...] = (
        "AttnUpBlock2D",
        "AttnUpBlock2D",
        "AttnUpBlock2D",
        "UpBlock2D",
    )
    block_out_channels: tuple[int, ...] = (224, 448, 672, 896)
    layers_per_block: int = 2
    mid_block_scale_factor: float = 1
    downsample_padding: int = 1  # 1, or 0 (pad right/bottom by one, as diffusers)
    downsample_type: str = "conv"  # must be "conv"
    upsample_type: str = "conv"  # must be "conv"
    dropout: float = 0.0  # only active in train mode, like diffusers
    act_fn: str = "silu"  # "silu" (or its alias "swish")
    attention_head_dim: int | None = 8  # None -> one head of all channels
    norm_num_groups: int = 32
    attn_norm_num_groups: int | None = None  # None or == norm_num_groups
    norm_eps: float = 1e-5
    resnet_time_scale_shift: str = "default"  # must be "default"
    add_attention: bool = True  # must be True
    class_embed_type: str | None = None  # must be None
    num_class_embeds: int | None = None  # must be None
    num_train_timesteps: int | None = None  # only used by "learned" embeddings; kept

    # ---------------------------------------------------------------- checks
    def __post_init__(self) -> None:
        # JSON gives lists; store tuples so the config is hashable and immutable.
        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(value))
            else:
                raise ValueError(f"UNet config: {name} must be a list, got {value!r}")
        if isinstance(self.sample_size, list):
            object.__setattr__(self, "sample_size", tuple(self.sample_size))
        self._validate()

    def _validate(self) -> None:
        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"UNet config: {field} = {getattr(self, field)!r}: {why}")

        # features puregen does not implement
        fixed = {
            "center_input_sample": False,
            "time_embedding_type": "positional",
            "mid_block_type": "UNetMidBlock2D",
            "downsample_type": "conv",
            "upsample_type": "conv",
            "resnet_time_scale_shift": "default",
            "add_attention": True,
            "class_embed_type": None,
            "num_class_embeds": None,
        }
        for field, wanted in fixed.items():
            if getattr(self, field) != wanted or type(getattr(self, field)) is not type(wanted):
                raise bad(field, f"unsupported value; puregen supports only {wanted!r}")
        if self.act_fn not in ("silu", "swish"):
            raise bad("act_fn", "unsupported activation; puregen supports only 'silu'")

        for i, kind in enumerate(self.down_block_types):
            if kind not in SUPPORTED_DOWN_BLOCKS:
                raise ValueError(
                    f"UNet config: unsupported down block type {kind!r} (down_block_types[{i}]); "
                    f"puregen supports only {', '.join(SUPPORTED_DOWN_BLOCKS)}"
                )
        for i, kind in enumerate(self.up_block_types):
            if kind not in SUPPORTED_UP_BLOCKS:
                raise ValueError(
                    f"UNet config: unsupported up block type {kind!r} (up_block_types[{i}]); "
                    f"puregen supports only {', '.join(SUPPORTED_UP_BLOCKS)}"
                )

        channels = self.block_out_channels
        if not channels or not all(_is_int(c) and c > 0 for c in channels):
            raise bad("block_out_channels", "must be a non-empty list of positive integers")
        if len(self.down_block_types) != len(channels) or len(self.up_block_types) != len(channels):
            raise ValueError(
                "UNet config: block_out_channels, down_block_types and up_block_types must have "
                f"the same length, got {len(channels)}, {len(self.down_block_types)} and "
                f"{len(self.up_block_types)}"
            )
        for field in ("in_channels", "out_channels", "layers_per_block", "norm_num_groups"):
            value = getattr(self, field)
            if not _is_int(value) or value <= 0:
                raise bad(field, "must be a positive integer")
        if self.time_embedding_dim is not None and (
            not _is_int(self.time_embedding_dim) or self.time_embedding_dim <= 0
        ):
            raise bad("time_embedding_dim", "must be null or a positive integer")
        if self.num_train_timesteps is not None and not _is_int(self.num_train_timesteps):
            raise bad("num_train_timesteps", "must be null or an integer")
        for c in channels:
            if c % self.norm_num_groups:
                raise bad(
                    "norm_num_groups",
                    f"does not divide block_out_channels entry {c} (GroupNorm needs it to)",
                )
        if self.attn_norm_num_groups is not None and self.attn_norm_num_groups != self.norm_num_groups:
            raise bad("attn_norm_num_groups", "unsupported; must be null or equal norm_num_groups")
        if not _is_number(self.norm_eps) or not self.norm_eps > 0:
            raise bad("norm_eps", "must be a positive number")
        if not _is_number(self.freq_shift):
            raise bad("freq_shift", "must be a number")
        if not isinstance(self.flip_sin_to_cos, bool):
            raise bad("flip_sin_to_cos", "must be true or false")
        if not _is_number(self.mid_block_scale_factor) or not self.mid_block_scale_factor > 0:
            raise bad("mid_block_scale_factor", "must be a positive number")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", "must be in [0, 1)")
        if self.downsample_padding not in (0, 1) or not _is_int(self.downsample_padding):
            raise bad("downsample_padding", "unsupported; puregen supports 0 or 1")
        if self.attention_head_dim is not None:
            if not _is_int(self.attention_head_dim) or self.attention_head_dim <= 0:
                raise bad("attention_head_dim", "must be null or a positive integer")
            attn_channels = [channels[-1]]  # the mid block always has attention
            attn_channels += [c for c, k in zip(channels, self.down_block_types) if k.startswith("Attn")]
            rev = channels[::-1]
            attn_channels += [c for c, k in zip(rev, self.up_block_types) if k.startswith("Attn")]
            for c in attn_channels:
                if c < self.attention_head_dim:
                    raise bad("attention_head_dim", f"is larger than an attention block's {c} channels")
        s = self.sample_size
        if s is not None and not (
            _is_int(s) or (isinstance(s, tuple) and len(s) == 2 and all(_is_int(v) for v in s))
        ):
            raise bad("sample_size", "must be null, an integer or [height, width]")

    # ------------------------------------------------------------ derived
    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @property
    def pad_multiple(self) -> int:
        """Input height and width must be multiples of this (2 ** downsamplers)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def head_dim(self, channels: int) -> int:
        return self.attention_head_dim if self.attention_head_dim is not None else channels

    # ------------------------------------------------------------ (de)serialise
    def to_dict(self) -> dict[str, Any]:
        """diffusers-style ``config.json`` content (JSON-ready: lists, not tuples)."""
        out: dict[str, Any] = {"_class_name": DIFFUSERS_CLASS_NAME}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UNetConfig:
        """Build from a diffusers ``config.json`` dict.

        Keys starting with ``_`` (``_diffusers_version``, ``_name_or_path``...)
        are bookkeeping and ignored, except ``_class_name`` which, when present,
        must be ``"UNet2DModel"``. Any other unknown key is rejected, because it
        might change the architecture in a way we do not reproduce.
        """
        if not isinstance(d, dict):
            raise ValueError(f"UNet config must be a JSON object, got {type(d).__name__}")
        class_name = d.get("_class_name", DIFFUSERS_CLASS_NAME)
        if class_name != DIFFUSERS_CLASS_NAME:
            raise ValueError(
                f"UNet config: unsupported model class _class_name = {class_name!r}; "
                f"puregen supports only {DIFFUSERS_CLASS_NAME!r}"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if not k.startswith("_") and k not in known)
        if unknown:
            raise ValueError(f"UNet config: unsupported key(s) {unknown}")
        return cls(**{k: v for k, v in d.items() if k in known})

    def replace(self, **changes: Any) -> UNetConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------ presets
    @classmethod
    def paper(cls) -> UNetConfig:
        """diffusers' 6-level DDPM layout for 32x32 RGB (about 113.7 M parameters)."""
        return cls(
            sample_size=32,
            in_channels=3,
            out_channels=3,
            block_out_channels=(128, 128, 256, 256, 512, 512),
            layers_per_block=2,
            down_block_types=(
                "DownBlock2D",
                "DownBlock2D",
                "DownBlock2D",
                "DownBlock2D",
                "AttnDownBlock2D",
                "DownBlock2D",
            ),
            up_block_types=(
                "UpBlock2D",
                "AttnUpBlock2D",
                "UpBlock2D",
                "UpBlock2D",
                "UpBlock2D",
                "UpBlock2D",
            ),
            attention_head_dim=8,
            norm_num_groups=32,
        )

    @classmethod
    def tiny(cls, in_channels: int = 1, sample_size: int = 28) -> UNetConfig:
        """A small 3-level model for 28x28 grey images (Fashion-MNIST); fast on CPU."""
        return cls(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=in_channels,
            block_out_channels=(16, 32, 32),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=16,
            norm_num_groups=8,
        )


# --------------------------------------------------------------------------
# layers
# --------------------------------------------------------------------------


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


# --------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------


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


# --------------------------------------------------------------------------
# FLOP count
# --------------------------------------------------------------------------


def count_flops(config: UNetConfig, height: int, width: int) -> int:
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
