"""A crafted poison set, saved once and reused across defenses, seeds and classifiers.

One poison set is one poisoned training set: the rows of the victim's base
training set that the attacker replaces, with the images and labels it puts
there, plus what the attack needs at test time (a backdoor's trigger, or a
targeted attack's target test image). An availability attack (unlearnable
examples) needs nothing at test time: it replaces every row, keeps the
labels, and is measured by the clean test accuracy it costs.

On disk it is a folder holding two files:

* `poison.json`: the attack's name and parameters, the target class, the
  crafting time, the fingerprint of the base set the indices refer to, and
  (targeted attacks) the target's test index, true class and the class it is
  pushed to; for a backdoor, how the test-time trigger is applied;
  `"availability": true` for an availability attack (its target class is -1);
* `poison.npz`: arrays, read with `allow_pickle=False`: `indices` (int64
  rows of the base set), `images` (uint8 N x H x W x C, the poisoned rows),
  `labels` (int64, the labels they carry: unchanged for clean-label attacks),
  and for backdoors `trigger` (float32 H x W x C: an additive perturbation in
  [0, 1] pixel units, or a patch's pixel values) and `mask` (float32
  H x W x C in [0, 1], patch triggers only).
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.atomic import atomic_directory
from ..errors import InputError
from .triggers import Trigger

META_FILE, ARRAYS_FILE = "poison.json", "poison.npz"
FORMAT_VERSION = 1


@dataclass
class PoisonSet:
    attack: str
    indices: np.ndarray  # int64 rows of the base training set that the poisons replace
    images: np.ndarray  # uint8 NHWC
    labels: np.ndarray  # int64, the labels the poisons carry
    target_class: int  # the class the attack pushes towards
    base_fingerprint: str  # of the base set `indices` refer to
    params: dict = field(default_factory=dict)
    crafting_seconds: float = 0.0
    test_trigger: Trigger | None = None  # backdoor attacks: what the test images get
    target_index: int | None = None  # targeted attacks: the row of the test set
    target_true_class: int | None = None
    test_amplify: float = 1.0  # backdoor attacks: the multiplier of an additive test trigger (Narcissus: 3)
    availability: bool = False  # unlearnable examples: no test-time part, the clean test accuracy is the measure

    def __post_init__(self):
        self.indices = np.asarray(self.indices, dtype=np.int64)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise InputError(f"poison images must be uint8 N x H x W x C, got {self.images.dtype} {self.images.shape}")
        n = len(self.images)
        if self.indices.shape != (n,) or self.labels.shape != (n,):
            raise InputError(f"{n} poison images need {n} indices and labels, got {self.indices.shape} and "
                             f"{self.labels.shape}")
        if len(np.unique(self.indices)) != n:
            raise InputError("poison indices must be distinct rows of the base set")
        kinds = (self.test_trigger is not None) + (self.target_index is not None) + bool(self.availability)
        if kinds != 1:
            raise InputError("a poison set is either a backdoor (test trigger), targeted (target index) or an "
                             "availability attack")
        self.availability = bool(self.availability)
        if self.availability and self.target_class != -1:
            raise InputError(f"an availability attack pushes towards no class: its target_class is -1, "
                             f"got {self.target_class}")
        if self.test_trigger is not None and self.test_trigger.target not in (-1, self.target_class):
            raise InputError(f"the test trigger pushes towards class {self.test_trigger.target}, the poison set "
                             f"towards {self.target_class}")
        self.test_amplify = float(self.test_amplify)
        if self.test_trigger is not None and self.test_trigger.kind == "patch" and self.test_amplify != 1:
            raise InputError(f"a patch test trigger is stamped as it is; it cannot be amplified x{self.test_amplify:g}")

    @property
    def targeted(self) -> bool:
        return self.target_index is not None

    @property
    def kind(self) -> str:
        return "availability" if self.availability else "targeted" if self.targeted else "backdoor"

    def poisoned_training_set(self, base_images: np.ndarray, base_labels: np.ndarray,
                              poison_images: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The base set with the poisons in place, and their labels (copies; the inputs are not written to).

        `poison_images` go into the poisons' rows instead of the poisons as crafted: a defense that
        transformed the base set and the poisons apart puts its defended poisons into its defended base set.
        """
        if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= len(base_images)):
            raise InputError(f"poison indices reach row {self.indices.max()}, the base set has {len(base_images)}")
        poison_images = self.images if poison_images is None else poison_images
        if poison_images.shape != self.images.shape:
            raise InputError(f"{len(self.images)} poisons of shape {self.images.shape[1:]} are replaced by images "
                             f"of shape {poison_images.shape}")
        images, labels = base_images.copy(), base_labels.copy()
        images[self.indices] = poison_images
        labels[self.indices] = self.labels
        return images, labels

    def save(self, folder: str | os.PathLike) -> Path:
        meta = {
            "format": FORMAT_VERSION, "attack": self.attack, "target_class": self.target_class,
            "base_fingerprint": self.base_fingerprint, "params": self.params,
            "crafting_seconds": round(float(self.crafting_seconds), 2), "count": len(self.images),
            "image_shape": list(self.images.shape[1:]),
        }
        arrays = {"indices": self.indices, "images": self.images, "labels": self.labels}
        if self.availability:
            meta["availability"] = True
        elif self.test_trigger is not None:
            meta["test_trigger"] = {"kind": self.test_trigger.kind, "amplify": self.test_amplify}
            arrays["trigger"] = self.test_trigger.pattern
            if self.test_trigger.mask is not None:
                arrays["mask"] = self.test_trigger.mask
        else:
            meta["target"] = {"test_index": int(self.target_index), "true_class": self.target_true_class,
                              "adversarial_class": self.target_class}
        with atomic_directory(folder) as tmp:
            np.savez(tmp / ARRAYS_FILE, **arrays)
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return Path(folder)


