"""Backdoor triggers: the pattern an attack puts on its poisons and, at test time, on the images it targets.

A trigger is in [0, 1] pixel units and is one of two kinds:

* `additive`: x + amplify * pattern, a perturbation inside an L-inf budget
  `epsilon` (Narcissus; the demo's shipped trigger);
* `patch`: x * (1 - mask) + mask * pattern, a stamped patch (BadNets).

Either way the result is clipped to [0, 1] and rounded back to uint8.

An additive trigger crafted on its own is saved as a folder holding
`trigger.npy` (float32, H x W x C) and `trigger.json` (the attack, budget,
target class and how it was crafted). The array is read with
`allow_pickle=False` and checked against the JSON. (A poison set stores its
test-time trigger in its own files, patches included: `poison_set`.)
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
KINDS = ("additive", "patch")
# Slack for float32 rounding of a perturbation that was clipped to exactly epsilon.
BUDGET_SLACK = 1e-6


@dataclass
class Trigger:
    pattern: np.ndarray  # float32 H x W x C: the perturbation (additive) or the patch's pixel values (patch)
    epsilon: float | None = None  # additive: the L-inf budget the pattern must keep; None where none is recorded
    target: int = -1  # the class the trigger pushes towards; -1: none (a pattern drawn for measuring)
    meta: dict = field(default_factory=dict)
    kind: str = "additive"
    mask: np.ndarray | None = None  # patch: float32 H x W x C in [0, 1], where the patch replaces the image

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InputError(f"trigger kind must be 'additive' or 'patch', got {self.kind!r}")
        self.pattern = np.asarray(self.pattern, dtype=np.float32)
        if self.pattern.ndim != 3:
            raise InputError(f"trigger must be H x W x C, got shape {self.pattern.shape}")
        if not np.isfinite(self.pattern).all():
            raise InputError("trigger contains NaN or Inf")
        if self.kind == "patch":
            if self.mask is None or np.shape(self.mask) != self.pattern.shape:
                raise InputError("a patch trigger needs a mask of the trigger's shape")
            self.mask = np.asarray(self.mask, dtype=np.float32)
        elif self.mask is not None:
            raise InputError("an additive trigger has no mask")
        if self.epsilon is not None and self.linf > self.epsilon + BUDGET_SLACK:
            raise InputError(f"trigger L-inf norm {self.linf:.6f} exceeds its budget {self.epsilon:.6f}")

    @property
    def linf(self) -> float:
        return float(np.abs(self.pattern).max())

    def apply(self, images_u8: np.ndarray, amplify: float = 1.0) -> np.ndarray:
        """The uint8 NHWC images with the trigger on them: added (times `amplify`) or stamped.

        Poisons get the trigger as it is; an attack may amplify an additive trigger on its test images
        (Narcissus uses x3). A patch is stamped as it is, so it takes no `amplify`.
        """
        if images_u8.dtype != np.uint8 or images_u8.shape[1:] != self.pattern.shape:
            raise InputError(
                f"a {self.kind} trigger of shape {self.pattern.shape} cannot be applied to {images_u8.dtype} "
                f"images of shape {images_u8.shape[1:]}"
            )
        x = images_u8.astype(np.float32) / 255.0
        if self.kind == "additive":
            x = x + np.float32(amplify) * self.pattern
        elif amplify != 1:
            raise InputError(f"a patch trigger is stamped as it is; it cannot be amplified x{amplify:g}")
        else:
            x = x * (1 - self.mask) + self.mask * self.pattern
        return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)

    def save(self, folder: str | os.PathLike) -> Path:
        if self.kind != "additive" or self.epsilon is None:
            raise InputError("a trigger folder holds an additive trigger and its budget; a patch trigger is "
                             "saved with its poison set")
        meta = {**self.meta, "epsilon": self.epsilon, "target": self.target, "shape": list(self.pattern.shape)}
        with atomic_directory(folder) as tmp:
            np.save(tmp / ARRAY_FILE, self.pattern, allow_pickle=False)
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
        pattern = np.load(array_path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"{array_path}: not a readable .npy array ({e})") from e
    if pattern.shape != shape or pattern.dtype != np.float32:
        raise InputError(f"{array_path}: holds {pattern.dtype} {pattern.shape}, its JSON says float32 {shape}")
    try:
        return Trigger(pattern, epsilon, target, meta)
    except InputError as e:
        raise InputError(f"{array_path}: {e}") from e


def shipped_trigger(name: str) -> Trigger:
    folder = SHIPPED / name
    if not folder.is_dir():
        shipped = sorted(p.name for p in SHIPPED.iterdir()) if SHIPPED.is_dir() else []
        raise InputError(f"no shipped trigger named {name!r}; shipped: {', '.join(shipped) or 'none'}")
    return load_trigger(folder)
