"""The defenses of `puregen eval`, applied to the clean base set once and to each poison set on its own.

Every defense here transforms each training image on its own, keyed by its
row in the base set (the engine's noise contract), so the defended poisoned
set is the defended base set with the defended poison rows put in place:
the 10,000 base images are purified once per defense, and each attack adds
only its poisons. Both are cached under `OUT/defended/`.

`naive` starts from the fp32 states that the `ebm` defense keeps beside its
cache (`*-ebm-state.npz`), when that defense ran first with the same EBM and
settings: its first stage is exactly that pass, so only the DDPM stage runs.

`filt` is the one exception to "on its own": its energy threshold is the
quantile over the whole set; it is taken from the clean base set and then
applied unchanged to the poisons (a few poisons barely move a quantile).
FrieNDs computes its friendly noise with a model pre-trained on the clean
base set, for the base rows and the poisons alike (the published defense
pre-trains on the poisoned set; at 1% poisons the two are nearly the same
model), and its victim trains with random noise on top.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data import read_dataset
from ..data.atomic import write_npz_atomic
from ..engine.factory import load_purifier
from ..engine.pipeline import config_fingerprint, image_progress_bar
from ..engine.purifiers import FiltSelection
from ..errors import InputError
from .defenses.friendly_noise import FriendlyNoiseDefense, FriendlyNoiseRecipe
from .scales import ScaleData, ScaleSettings

PURIFIER_METHODS = ("ebm", "ddpm", "naive", "reps", "filt")


@dataclass(frozen=True)
class DefenseSpec:
    name: str
    kind: str  # none | jpeg | purifier | friends
    method: str | None = None
    quality: int | None = None

    def label(self) -> str:
        return {"none": "None", "friends": "FrieNDs", "ebm": "PureGen-EBM", "ddpm": "PureGen-DDPM",
                "naive": "PureGen-Naive", "reps": "PureGen-Reps", "filt": "PureGen-Filt"}.get(
            self.name, f"JPEG q{self.quality}" if self.kind == "jpeg" else self.name)


def defense_spec(name: str) -> DefenseSpec:
    if name in ("none", "friends"):
        return DefenseSpec(name, name)
    if name in PURIFIER_METHODS:
        return DefenseSpec(name, "purifier", name)
    if name.startswith("jpeg-") and name[5:].isdigit() and 1 <= int(name[5:]) <= 100:
        return DefenseSpec(name, "jpeg", "jpeg", int(name[5:]))
    raise InputError(f"unknown defense {name!r}; choose none, jpeg-Q (Q in 1..100), friends, "
                     f"{', '.join(PURIFIER_METHODS)}")


def default_defenses(settings: ScaleSettings, full: bool) -> tuple[str, ...]:
    jpeg = settings.full_jpeg_qualities if full else settings.jpeg_qualities
    names = ("none", *(f"jpeg-{q}" for q in jpeg), "friends", "ebm", "ddpm", "naive")
    return names + ("reps", "filt") if full else names


@dataclass
class Checkpoints:
    ebm: Path | None = None  # None: the shipped default for the data's image shape
    ddpm: Path | None = None


@dataclass
class DefenseContext:
    data: ScaleData
    settings: ScaleSettings
    out: Path
    checkpoints: Checkpoints = field(default_factory=Checkpoints)
    seed: int = 0  # of the purifiers' noise
    threads: int | None = None
    smoke: bool = False
    progress: bool = True


class PreparedDefense:
    """One defense, ready to transform the base set and poison rows (with disk caching)."""

    def __init__(self, spec: DefenseSpec, ctx: DefenseContext):
        self.spec, self.ctx = spec, ctx
        self.purifier = None
        self.friends: FriendlyNoiseDefense | None = None
        self.classifier_overrides: dict = {}
        config: dict = {"defense": dataclasses.asdict(spec), "seed": ctx.seed}
        if spec.kind in ("jpeg", "purifier"):
            self.purifier = self._load_purifier()
            config["purifier"] = config_fingerprint(self.purifier, ctx.seed, chunk_size=0)[0]
        elif spec.kind == "friends":
            recipe = FriendlyNoiseRecipe()
            if ctx.smoke:
                recipe = dataclasses.replace(recipe, steps=2, pretrain_epochs=1)
            # Pre-trained on the clean base set: one model for the base rows and every poison set's.
            d = ctx.data
            self.friends = FriendlyNoiseDefense(recipe, ctx.settings.classifier, d.base_images, d.base_labels,
                                                d.num_classes, progress=ctx.progress)
            self.classifier_overrides = self.friends.victim_overrides
            config["friends"] = recipe.to_dict()
            config["classifier"] = ctx.settings.classifier.to_dict()
        self.key = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.folder = ctx.out / "defended" / f"{spec.name}-{self.key}"
        # naive's first stage is the ebm defense's whole pass (same EBM, settings and seed, hence the same
        # folder key): where that defense ran first, naive starts from the fp32 states it kept.
        self.ebm_stage_folder = PreparedDefense(defense_spec("ebm"), ctx).folder if spec.method == "naive" else None

    def _load_purifier(self):
        s, c = self.ctx.settings, self.ctx
        if self.spec.kind == "jpeg":
            return load_purifier("jpeg", jpeg_quality=self.spec.quality, threads=c.threads)
        method = self.spec.method
        overrides = {}
        if method in ("ebm", "naive"):
            overrides["steps"] = s.ebm_steps
        if method in ("ddpm", "naive"):
            overrides["t_star"] = s.ddpm_t_star
        if s.ddpm_reverse_steps is not None and method != "ebm":
            overrides["reverse_steps"] = s.ddpm_reverse_steps
        if c.smoke and method in ("reps", "filt"):
            overrides.update(steps=2, t_star=4)
        return load_purifier(method, ebm=c.checkpoints.ebm, ddpm=c.checkpoints.ddpm, precision=s.precision,
                             micro_batch=s.micro_batch, threads=c.threads, **overrides)

    # -- the transforms --------------------------------------------------------------------------

    def _transform(self, images: np.ndarray, indices: np.ndarray, desc: str, cache: Path) -> np.ndarray:
        if self.spec.kind == "none":
            return images.copy()
        if self.spec.kind == "friends":
            return self.friends.apply(images)
        run = dict(seed=self.ctx.seed, desc=desc, progress=self.ctx.progress)
        if self.spec.method == "ebm":
            out, states = purify_rows(self.purifier, images, indices, keep_state=True, **run)
            write_npz_atomic(ebm_state_path(cache), x=states)
            return out
        if self.ebm_stage_folder is not None:
            states = _read_ebm_states(self.ebm_stage_folder / ebm_state_path(cache).name, len(images))
            if states is not None:
                return purify_rows(self.purifier, images, indices, ebm_stage_output=states,
                                   **{**run, "desc": desc + " from the EBM's states"})
        return purify_rows(self.purifier, images, indices, **run)

    def _cached(self, path: Path, images: np.ndarray, indices: np.ndarray, desc: str) -> np.ndarray:
        if path.is_file():
            cached = read_dataset(path).images
            if cached.shape == images.shape:
                return cached
        out = self._transform(images, indices, desc, path)
        if self.spec.kind != "none":
            write_npz_atomic(path, x=out)
        return out

    def base(self) -> np.ndarray:
        d = self.ctx.data
        indices = np.arange(len(d.base_images))
        if self.purifier is not None:
            self.purifier.check_image_shape(*d.base_images.shape[1:], source=f"{d.name}-scale base set")
        if self.spec.method == "filt" and self.purifier.filt_selection is None:
            self._select_for_filt()
        return self._cached(self.folder / "base.npz", d.base_images, indices, f"{self.spec.name} [base set]")

    def rows(self, images: np.ndarray, indices: np.ndarray, name: str) -> np.ndarray:
        if self.spec.method == "filt" and self.purifier.filt_selection is None:
            self._select_for_filt()
        digest = hashlib.sha256(images.tobytes() + np.asarray(indices, np.int64).tobytes()).hexdigest()[:16]
        return self._cached(self.folder / f"rows-{digest}.npz", images, indices, f"{self.spec.name} [{name}]")

    def _select_for_filt(self) -> None:
        d = self.ctx.data
        energies = np.concatenate([self.purifier.energies(torch.from_numpy(d.base_images[s : s + 256]))
                                   for s in range(0, len(d.base_images), 256)])
        self.purifier.filt_selection = FiltSelection.from_quantile(
            energies, np.arange(len(energies)), self.purifier.config.filt.filter_frac)


def purify_rows(purifier, images: np.ndarray, indices: np.ndarray, *, seed: int, desc: str, progress: bool,
                batch_size: int = 64, keep_state: bool = False, ebm_stage_output: np.ndarray | None = None):
    """Purify uint8 NHWC rows whose base-set row numbers are `indices`, with a progress bar.

    Returns the purified rows; with `keep_state`, also their fp32 states before rounding (N, C, H, W).
    `ebm_stage_output`: such states of an `ebm` pass over the same rows, for `naive` to start from.
    """
    bar = image_progress_bar(len(images), desc, progress)
    parts, states = [], []
    for s in range(0, len(images), batch_size):
        # purify_batch, not purify: `filt` must keep the selection set from the base set, not re-rank each call.
        batch = torch.from_numpy(np.ascontiguousarray(images[s : s + batch_size]))
        rows = torch.as_tensor(np.asarray(indices[s : s + batch_size], dtype=np.int64))
        stage = None if ebm_stage_output is None else torch.from_numpy(ebm_stage_output[s : s + batch_size])
        res = purifier.purify_batch(batch, rows, seed, keep_state=keep_state, ebm_stage_output=stage)
        parts.append(res.images.cpu().numpy())
        if keep_state:
            states.append(res.state.cpu().numpy())
        if bar is not None:
            bar.update(len(parts[-1]))
    if bar is not None:
        bar.close()
    out = np.concatenate(parts) if parts else images.copy()
    if not keep_state:
        return out
    return out, (np.concatenate(states) if states else np.zeros((0,), np.float32))


def ebm_state_path(cache: Path) -> Path:
    """Where the ebm defense keeps the fp32 states behind the cached rows `cache` (for naive to reuse)."""
    return cache.with_name(cache.stem + "-ebm-state.npz")


def _read_ebm_states(path: Path, rows: int) -> np.ndarray | None:
    """The ebm defense's fp32 states for `rows` images, or None where there are none to reuse."""
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as f:
        states = f["x"] if "x" in f.files else None
    if states is None or states.dtype != np.float32 or len(states) != rows:
        return None
    return states
