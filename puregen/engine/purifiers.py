"""The purifier: one registered method with its networks, over batches, arrays and streams.

A purifier maps a batch of uint8 NHWC images and their noise key to purified
uint8 images plus a per-sample audit. What a method does is the method's
(`puregen.methods`); the purifier adds what every method shares: model space,
the EBM energy audit, progress, the dataset state of methods that need more
than one batch, and the checks of image shape against the networks. It knows
nothing of files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from ..data.convert import from_model_space, prepare_api_input, to_model_space
from ..errors import InputError
from ..methods.base import BatchContext, DatasetState, Method
from ..methods.networks import NETWORKS
from ..methods.options import options_of
from ..models.defaults import check_default_fits
from .noise_key import NoiseKey

ProgressFn = Callable[[float], None]

class _StepProgress:
    """Turns network steps into images on the progress bar, in whole updates that sum to exactly the
    batch size (fractions of n / steps summed over the steps overshoot it by float rounding)."""

    def __init__(self, progress: ProgressFn, n: int, steps: int):
        self.progress, self.n, self.steps = progress, n, max(steps, 1)
        self.done_steps = self.reported = 0

    def __call__(self, k: int) -> None:
        self.done_steps = min(self.done_steps + k, self.steps)
        position = self.n * self.done_steps // self.steps
        if position > self.reported:
            self.progress(position - self.reported)
            self.reported = position


@dataclass
class PurifyResult:
    images: torch.Tensor  # uint8 NHWC
    audit: dict[str, np.ndarray]  # per-sample columns
    state: torch.Tensor | None = None  # the fp32 model-space result before rounding, when asked for


def _checked_stage_output(state: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """An earlier stage's fp32 result for the batch `x`, laid out as `x`; an error if it cannot be.

    The networks no longer see a state's strides (the evaluator copies every micro-batch into one
    layout fixed by its shape: a 1-channel batch's strides once moved bf16 UNet outputs by 1e-3);
    the copy keeps the stage's result independent of the caller's tensor all the same."""
    if state.dtype != torch.float32 or tuple(state.shape) != tuple(x.shape):
        raise ValueError(f"the first stage's output must be float32 of shape {tuple(x.shape)}, "
                         f"got {state.dtype} {tuple(state.shape)}")
    return torch.empty_like(x).copy_(state)


def _change_audit(before: torch.Tensor, after: torch.Tensor) -> dict[str, np.ndarray]:
    diff = (after.to(torch.float32) - before.to(torch.float32)).flatten(1) / 255.0
    return {
        "l2_change": diff.norm(dim=1).cpu().numpy(),
        "linf_change": diff.abs().amax(dim=1).cpu().numpy(),
    }


class Purifier:
    """One registered method (`algorithm`, with its config) and the backend evaluating its networks."""

    def __init__(
        self,
        algorithm: Method,
        evaluator=None,
        *,
        device: str | torch.device = "cpu",
        provenance: dict | None = None,
        models: dict | None = None,
    ):
        self.algorithm = algorithm
        self.evaluator = evaluator
        self.models = dict(models or {})  # kind -> torch module, for methods that use a network directly
        # Where the networks came from and how they run: part of a job's fingerprint.
        self.provenance = provenance or {}
        self.device = torch.device(device if evaluator is None else evaluator.device)
        # A prepass or fit method's dataset state: fixed by its config, given by the caller, or set by a
        # whole-dataset route (`purify`, a pipeline job) for the duration of that dataset.
        self.dataset_state: DatasetState | None = algorithm.given_state()
        if algorithm.networks and evaluator is None:
            raise ValueError(f"method {self.method!r} needs an evaluator with its networks")

    @property
    def method(self) -> str:
        return self.algorithm.name

    @property
    def config(self):
        return self.algorithm.config

    @property
    def has_ebm(self) -> bool:
        return "ebm" in self.algorithm.networks and getattr(self.evaluator, "ebm", None) is not None

    @property
    def needs_dataset_pass(self) -> bool:
        """Whether the method must see the whole dataset (a prepass or a fit) before purifying any of it."""
        return self.algorithm.scope != "batch" and self.dataset_state is None

    def refuse_batch_route(self, route: str) -> None:
        """The error for a route that sees batches only (a stream, workers, a loader) and cannot run the pass."""
        if self.needs_dataset_pass:
            what = "a prepass over every image" if self.algorithm.scope == "prepass" else "a fit on the whole input"
            raise InputError(f"method {self.method!r} needs {what} before purifying; {route} sees one batch at a "
                             f"time, so give its dataset state (" + self._state_hint() + ")")

    def _state_hint(self) -> str:
        options = options_of(type(self.algorithm.config))
        given = [f"{opt.flag(field)}: {opt.help}" for keyword, (field, opt) in options.items()
                 if keyword in self.algorithm.state_options]
        return "; ".join([*given, "or set Purifier.dataset_state to the state of a whole-dataset run"])

    def pin_threads(self) -> None:
        """Run torch at the thread count this purifier was loaded with (part of its jobs' fingerprint): the
        bytes are that count's, whatever count a worker process (a loader, a map or Ray actor) started with."""
        threads = self.provenance.get("threads")
        if threads and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)

    def check_image_shape(self, height: int, width: int, channels: int, source: str = "input") -> None:
        """A clear error when the images do not fit the loaded networks."""
        if self.evaluator is None:
            return
        for kind in self.provenance.get("defaults", []):
            check_default_fits(kind, height, width, channels, source)
        for kind in self.algorithm.networks:
            model = getattr(self.evaluator, kind, None)
            if model is None:
                continue
            expected = model.config.in_channels
            if channels != expected:
                raise InputError(
                    f"{source}: images have {channels} channel(s), but the {NETWORKS[kind].what} checkpoint expects "
                    f"{expected}; use a checkpoint trained on {channels}-channel images"
                )
        if min(height, width) < self.algorithm.min_side:
            raise InputError(f"{source}: images of {height}x{width} are too small to purify")

    def network_steps(self) -> int:
        """Network evaluations per image, for progress reporting."""
        return self.algorithm.network_evaluations()

    def _context(self, key: NoiseKey, on_step=None, **extra) -> BatchContext:
        return BatchContext(self.evaluator, key, on_step, state=self.dataset_state, models=self.models,
                            precision=self.provenance.get("precision", "fp32"),
                            backend=self.provenance.get("backend", "torch"), **extra)

    def _checked_labels(self, labels, n: int):
        """The rows' labels as int64 on the device; an InputError for a method that needs them and has none."""
        if labels is None:
            if self.algorithm.needs_labels:
                raise InputError(f"method {self.method!r} needs labelled data (a label for every image)")
            return None
        labels = torch.as_tensor(np.asarray(labels) if not torch.is_tensor(labels) else labels).to(torch.int64)
        if labels.shape != (n,):
            raise InputError(f"got {tuple(labels.shape)} labels for {n} images")
        return labels.to(self.device)

    # -- batch level ---------------------------------------------------------------------------

    def energies(self, images_u8: torch.Tensor) -> np.ndarray:
        """EBM energy of each uint8 NHWC image (fp32)."""
        x = to_model_space(images_u8.to(self.device))
        return self.evaluator.energy(x).cpu().numpy().astype(np.float32)

    def prepass_values(self, images_u8: torch.Tensor, key: NoiseKey) -> np.ndarray:
        """A prepass method's value of each uint8 NHWC image."""
        x = to_model_space(images_u8.to(self.device))
        return self.algorithm.prepass(x, self._context(key.to(self.device)))

    def state_from_prepass(self, values: np.ndarray, indices: np.ndarray) -> DatasetState:
        return self.algorithm.state_from_prepass(values, indices)

    def fit(self, images_u8: torch.Tensor, labels, key: NoiseKey, *, work_dir=None,
            progress: bool = False) -> DatasetState:
        """A fit method's state from these images; `work_dir` is where it may checkpoint (a job's fit/)."""
        labels = self._checked_labels(labels, images_u8.shape[0])
        return self.algorithm.fit(images_u8, None if labels is None else labels.cpu(),
                                  self._context(key, work_dir=work_dir, progress=progress))

    def prepare_dataset(self, images_u8: torch.Tensor, labels, key: NoiseKey, batch_size: int = 64) -> DatasetState:
        """The dataset state of a prepass or fit method over these images (whose noise key is `key`)."""
        if self.algorithm.scope == "prepass":
            values = np.concatenate([self.prepass_values(images_u8[s : s + batch_size], key.split(s, s + batch_size))
                                     for s in range(0, images_u8.shape[0], batch_size)])
            return self.state_from_prepass(values, key.indices.cpu().numpy())
        return self.fit(images_u8, labels, key)

    def purify_batch(
        self,
        images_u8: torch.Tensor,
        key: NoiseKey,
        progress: ProgressFn | None = None,
        *,
        keep_state: bool = False,
        first_stage_output: torch.Tensor | None = None,
        labels=None,
    ) -> PurifyResult:
        """Purify uint8 NHWC `images_u8` whose noise key (seed and global row indices) is `key`.

        `keep_state` also returns the fp32 result before rounding (`PurifyResult.state`). For a method
        with a `first_stage`, `first_stage_output` is that state from a purifier of the first-stage
        method with the same networks, options, precision and micro-batch on the same rows and seed:
        the method starts from it, which gives the bytes of running every stage without the first's cost.
        `labels`: the rows' classes, for a method that `needs_labels` (D-VAE).
        """
        if not isinstance(key, NoiseKey):
            raise TypeError(f"purify_batch takes a NoiseKey, got {type(key).__name__}")
        if len(key) != images_u8.shape[0]:
            raise InputError(f"the noise key has {len(key)} indices for {images_u8.shape[0]} images")
        algorithm = self.algorithm
        if first_stage_output is not None and algorithm.first_stage is None:
            raise ValueError(f"method {self.method!r} has no first stage to start after")
        if algorithm.pixels:
            out = algorithm.purify_pixels(images_u8.cpu())
            if progress:
                progress(len(images_u8))
            return PurifyResult(out.to(images_u8.device), _change_audit(images_u8.cpu(), out))
        if self.needs_dataset_pass:
            raise RuntimeError(f"method {self.method!r} needs its dataset state (a whole-dataset pass, or a given "
                               f"state) before purifying a batch")

        images_u8 = images_u8.to(self.device)
        key = key.to(self.device)
        n = images_u8.shape[0]
        labels = self._checked_labels(labels, n)
        per_step = _StepProgress(progress, n, self.network_steps()) if progress else None
        x = to_model_space(images_u8)
        energy_before = self.evaluator.energy(x).cpu().numpy() if self.has_ebm else None
        stage = None if first_stage_output is None else _checked_stage_output(first_stage_output, x)
        result = algorithm.purify(x, self._context(key, per_step, energy_before=energy_before,
                                                   first_stage_output=stage, labels=labels))
        x = result.x
        out = from_model_space(x)
        if result.unchanged is not None:
            keep = torch.from_numpy(np.asarray(result.unchanged)).to(out.device)
            out[keep] = images_u8[keep]
        audit = dict(result.audit)
        if energy_before is not None:
            audit["energy_before"] = energy_before.astype(np.float32)
            audit["energy_after"] = self.energies(out)
        audit.update(_change_audit(images_u8, out))
        return PurifyResult(out, audit, x if keep_state else None)

    def purify_differentiable(self, x: torch.Tensor, key: NoiseKey, *, checkpoint: bool = False) -> torch.Tensor:
        """The method as a float function of model-space images (N, C, H, W in [-1, 1]) that gradients flow
        through, for methods that declare `differentiable`. Pass a new key (seed) per call for a fresh sample
        of the purification's noise, as an attack's expectation over transformations does. `checkpoint`:
        recompute the networks' activations in the backward pass (memory for long reverse processes)."""
        if not self.algorithm.differentiable:
            raise InputError(f"method {self.method!r} has no differentiable path")
        if not isinstance(key, NoiseKey) or len(key) != x.shape[0]:
            raise TypeError("purify_differentiable takes a NoiseKey with one index per image")
        return self.algorithm.purify_differentiable(x, self._context(key.to(x.device), checkpoint=checkpoint))

    # -- Python API ----------------------------------------------------------------------------

    def purify(self, images, *, seed: int = 0, indices=None, offset: int = 0, batch_size: int = 64, labels=None):
        """Purify an array or tensor of images; returns the same kind it was given.

        `indices` (the samples' global row indices) default to
        ``offset + arange(len(images))``; they key the noise, so the same image
        at the same index gets the same bytes however it is batched. A method that
        needs the whole dataset (a prepass or a fit) takes these images as the dataset,
        unless its `dataset_state` is set. `labels`: one class per image, for a method that needs them.
        """
        x_model, restore = prepare_api_input(images)
        u8 = from_model_space(x_model)
        n = u8.shape[0]
        self.check_image_shape(*u8.shape[1:])
        key = _noise_key(seed, indices, n, offset)
        labels = self._checked_labels(labels, n)
        if self.algorithm.scope != "batch" and self.dataset_state is not None:
            self.algorithm.check_input(self.dataset_state, *u8.shape[1:],
                                       None if labels is None else labels.cpu().numpy())
        if self.needs_dataset_pass:
            self.dataset_state = self.prepare_dataset(u8, labels, key, batch_size)
            try:
                out = self._purify_all(u8, key, batch_size, labels)
            finally:
                self.dataset_state = None  # the state belongs to these images, not to the purifier
        else:
            out = self._purify_all(u8, key, batch_size, labels)
        return restore(out)

    def _purify_all(self, u8: torch.Tensor, key: NoiseKey, batch_size: int, labels=None) -> torch.Tensor:
        parts = [self.purify_batch(u8[s : s + batch_size], key.split(s, s + batch_size),
                                   labels=None if labels is None else labels[s : s + batch_size]).images
                 for s in range(0, u8.shape[0], batch_size)]
        return torch.cat(parts, dim=0)

    def purify_stream(self, batches: Iterable, *, seed: int = 0, offset: int = 0) -> Iterator:
        """Purify an iterable of batches (numpy arrays or torch tensors), yielding each result.

        Global indices keep counting across batches, so the output equals that
        of one big `purify` call. A method that needs the whole dataset needs its
        dataset state given here (for `filt`, an explicit energy threshold).
        """
        self.refuse_batch_route("a stream")
        position = offset
        for batch in batches:
            source = f"stream batch at index {position}"
            x_model, restore = prepare_api_input(batch, source=source)
            u8 = from_model_space(x_model)
            self.check_image_shape(*u8.shape[1:], source=source)
            key = NoiseKey.rows(seed, position, position + u8.shape[0])
            position += u8.shape[0]
            yield restore(self.purify_batch(u8, key).images)


def _noise_key(seed, indices, n: int, offset: int) -> NoiseKey:
    if indices is None:
        return NoiseKey.rows(seed, offset, offset + n)
    key = NoiseKey.of(seed, indices)
    if len(key) != n:
        raise InputError(f"indices has {len(key)} entries for {n} images")
    return key
