"""Checked reading of checkpoint files: JSON configs and safetensors weights.

Every problem raises `CheckpointError` whose message starts with the path of
the offending file. Pickles are never read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError

_SHOW = 5  # how many offending keys a message lists


def _first(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOW])
    return shown + (f" (and {len(items) - _SHOW} more)" if len(items) > _SHOW else "")


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: config file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read config file: {e}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def read_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own error types (and OSError)
        raise CheckpointError(f"{path}: cannot read safetensors file (truncated or corrupt?): {e}") from None


def load_checked_state(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    weights: Path,
    described_by: str = "config.json",
    dtype: torch.dtype | None = torch.float32,
) -> nn.Module:
    """Load `state` into `model` strictly, after checking keys, shapes, dtypes and finiteness.

    `model` may live on the meta device: the loaded tensors are assigned.
    """
    own = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in own.items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_first(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_first(unexpected)}")
        raise CheckpointError(f"{weights}: weights do not match the model described by {described_by}: " + "; ".join(parts))
    for key, shape in expected.items():
        tensor = state[key]
        if tuple(tensor.shape) != shape:
            raise CheckpointError(
                f"{weights}: shape mismatch for {key}: checkpoint has {list(tensor.shape)}, "
                f"model (from {described_by}) expects {list(shape)}"
            )
        if not own[key].is_floating_point():  # counters such as BatchNorm's num_batches_tracked
            if tensor.dtype != own[key].dtype:
                raise CheckpointError(f"{weights}: {key} has dtype {tensor.dtype}, expected {own[key].dtype}")
            continue
        if not tensor.is_floating_point():
            raise CheckpointError(f"{weights}: {key} has non-floating dtype {tensor.dtype}")
        if not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{weights}: {key} holds NaN or Inf")
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model
