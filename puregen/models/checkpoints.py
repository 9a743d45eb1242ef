"""Checkpoints: safetensors weights plus a JSON config, loaded from a local folder.

Three layouts load by name (nothing is fetched at run time):

* ours: ``config.json`` with ``"puregen_format": 1``, ``"model_type"`` and
  ``"config"``, beside ``model.safetensors``;
* the published EBM's hub layout: ``config.json`` + ``model.safetensors`` whose
  keys are ``block1.c1.weight`` ... ``l5.weight`` (the architecture is read off
  the weight shapes);
* diffusers UNet folders: ``config.json`` + ``diffusion_pytorch_model.safetensors``.

Pickles are never loaded.

Loading checks before it allocates: the config's values must be integers
(not bools, floats or strings) within bounds (`CONFIG_LIMITS`) and its
floats finite; the model is then built on the meta device (no memory) and
its keys and shapes compared with the safetensors header alone; only then
are the tensors read. So a config asking for a huge width is a clear error
that costs nothing, and a model can only take the memory its weights file
really holds.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..data.atomic import atomic_directory
from ..errors import CheckpointError
from .ebm import EBM, EBMConfig
from .safetensors_io import check_state_shapes, load_checked_state, read_json, read_safetensors, read_safetensors_header

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
DIFFUSERS_WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


@dataclass
class LoadedModel:
    model: nn.Module
    model_type: str  # "ebm", "unet" or "classifier"
    path: str
    layout: str  # "puregen", "hub-ebm" or "diffusers"
    fingerprint: str  # sha256 of the weights file


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


#: Bounds on config values: (lowest, highest) for the integer fields a model's size grows with.
CONFIG_LIMITS = {
    "in_channels": (1, 16),
    "out_channels": (1, 16),
    "nf": (1, 8192),
    "num_classes": (2, 1 << 20),
    "block_out_channels": (1, 8192),
    "levels": (1, 8),  # entries of block_out_channels / down_block_types / up_block_types
    "layers_per_block": (1, 16),
    "norm_num_groups": (1, 8192),
    "time_embedding_dim": (1, 1 << 16),
    "attention_head_dim": (1, 8192),
    "sample_size": (1, 1 << 14),
    "num_train_timesteps": (1, 10**7),
    "image_height": (2, 1 << 14),
    "image_width": (2, 1 << 14),
    "width": (2, 8192),
    "latent_channels": (1, 8192),
}
_UNET_FLOATS = ("freq_shift", "mid_block_scale_factor", "norm_eps", "dropout")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_int(value, field: str, path: Path, model_type: str, limit: str | None = None, optional: bool = False):
    if optional and value is None:
        return
    lo, hi = CONFIG_LIMITS[limit or field]
    if not _is_int(value) or not lo <= value <= hi:
        null = "null or " if optional else ""
        raise CheckpointError(
            f"{path}: invalid {model_type} config: {field} = {_short(value)}; must be {null}an integer in [{lo}, {hi}]"
        )


def check_config_values(model_type: str, config, path: Path) -> None:
    """Types and bounds of the values a model is built from (see `CONFIG_LIMITS`), before it is built."""
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{path}: invalid {model_type} config: expected a JSON object, got {type(config).__name__}"
        )
    if model_type == "dvae":
        fields = ("in_channels", "image_height", "image_width", "num_classes", "width", "latent_channels")
        missing = [f for f in fields if f not in config]
        if missing:
            raise CheckpointError(f"{path}: invalid dvae config: missing {', '.join(missing)}")
        for field in fields:
            _check_int(config[field], field, path, model_type)
        return
    if model_type in ("ebm", "classifier"):
        fields = ("in_channels", "nf") if model_type == "ebm" else ("arch", "in_channels", "num_classes")
        missing = [f for f in fields if f not in config]
        if missing:
            raise CheckpointError(f"{path}: invalid {model_type} config: missing {', '.join(missing)}")
        for field in fields:
            if field == "arch":
                from .classifiers import ARCHITECTURES

                if config["arch"] not in ARCHITECTURES:
                    raise CheckpointError(
                        f"{path}: invalid classifier config: arch = {_short(config['arch'])}; "
                        f"expected one of {', '.join(ARCHITECTURES)}"
                    )
            else:
                _check_int(config[field], field, path, model_type)
        return
    if model_type != "unet":
        return  # an unknown model_type is refused by the caller
    for field in ("in_channels", "out_channels", "layers_per_block", "norm_num_groups"):
        if field in config:
            _check_int(config[field], field, path, "unet")
    for field in ("time_embedding_dim", "attention_head_dim", "num_train_timesteps"):
        if field in config:
            _check_int(config[field], field, path, "unet", optional=True)
    lo, hi = CONFIG_LIMITS["levels"]
    for field in ("block_out_channels", "down_block_types", "up_block_types"):
        value = config.get(field)
        if value is not None and (not isinstance(value, list) or not lo <= len(value) <= hi):
            raise CheckpointError(
                f"{path}: invalid unet config: {field} = {_short(value)}; must be a list of {lo} to {hi} entries"
            )
    for i, c in enumerate(config.get("block_out_channels") or ()):
        _check_int(c, f"block_out_channels[{i}]", path, "unet", limit="block_out_channels")
    size = config.get("sample_size")
    if isinstance(size, list):
        if len(size) != 2:
            raise CheckpointError(f"{path}: invalid unet config: sample_size = {_short(size)}; must be [height, width]")
        for i, v in enumerate(size):
            _check_int(v, f"sample_size[{i}]", path, "unet", limit="sample_size")
    elif "sample_size" in config:
        _check_int(size, "sample_size", path, "unet", optional=True)
    for field in _UNET_FLOATS:
        v = config.get(field)
        if isinstance(v, float) and not math.isfinite(v):
            raise CheckpointError(f"{path}: invalid unet config: {field} = {v!r}; must be a finite number")


def _model_from_config(model_type: str, config: dict, path: Path) -> nn.Module:
    """The model `config` describes, built on the meta device (its tensors take no memory)."""
    if model_type not in ("ebm", "unet", "classifier", "dvae"):
        raise CheckpointError(
            f"{path}: unknown model_type {_short(model_type)} (expected 'ebm', 'unet', 'classifier' or 'dvae')"
        )
    check_config_values(model_type, config, path)
    with torch.device("meta"):
        return _build(model_type, config, path)


def _build(model_type: str, config: dict, path: Path) -> nn.Module:
    try:
        if model_type == "ebm":
            return EBM(EBMConfig.from_dict(config))
        if model_type == "unet":
            from .unet import UNet2D
            from .unet_config import UNetConfig

            return UNet2D(UNetConfig.from_dict(config))
        if model_type == "dvae":
            from .dvae import DVAE, DVAEConfig

            return DVAE(DVAEConfig.from_dict(config))
        if model_type == "classifier":
            from .classifiers import ClassifierConfig, build_classifier

            cfg = ClassifierConfig.from_dict(config)
            return build_classifier(cfg.arch, cfg.in_channels, cfg.num_classes)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid {model_type} config ({e})") from None
    raise CheckpointError(f"{path}: unknown model_type {model_type!r} (expected 'ebm', 'unet' or 'classifier')")


def _ebm_config_from_weights(shapes: dict[str, tuple[int, ...]], path: Path) -> EBMConfig:
    w = shapes.get("block1.c1.weight")
    if w is None or len(w) != 4:
        raise CheckpointError(f"{path}: not an EBM checkpoint (no 4-D 'block1.c1.weight')")
    check_config_values("ebm", {"in_channels": int(w[1]), "nf": int(w[0])}, path)
    return EBMConfig(in_channels=int(w[1]), nf=int(w[0]))


def load_model(path: str | os.PathLike, expect: str | None = None) -> LoadedModel:
    """Load a model from a checkpoint folder (or its weights file) in any known layout."""
    folder = Path(path)
    if folder.is_file() and folder.suffix == ".safetensors":
        folder = folder.parent
    if not folder.exists():
        raise CheckpointError(f"{folder}: checkpoint not found")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: a checkpoint is a folder with config.json and a .safetensors file")

    role = {"ebm": "an EBM (--ebm)", "unet": "a DDPM UNet (--ddpm)", "classifier": "a classifier",
            "dvae": "a D-VAE stage (--dvae)"}

    def check_expected(model_type: str) -> None:
        if expect is not None and model_type != expect:
            raise CheckpointError(f"{folder}: holds {role[model_type]}, but {role[expect]} checkpoint is needed here")

    if (folder / DIFFUSERS_WEIGHTS_FILE).exists():
        from .diffusers_format import load_diffusers_unet

        weights = folder / DIFFUSERS_WEIGHTS_FILE
        check_config_values("unet", read_json(folder / CONFIG_FILE), folder / CONFIG_FILE)  # before it is built
        check_expected("unet")
        loaded = LoadedModel(load_diffusers_unet(folder), "unet", str(folder), "diffusers", file_sha256(weights))
    else:
        weights = folder / WEIGHTS_FILE
        config = read_json(folder / CONFIG_FILE)
        shapes = {name: shape for name, (_dtype, shape) in read_safetensors_header(weights).items()}
        if "puregen_format" in config:
            version = config["puregen_format"]
            if not _is_int(version) or version != FORMAT_VERSION:
                raise CheckpointError(
                    f"{folder / CONFIG_FILE}: puregen_format {_short(version)} is not supported "
                    f"(this version reads {FORMAT_VERSION})"
                )
            model_type = config.get("model_type")
            model = _model_from_config(model_type, config.get("config", {}), folder / CONFIG_FILE)
            layout = "puregen"
        else:
            model_type = "ebm"
            with torch.device("meta"):
                model = EBM(_ebm_config_from_weights(shapes, weights))
            layout = "hub-ebm"
        check_expected(model_type)
        described_by = CONFIG_FILE if layout == "puregen" else "its weight shapes"
        # Keys and shapes from the header alone, before a tensor is read or allocated.
        check_state_shapes(model, shapes, weights, described_by)
        state = read_safetensors(weights)
        load_checked_state(model, state, weights, described_by)
        loaded = LoadedModel(model, model_type, str(folder), layout, file_sha256(weights))
    loaded.model.eval()
    return loaded


def write_model_files(model: nn.Module, model_type: str, folder: Path) -> None:
    """Our layout's two files (config.json, model.safetensors) into an existing folder."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    meta = {"puregen_format": FORMAT_VERSION, "model_type": model_type, "config": model.config.to_dict()}
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def model_type_of(model: nn.Module) -> str:
    if isinstance(model, EBM):
        return "ebm"
    from .unet import UNet2D

    if isinstance(model, UNet2D):
        return "unet"
    from .dvae import DVAE

    if isinstance(model, DVAE):
        return "dvae"
    from .classifiers import ClassifierConfig

    if isinstance(getattr(model, "config", None), ClassifierConfig):
        return "classifier"
    raise TypeError(f"cannot save a {type(model).__name__}")


def save_model(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write `model` in our layout, atomically (a temporary folder, then a rename)."""
    model_type = model_type_of(model)
    folder = Path(path)
    with atomic_directory(folder) as tmp:
        write_model_files(model, model_type, tmp)
    return folder
