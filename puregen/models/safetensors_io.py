"""Checked reading of checkpoint files: JSON configs and safetensors weights.

Every problem raises `CheckpointError` whose message starts with the path of
the offending file. Pickles are never read.

Bounds: a config file is at most `MAX_CONFIG_BYTES` and nests at most
`MAX_JSON_DEPTH` levels; a safetensors header (read on its own by
`read_safetensors_header`, so that shapes can be compared before a model is
built or a tensor loaded) is at most `MAX_HEADER_BYTES`. Only regular files
are opened: a FIFO named config.json is refused, not waited on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, InputError

MAX_CONFIG_BYTES = 64 << 20  # generous: training_state.json keeps the loss history
MAX_JSON_DEPTH = 32
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit

_SHOW = 5  # how many offending keys a message lists


def _first(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOW])
    return shown + (f" (and {len(items) - _SHOW} more)" if len(items) > _SHOW else "")


def _open_regular(path: Path, what: str):
    """Open a regular file for reading (never blocking on a FIFO); CheckpointError otherwise."""
    from ..data.validation import open_regular_file

    if not path.exists() and not path.is_symlink():
        raise CheckpointError(f"{path}: {what} not found")
    try:
        return open_regular_file(path, f"a {what}")
    except CheckpointError:
        raise
    except InputError as e:
        raise CheckpointError(str(e)) from None


def _check_regular(path: Path, what: str) -> None:
    """The data layer's regular-file check (a FIFO is refused, never opened), as a CheckpointError."""
    from ..data.validation import check_regular_file

    if not path.exists() and not path.is_symlink():
        raise CheckpointError(f"{path}: {what} not found")
    try:
        check_regular_file(path, f"a {what}")
    except CheckpointError:
        raise
    except InputError as e:
        raise CheckpointError(str(e)) from None


def _check_depth(data, path: Path, limit: int = MAX_JSON_DEPTH) -> None:
    """Refuse JSON nested deeper than `limit` (checked without recursion)."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > limit:
                raise CheckpointError(f"{path}: JSON nested more than {limit} levels deep; not a checkpoint config")
            children = value.values() if isinstance(value, dict) else value
            stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


def _loads(text: str | bytes, path: Path, what: str):
    try:
        return json.loads(text)
    except RecursionError:
        raise CheckpointError(f"{path}: {what} nested too deeply (more than {MAX_JSON_DEPTH} levels)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON: {e}") from None
    except (ValueError, UnicodeDecodeError) as e:  # e.g. an integer of more than 4300 digits
        raise CheckpointError(f"{path}: invalid JSON: {e}") from None


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    with _open_regular(path, "config file") as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_CONFIG_BYTES:
            raise CheckpointError(f"{path}: config file is {size} bytes; at most {MAX_CONFIG_BYTES} are read")
        try:
            raw = f.read(size + 1)  # read(n) allocates n bytes up front
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read config file: {e}") from None
    if len(raw) > size:
        raise CheckpointError(f"{path}: config file changed size while being read")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: cannot read config file: {e}") from None
    data = _loads(text, path, "config file")
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    _check_depth(data, path)
    return data


def _is_dim(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def read_safetensors_header(path: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (dtype, shape)}`` from a safetensors file's header alone (no tensor is read).

    The header's length is checked against the file's size and `MAX_HEADER_BYTES` first.
    """
    path = Path(path)
    bad = f"{path}: cannot read safetensors file (truncated or corrupt?)"
    with _open_regular(path, "weights file") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{bad}: {size} bytes, too short for a header")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise CheckpointError(f"{bad}: header length {n} does not fit a file of {size} bytes")
        raw = f.read(n)
    if len(raw) < n:
        raise CheckpointError(f"{bad}: header cut short")
    try:
        header = json.loads(raw)
    except (RecursionError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{bad}: header is not valid JSON ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{bad}: header is not a JSON object")
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise CheckpointError(f"{bad}: header entry {name[:80]!r} is not an object")
        dtype, shape = entry.get("dtype"), entry.get("shape")
        if not isinstance(dtype, str) or not isinstance(shape, list) or not all(_is_dim(d) for d in shape):
            raise CheckpointError(f"{bad}: header entry {name[:80]!r} has no valid dtype and shape")
        out[name] = (dtype, tuple(shape))
    return out


def read_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(path)
    _check_regular(path, "weights file")
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
    check_state_shapes(model, {k: tuple(v.shape) for k, v in state.items()}, weights, described_by)
    for key in own:
        tensor = state[key]
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


def check_state_shapes(
    model: nn.Module, shapes: dict[str, tuple[int, ...]], weights: Path, described_by: str = "config.json"
) -> None:
    """The keys and shapes of `shapes` (e.g. from `read_safetensors_header`) must be `model`'s exactly.

    Run it on a model built on the meta device, before any tensor is read: a config asking for a
    huge model then costs nothing.
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = shapes
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
        if tuple(state[key]) != shape:
            raise CheckpointError(
                f"{weights}: shape mismatch for {key}: checkpoint has {list(state[key])}, "
                f"model (from {described_by}) expects {list(shape)}"
            )
