"""The defenses of `puregen eval`, applied to the clean base set once and to each poison set on its own.

Every defense here transforms each training image on its own, keyed by its
row in the base set (the engine's noise contract), so the defended poisoned
set is the defended base set with the defended poison rows put in place:
the 10,000 base images are purified once per defense, and each attack adds
only its poisons. Both are cached under `OUT/defended/`.

A method with a `first_stage` (`naive`, whose first stage is `ebm`) starts
from the fp32 states that the first stage's defense keeps beside its cache
(`*-ebm-state.npz`), when that defense ran first with the same networks and
settings: only the later stages run.

A method that needs the whole dataset (`filt`, whose energy threshold is the
quantile over the whole set) is the one exception to "on its own": its
dataset state is taken from the clean base set and then applied unchanged to
the poisons (a few poisons barely move a quantile).
FrieNDs computes its friendly noise with a model pre-trained on the clean
base set, for the base rows and the poisons alike (the published defense
pre-trains on the poisoned set; at 1% poisons the two are nearly the same
model), and its victim trains with random noise on top.

A method that learns from the dataset it purifies (`dvae`, scope `fit`) has
no "on its own" at all: its defense fits on each whole poisoned training
set and purifies every row of it with what it fitted. Its result is cached
per poisoned set (`set-DIGEST.npz`), and the fit checkpoints into
`fit-DIGEST/`, so a run stopped during a fit resumes it.
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
from ..engine.noise_key import NoiseKey
from ..engine.pipeline import config_fingerprint
from ..engine.progress import image_progress_bar
from ..errors import InputError
from ..methods import registry
from ..methods.options import options_of
from .defenses.friendly_noise import FriendlyNoiseDefense, FriendlyNoiseRecipe
from .scales import ScaleData, ScaleSettings

def purifier_methods() -> tuple[str, ...]:
    """The registered methods that run networks (JPEG is its own defense, `jpeg-Q`)."""
    return tuple(m.name for m in registry.all_methods() if m.networks)


def fit_methods() -> tuple[str, ...]:
    """The registered methods that fit on the whole dataset they purify (D-VAE)."""
    return tuple(m.name for m in registry.all_methods() if m.scope == "fit")


MAX_BITS = 7  # bitdepth-B: B bits per channel, 1..7 (8 keeps every level)


@dataclass(frozen=True)
class DefenseSpec:
    name: str
    kind: str  # none | jpeg | pixels (bitdepth, grayscale) | purifier | fit | friends
    method: str | None = None
    quality: int | None = None
    bits: int | None = None  # bitdepth-B

    def label(self) -> str:
        if self.kind in ("purifier", "fit"):
            return registry.get(self.method).label or self.name
        if self.kind == "pixels":
            return f"Bit depth {self.bits}" if self.method == "bitdepth" else registry.get(self.method).label
        return {"none": "None", "friends": "FrieNDs"}.get(
            self.name, f"JPEG q{self.quality}" if self.kind == "jpeg" else self.name)

    def key_fields(self) -> dict:
        """The spec as it enters the cache keys. A field added later enters only when set, so the folders of
        runs made before it keep their keys (and their cached images and classifiers)."""
        d = dataclasses.asdict(self)
        if d["bits"] is None:
            del d["bits"]
        return d


def defense_spec(name: str) -> DefenseSpec:
    if name in ("none", "friends"):
        return DefenseSpec(name, name)
    if name in purifier_methods():
        return DefenseSpec(name, "purifier", name)
    if name in fit_methods():
        return DefenseSpec(name, "fit", name)
    if name.startswith("jpeg-") and name[5:].isdigit() and 1 <= int(name[5:]) <= 100:
        return DefenseSpec(name, "jpeg", "jpeg", int(name[5:]))
    if name.startswith("bitdepth-") and name[9:].isdigit() and 1 <= int(name[9:]) <= MAX_BITS:
        return DefenseSpec(name, "pixels", "bitdepth", bits=int(name[9:]))
    if name == "grayscale":
        return DefenseSpec(name, "pixels", "grayscale")
    raise InputError(f"unknown defense {name!r}; choose none, jpeg-Q (Q in 1..100), bitdepth-B (B in 1..{MAX_BITS}), "
                     f"grayscale, friends, {', '.join(purifier_methods() + fit_methods())}")


def unlearnable_defenses(data: ScaleData, settings: ScaleSettings) -> tuple[str, ...]:
    """The defenses of the unlearnable-example table: the Image Shortcut Squeezing baselines (JPEG, bit
    depth, and grayscale where the images have colour), PureGen's EBM and DDPM, and D-VAE."""
    squeeze = (f"jpeg-{settings.ue_jpeg_quality}", f"bitdepth-{settings.ue_bits}")
    if data.base_images.shape[-1] == 3:
        squeeze += ("grayscale",)
    return ("none", *squeeze, "ebm", "ddpm", "dvae")


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
        config: dict = {"defense": spec.key_fields(), "seed": ctx.seed}
        if spec.kind in ("jpeg", "pixels", "purifier", "fit"):
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
        # A first stage (naive's is ebm) is that defense's whole pass (same networks, settings and seed, hence
        # the same folder key): where that defense ran first, this one starts from the fp32 states it kept.
        method = registry.get(spec.method) if spec.kind == "purifier" else None
        first = method.first_stage if method is not None else None
        self.first_stage_folder = PreparedDefense(defense_spec(first), ctx).folder if first else None
        self.keeps_states = method is not None and any(m.first_stage == method.name for m in registry.all_methods())

    def _load_purifier(self):
        s, c = self.ctx.settings, self.ctx
        if self.spec.kind == "jpeg":
            return load_purifier("jpeg", jpeg_quality=self.spec.quality, threads=c.threads)
        if self.spec.kind == "pixels":
            options = {"bits": self.spec.bits} if self.spec.bits is not None else {}
            return load_purifier(self.spec.method, threads=c.threads, **options)
        if self.spec.kind == "fit":
            recipe = "tiny" if c.smoke else s.dvae_recipe
            return load_purifier(self.spec.method, precision=s.precision, micro_batch=s.micro_batch,
                                 threads=c.threads, dvae_recipe=recipe)
        method = registry.get(self.spec.method)
        return load_purifier(method.name, ebm=c.checkpoints.ebm, ddpm=c.checkpoints.ddpm, precision=s.precision,
                             micro_batch=s.micro_batch, threads=c.threads, **stage_settings(method, s, c.smoke))

    # -- the transforms --------------------------------------------------------------------------

    def _transform(self, images: np.ndarray, indices: np.ndarray, desc: str, cache: Path) -> np.ndarray:
        if self.spec.kind == "none":
            return images.copy()
        if self.spec.kind == "friends":
            return self.friends.apply(images)
        run = dict(seed=self.ctx.seed, desc=desc, progress=self.ctx.progress)
        if self.keeps_states:
            out, states = purify_rows(self.purifier, images, indices, keep_state=True, **run)
            write_npz_atomic(stage_state_path(cache, self.spec.method), x=states)
            return out
        if self.first_stage_folder is not None:
            first = registry.get(self.spec.method).first_stage
            states = _read_stage_states(self.first_stage_folder / stage_state_path(cache, first).name, len(images))
            if states is not None:
                return purify_rows(self.purifier, images, indices, first_stage_output=states,
                                   **{**run, "desc": desc + f" from the {first} states"})
        return purify_rows(self.purifier, images, indices, **run)

    def _cached(self, path: Path, images: np.ndarray, indices: np.ndarray, desc: str) -> np.ndarray:
        cached = _read_cache(path, images.shape)
        if cached is not None:
            return cached
        out = self._transform(images, indices, desc, path)
        if self.spec.kind != "none":
            write_npz_atomic(path, x=out)
        return out

    def base(self) -> np.ndarray:
        if self.whole_set:
            raise RuntimeError(f"defense {self.spec.name!r} fits on each whole poisoned set: use poisoned_set()")
        d = self.ctx.data
        indices = np.arange(len(d.base_images))
        if self.purifier is not None:
            self.purifier.check_image_shape(*d.base_images.shape[1:], source=f"{d.name}-scale base set")
        if self.purifier is not None and self.purifier.needs_dataset_pass:
            self._prepare_dataset()
        return self._cached(self.folder / "base.npz", d.base_images, indices, f"{self.spec.name} [base set]")

    def rows(self, images: np.ndarray, indices: np.ndarray, name: str) -> np.ndarray:
        if self.purifier is not None and self.purifier.needs_dataset_pass:
            self._prepare_dataset()
        digest = hashlib.sha256(images.tobytes() + np.asarray(indices, np.int64).tobytes()).hexdigest()[:16]
        return self._cached(self.folder / f"rows-{digest}.npz", images, indices, f"{self.spec.name} [{name}]")

    @property
    def whole_set(self) -> bool:
        """Whether this defense transforms each poisoned training set as a whole (a fit method), so that
        there is no defended base set to put defended poison rows into."""
        return self.spec.kind == "fit"

    def poisoned_set(self, ps, name: str) -> tuple[np.ndarray, np.ndarray]:
        """A fit defense's training set for one poison set: fitted on the whole poisoned set, then every row
        purified with the fit (labels as in the poisoned set). Cached per poisoned set."""
        d = self.ctx.data
        images, labels = ps.poisoned_training_set(d.base_images, d.base_labels)
        digest = hashlib.sha256(images.tobytes() + labels.astype(np.int64).tobytes()).hexdigest()[:16]
        cache = self.folder / f"set-{digest}.npz"
        cached = _read_cache(cache, images.shape)
        if cached is not None:
            return cached, labels
        self.purifier.check_image_shape(*images.shape[1:], source=f"{name} (poisoned training set)")
        key = NoiseKey.rows(self.ctx.seed, 0, len(images))
        # The fit checkpoints into its own folder, so a run stopped mid-fit resumes it.
        self.purifier.dataset_state = self.purifier.fit(torch.from_numpy(images), labels, key,
                                                        work_dir=self.folder / f"fit-{digest}",
                                                        progress=self.ctx.progress)
        try:
            out = purify_rows(self.purifier, images, np.arange(len(images)), seed=self.ctx.seed, labels=labels,
                              desc=f"{self.spec.name} [{name}]", progress=self.ctx.progress)
        finally:
            self.purifier.dataset_state = None  # the state belongs to this poisoned set only
        write_npz_atomic(cache, x=out)
        return out, labels

    def _prepare_dataset(self) -> None:
        """The dataset state (filt: the energy quantile) from the clean base set, kept for the poisons too."""
        d = self.ctx.data
        base = torch.from_numpy(d.base_images)
        labels = torch.from_numpy(np.asarray(d.base_labels, np.int64))
        self.purifier.dataset_state = self.purifier.prepare_dataset(
            base, labels, NoiseKey.rows(self.ctx.seed, 0, len(base)), batch_size=256)


