"""`UNetConfig`: the ``UNet2DModel`` config fields `UNet2D` is built from, and its presets.

Field names and defaults are diffusers', so a diffusers ``config.json`` loads
unchanged. Everything that diffusers supports and we do not (class
conditioning, Fourier or learned time embeddings, scale-shift time
conditioning, ResNet down/up-samplers, other block types, ...) is rejected
with a `ValueError` that names the field and the value.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["SUPPORTED_DOWN_BLOCKS", "SUPPORTED_UP_BLOCKS", "UNetConfig"]

SUPPORTED_DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D")
SUPPORTED_UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D")
DIFFUSERS_CLASS_NAME = "UNet2DModel"


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
