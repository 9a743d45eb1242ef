"""Additive triggers: a perturbation in [0, 1] pixel units with an L-inf budget.

On disk a trigger is a folder holding `trigger.npy` (float32, H x W x C) and
`trigger.json` (the attack, budget, target class and how it was crafted).
The array is read with `allow_pickle=False` and checked against the JSON.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.atomic import atomic_directory
from ..errors import InputError

ARRAY_FILE, META_FILE = "trigger.npy", "trigger.json"
SHIPPED = Path(__file__).resolve().parent.parent / "assets" / "triggers"
# Slack for float32 rounding of a perturbation that was clipped to exactly epsilon.
BUDGET_SLACK = 1e-6


@dataclass
class Trigger:
    delta: np.ndarray  # float32 H x W x C, in [0, 1] pixel units
    epsilon: float  # L-inf budget in the same units
    target: int  # the class the trigger pushes towards
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.delta = np.asarray(self.delta, dtype=np.float32)
        if self.delta.ndim != 3:
            raise InputError(f"trigger must be H x W x C, got shape {self.delta.shape}")
        if not np.isfinite(self.delta).all():
            raise InputError("trigger contains NaN or Inf")
        if np.abs(self.delta).max() > self.epsilon + BUDGET_SLACK:
            raise InputError(
                f"trigger L-inf norm {np.abs(self.delta).max():.6f} exceeds its budget {self.epsilon:.6f}"
            )

    @property
    def linf(self) -> float:
        return float(np.abs(self.delta).max())

    def apply(self, images_u8: np.ndarray, amplify: float = 1.0) -> np.ndarray:
        """Add the trigger (times `amplify`) to uint8 NHWC images; clip to [0, 1] and round back to uint8."""
        if images_u8.dtype != np.uint8 or images_u8.shape[1:] != self.delta.shape:
            raise InputError(
                f"trigger of shape {self.delta.shape} cannot be added to {images_u8.dtype} images of shape "
                f"{images_u8.shape[1:]}"
            )
        x = images_u8.astype(np.float32) / 255.0 + np.float32(amplify) * self.delta
        return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)

    def save(self, folder: str | os.PathLike) -> Path:
        meta = {**self.meta, "epsilon": self.epsilon, "target": self.target, "shape": list(self.delta.shape)}
        with atomic_directory(folder) as tmp:
            np.save(tmp / ARRAY_FILE, self.delta, allow_pickle=False)
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return Path(folder)


def load_trigger(folder: str | os.PathLike) -> Trigger:
    folder = Path(folder)
    meta_path, array_path = folder / META_FILE, folder / ARRAY_FILE
    for p in (meta_path, array_path):
        if not p.is_file():
            raise InputError(f"{p}: missing (a trigger folder holds {META_FILE} and {ARRAY_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
        epsilon, target, shape = float(meta["epsilon"]), int(meta["target"]), tuple(meta["shape"])
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{meta_path}: not a valid trigger description ({e})") from e
    try:
        delta = np.load(array_path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"{array_path}: not a readable .npy array ({e})") from e
    if delta.shape != shape or delta.dtype != np.float32:
        raise InputError(f"{array_path}: holds {delta.dtype} {delta.shape}, its JSON says float32 {shape}")
    try:
        return Trigger(delta, epsilon, target, meta)
    except InputError as e:
        raise InputError(f"{array_path}: {e}") from e


def shipped_trigger(name: str) -> Trigger:
    folder = SHIPPED / name
    if not folder.is_dir():
        shipped = sorted(p.name for p in SHIPPED.iterdir()) if SHIPPED.is_dir() else []
        raise InputError(f"no shipped trigger named {name!r}; shipped: {', '.join(shipped) or 'none'}")
    return load_trigger(folder)