def _read_cache(path: Path, shape: tuple) -> np.ndarray | None:
    """Defended images cached at `path`, or None where there are none of that shape (then they are made)."""
    if not path.is_file():
        return None
    cached = read_dataset(path).images
    return cached if cached.shape == shape else None


def stage_settings(method, settings: ScaleSettings, smoke: bool) -> dict:
    """The scale's Langevin steps, t* and reverse steps, for the options `method` has.

    A value the method's own paper preset sets (reps' 10 steps and t* = 50, filt's t* = 125) is the
    method's and stays; smoke runs shrink those to 2 steps and t* = 4.
    """
    options = options_of(method.Config)
    own = method.presets.get("paper", {})
    scale = {"steps": settings.ebm_steps, "t_star": settings.ddpm_t_star, "reverse_steps": settings.ddpm_reverse_steps}
    smallest = {"steps": 2, "t_star": 4}
    out = {}
    for name, value in scale.items():
        if name not in options:
            continue
        if name in own:
            if smoke and name in smallest:
                out[name] = smallest[name]
        elif value is not None:
            out[name] = value
    return out


def purify_rows(purifier, images: np.ndarray, indices: np.ndarray, *, seed: int, desc: str, progress: bool,
                batch_size: int = 64, keep_state: bool = False, first_stage_output: np.ndarray | None = None,
                labels: np.ndarray | None = None):
    """Purify uint8 NHWC rows whose base-set row numbers are `indices`, with a progress bar.

    Returns the purified rows; with `keep_state`, also their fp32 states before rounding (N, C, H, W).
    `first_stage_output`: such states of the method's first stage over the same rows, to start from.
    `labels`: the rows' classes, for a method that needs them.
    """
    bar = image_progress_bar(len(images), desc, progress)
    parts, states = [], []
    for s in range(0, len(images), batch_size):
        # purify_batch, not purify: a dataset state (filt's) must stay the base set's, not be re-taken each call.
        batch = torch.from_numpy(np.ascontiguousarray(images[s : s + batch_size]))
        key = NoiseKey.of(seed, np.asarray(indices[s : s + batch_size], dtype=np.int64))
        stage = None if first_stage_output is None else torch.from_numpy(first_stage_output[s : s + batch_size])
        res = purifier.purify_batch(batch, key, keep_state=keep_state, first_stage_output=stage,
                                    labels=None if labels is None else labels[s : s + batch_size])
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


def stage_state_path(cache: Path, method: str) -> Path:
    """Where `method`'s defense keeps the fp32 states behind the cached rows `cache` (for a later stage to reuse)."""
    return cache.with_name(cache.stem + f"-{method}-state.npz")


def _read_stage_states(path: Path, rows: int) -> np.ndarray | None:
    """A first stage's fp32 states for `rows` images, or None where there are none to reuse."""
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as f:
        states = f["x"] if "x" in f.files else None
    if states is None or states.dtype != np.float32 or len(states) != rows:
        return None
    return states
