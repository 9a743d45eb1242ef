"""Checkpoints: safetensors weights plus a JSON config, loaded from a local folder.

Three layouts load by name (nothing is fetched at run time):

* ours: ``config.json`` with ``"puregen_format": 1``, ``"model_type"`` and
  ``"config"``, beside ``model.safetensors``;
* the published EBM's hub layout: ``config.json`` + ``model.safetensors`` whose
  keys are ``block1.c1.weight`` ... ``l5.weight`` (the architecture is read off
  the weight shapes);
* diffusers UNet folders: ``config.json`` + ``diffusion_pytorch_model.safetensors``.

Pickles are never loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..data.atomic import atomic_directory
from ..errors import CheckpointError
from .ebm import EBM, EBMConfig
from .safetensors_io import load_checked_state, read_json, read_safetensors

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


def _model_from_config(model_type: str, config: dict, path: Path) -> nn.Module:
    try:
        if model_type == "ebm":
            return EBM(EBMConfig.from_dict(config))
        if model_type == "unet":
            from .unet import UNet2D, UNetConfig

            return UNet2D(UNetConfig.from_dict(config))
        if model_type == "classifier":
            from .classifiers import ClassifierConfig, build_classifier

            cfg = ClassifierConfig.from_dict(config)
            return build_classifier(cfg.arch, cfg.in_channels, cfg.num_classes)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid {model_type} config ({e})") from None
    raise CheckpointError(f"{path}: unknown model_type {model_type!r} (expected 'ebm', 'unet' or 'classifier')")


def _ebm_config_from_weights(state: dict[str, torch.Tensor], path: Path) -> EBMConfig:
    w = state.get("block1.c1.weight")
    if w is None or w.ndim != 4:
        raise CheckpointError(f"{path}: not an EBM checkpoint (no 4-D 'block1.c1.weight')")
    return EBMConfig(in_channels=int(w.shape[1]), nf=int(w.shape[0]))


def load_model(path: str | os.PathLike, expect: str | None = None) -> LoadedModel:
    """Load a model from a checkpoint folder (or its weights file) in any known layout."""
    folder = Path(path)
    if folder.is_file() and folder.suffix == ".safetensors":
        folder = folder.parent
    if not folder.exists():
        raise CheckpointError(f"{folder}: checkpoint not found")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: a checkpoint is a folder with config.json and a .safetensors file")

    if (folder / DIFFUSERS_WEIGHTS_FILE).exists():
        from .diffusers_format import load_diffusers_unet

        weights = folder / DIFFUSERS_WEIGHTS_FILE
        loaded = LoadedModel(load_diffusers_unet(folder), "unet", str(folder), "diffusers", file_sha256(weights))
    else:
        weights = folder / WEIGHTS_FILE
        config = read_json(folder / CONFIG_FILE)
        state = read_safetensors(weights)
        if "puregen_format" in config:
            if config["puregen_format"] != FORMAT_VERSION:
                raise CheckpointError(
                    f"{folder / CONFIG_FILE}: puregen_format {config['puregen_format']!r} is not supported "
                    f"(this version reads {FORMAT_VERSION})"
                )
            model_type = config.get("model_type")
            model = _model_from_config(str(model_type), config.get("config", {}), folder / CONFIG_FILE)
            layout = "puregen"
        else:
            model_type = "ebm"
            model = EBM(_ebm_config_from_weights(state, weights))
            layout = "hub-ebm"
        load_checked_state(model, state, weights, CONFIG_FILE if layout == "puregen" else "its weight shapes")
        loaded = LoadedModel(model, model_type, str(folder), layout, file_sha256(weights))

    if expect is not None and loaded.model_type != expect:
        role = {"ebm": "an EBM (--ebm)", "unet": "a DDPM UNet (--ddpm)", "classifier": "a classifier"}
        raise CheckpointError(f"{folder}: holds {role[loaded.model_type]}, but {role[expect]} checkpoint is needed here")
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
