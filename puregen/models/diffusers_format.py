"""Read and write diffusers ``UNet2DModel`` folders (``config.json`` + safetensors).

Only local folders are read (never the network), only with safetensors (never
pickle). Every problem with the folder raises `CheckpointError` whose message
starts with the path of the offending file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from puregen.errors import CheckpointError
from puregen.models.safetensors_io import load_checked_state, read_json, read_safetensors
from puregen.models.unet import UNet2D
from puregen.models.unet_config import UNetConfig

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "load_diffusers_unet", "save_diffusers_unet"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

# Pre-0.14 diffusers checkpoints name the attention projections differently.
_LEGACY_ATTENTION_NAMES = {
    "query": "to_q",
    "key": "to_k",
    "value": "to_v",
    "proj_attn": "to_out.0",
}
def read_config(path: str | os.PathLike[str]) -> UNetConfig:
    """Parse a diffusers ``config.json`` into a `UNetConfig` (errors name the file)."""
    raw = read_json(path)
    try:
        return UNetConfig.from_dict(raw)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def _rename_legacy_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        # ... .attentions.<j>.<legacy name>.<weight|bias>
        if len(parts) >= 4 and parts[-4] == "attentions" and parts[-2] in _LEGACY_ATTENTION_NAMES:
            key = ".".join([*parts[:-2], _LEGACY_ATTENTION_NAMES[parts[-2]], parts[-1]])
        out[key] = value
    return out


def load_diffusers_unet(
    folder: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = torch.float32,
) -> UNet2D:
    """Load a diffusers ``UNet2DModel`` folder into a `UNet2D` (in eval mode).

    ``folder`` must hold ``config.json`` and ``diffusion_pytorch_model.safetensors``.
    Floating-point weights are cast to ``dtype`` (``None`` keeps the file's
    dtypes). Checkpoints with the pre-0.14 attention names (``query``, ``key``,
    ``value``, ``proj_attn``) are renamed on the fly, as diffusers does.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder not found (or not a folder)")
    config = read_config(folder / CONFIG_NAME)

    weights = folder / WEIGHTS_NAME
    state = _rename_legacy_keys(read_safetensors(weights, device))
    with torch.device("meta"):
        model = UNet2D(config)
    load_checked_state(model, state, weights, CONFIG_NAME, dtype)
    return model.eval()


def _atomic_write(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_diffusers_unet(model: UNet2D, folder: str | os.PathLike[str]) -> Path:
    """Write ``model`` as a diffusers folder (``config.json`` + safetensors); returns the folder.

    The result loads with `load_diffusers_unet` and with diffusers'
    ``UNet2DModel.from_pretrained(folder)``.
    """
    if not isinstance(model, UNet2D):
        raise TypeError(f"save_diffusers_unet needs a UNet2D, got {type(model).__name__}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    _atomic_write(
        folder / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"})
    )
    text = json.dumps(model.config.to_dict(), indent=2, sort_keys=True) + "\n"
    _atomic_write(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return folder