def load_poison_set(folder: str | os.PathLike) -> PoisonSet:
    folder = Path(folder)
    meta_path, arrays_path = folder / META_FILE, folder / ARRAYS_FILE
    for p in (meta_path, arrays_path):
        if not p.is_file():
            raise InputError(f"{p}: missing (a poison set folder holds {META_FILE} and {ARRAYS_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"format {meta.get('format')!r}, this version reads {FORMAT_VERSION}")
        attack, target_class = str(meta["attack"]), int(meta["target_class"])
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{meta_path}: not a valid poison set description ({e})") from e
    try:
        with np.load(arrays_path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise InputError(f"{arrays_path}: not a readable .npz file ({e})") from e
    missing = {"indices", "images", "labels"} - set(arrays)
    if missing:
        raise InputError(f"{arrays_path}: missing arrays {sorted(missing)}")
    if arrays["images"].dtype != np.uint8 or len(arrays["images"]) != meta.get("count"):
        raise InputError(f"{arrays_path}: holds {arrays['images'].dtype} images x {len(arrays['images'])}, "
                         f"its JSON says uint8 x {meta.get('count')}")
    trigger, amplify, target = None, 1.0, meta.get("target")
    try:
        if "test_trigger" in meta:
            spec = meta["test_trigger"]
            trigger = Trigger(arrays["trigger"], target=target_class, kind=spec["kind"], mask=arrays.get("mask"))
            amplify = float(spec["amplify"])
        return PoisonSet(
            attack, arrays["indices"], arrays["images"], arrays["labels"], target_class, str(meta["base_fingerprint"]),
            meta.get("params", {}), float(meta.get("crafting_seconds", 0.0)), trigger,
            None if target is None else int(target["test_index"]),
            None if target is None or target.get("true_class") is None else int(target["true_class"]),
            amplify, bool(meta.get("availability", False)),
        )
    except (InputError, KeyError, TypeError, ValueError) as e:
        raise InputError(f"{folder}: inconsistent poison set ({e})") from e
