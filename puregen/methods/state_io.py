"""A dataset state on disk: its JSON values in one file, its tensors in a safetensors file beside it.

A fit method's state is part of a job's resumable state: the pipeline writes it
into the job's work folder once the fit is done, and a resumed job reads it
back instead of fitting again. Both files are written atomically, the tensors
first, so a state whose JSON file exists is whole.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save

from ..data.atomic import atomic_write_file
from ..models.safetensors_io import read_json, read_safetensors
from .base import DatasetState


def tensors_path(path: Path) -> Path:
    return path.with_suffix(".safetensors")


def save_state(path: Path, state: DatasetState) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if torch.is_tensor(v)}
    values = {k: v for k, v in state.items() if not torch.is_tensor(v)}
    if tensors:
        with atomic_write_file(tensors_path(path)) as f:
            f.write(save(tensors))
    blob = json.dumps({"values": _encode(values), "tensors": sorted(tensors)}, sort_keys=True, indent=1)
    with atomic_write_file(path) as f:
        f.write(blob.encode())


def load_state(path: Path) -> DatasetState:
    data = read_json(path)
    state = _decode(data.get("values", {}))
    names = data.get("tensors", [])
    if names:
        tensors = read_safetensors(tensors_path(path))
        missing = sorted(set(names) - set(tensors))
        if missing:
            raise ValueError(f"{tensors_path(path)}: lacks the state's tensors {missing}")
        state.update({k: tensors[k] for k in names})
    return state


# JSON has no infinities: a boundary of -inf (purify everything) is stored as a string.
def _encode(values: dict) -> dict:
    return {k: (repr(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}


def _decode(values: dict) -> dict:
    return {k: (float(v) if v in ("inf", "-inf", "nan") else v) for k, v in values.items()}
