"""Resumable training checkpoints without pickle.

A run folder holds the model to use (our checkpoint layout: ``config.json`` +
``model.safetensors``, so the run folder itself loads as a checkpoint) and the
state needed to continue exactly: ``training_state.safetensors`` (raw weights,
optimizer moments, and any extra tensors such as the EBM's sample bank) and
``training_state.json`` (step, recipe, optimizer hyperparameters, data
fingerprint, loss history). The whole folder is replaced atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..data.atomic import atomic_directory
from ..errors import CheckpointError
from ..models.checkpoints import model_type_of, write_model_files
from ..models.safetensors_io import read_json, read_safetensors

STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"
STATE_VERSION = 1


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, entries in sd["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{pid}.{name}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _unflatten_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    for key, value in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_training_state(
    folder: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    info: dict,
    export_model: nn.Module | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a resumable checkpoint; `export_model` (e.g. EMA weights) is the one used for purification."""
    from safetensors.torch import save_file

    folder = Path(folder)
    exported = export_model if export_model is not None else model
    tensors, optim_meta = _flatten_optimizer(optimizer)
    tensors.update({f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()})
    for k, v in (extra_tensors or {}).items():
        tensors[f"extra.{k}"] = v.detach().contiguous().cpu()
    meta = {"state_version": STATE_VERSION, "step": step, "optimizer": optim_meta, **info}
    with atomic_directory(folder) as tmp:
        write_model_files(exported, model_type_of(exported), tmp)
        save_file(tensors, str(tmp / STATE_TENSORS))
        (tmp / STATE_JSON).write_text(json.dumps(meta, indent=2, default=float) + "\n")
    return folder


def snapshot_folder(run_dir: str | Path) -> Path:
    """Where `write_snapshot` keeps a run's snapshots: beside the run, which is replaced whole on every save."""
    run_dir = Path(run_dir)
    return run_dir.with_name(run_dir.name + ".snapshots")


def write_snapshot(run_dir: str | Path, step: int, model: nn.Module, suffix: str = "") -> Path:
    """Keep `model` at `step` as a loadable checkpoint (`RUN.snapshots/step-NNNNNN[SUFFIX]`)."""
    folder = snapshot_folder(run_dir) / f"step-{step:06d}{suffix}"
    with atomic_directory(folder) as tmp:
        write_model_files(model, model_type_of(model), tmp)
    return folder


def load_training_state(
    folder: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore `model` and `optimizer` in place; returns (the JSON info, the extra tensors)."""
    folder = Path(folder)
    meta = read_json(folder / STATE_JSON)
    if meta.get("state_version") != STATE_VERSION:
        raise CheckpointError(f"{folder / STATE_JSON}: unsupported training state version {meta.get('state_version')!r}")
    tensors = read_safetensors(folder / STATE_TENSORS)
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    expected = model.state_dict()
    bad = [k for k in expected if k not in weights or weights[k].shape != expected[k].shape]
    if bad or len(weights) != len(expected):
        raise CheckpointError(
            f"{folder / STATE_TENSORS}: the saved model does not match this run's model "
            f"(first mismatch: {bad[:3] or 'extra keys'}); resume with the same recipe or start a new run"
        )
    model.load_state_dict(weights)
    try:
        _unflatten_optimizer(optimizer, tensors, meta["optimizer"])
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{folder / STATE_TENSORS}: optimizer state does not fit this run ({e})") from None
    extra = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
    return meta, extra


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator that depends only on (seed, step), so a resumed run draws what an unbroken one would."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step * 7919 + 1) % (2**63 - 1))
    return g
