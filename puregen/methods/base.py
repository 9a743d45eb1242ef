"""The interface every purification method implements, and what the engine hands it.

A method is a subclass of `Method` that declares, as class attributes, what the
engine needs to know of it before running it:

* `name`, `help`: the registry key and the one line `puregen purify --help` shows
  (`label`: its name in result tables);
* `Config`: its typed config (a frozen dataclass built from `puregen.methods.options`),
  and `presets`: field values per preset name (`paper`, `tiny`);
* `networks`: the networks it evaluates (`ebm`, `unet`: loaded from checkpoints and
  run by the chosen backend), `needs_labels`;
* `noise_streams`: the Philox stream ids its stages draw (`puregen.kernels.philox` lists
  those the built-in stages take; a new kind of stage takes a stream of its own, so no
  two stages share Gaussians; checked to be in range at registration);
* `scope`, what it needs beyond one batch: `"batch"` (nothing), `"prepass"` (a value
  per image over the whole dataset first, reduced to a dataset state: `filt`'s energy
  quantile), or `"fit"` (a fit over the whole labelled input, whose state is part of
  a job's resumable state); a route that only sees batches refuses the last two
  unless the state is given (by the options in `state_options`, see `given_state`, or
  as `Purifier.dataset_state`);
* `first_stage`: the name of a method whose whole fp32 result is this method's first
  stage (`naive` starts where `ebm` ends), so a caller holding that result may skip it;
* `own_networks`: it runs networks of its own (D-VAE's fitted ones, held in its dataset
  state) in the purifier's precision (`BatchContext.precision`);
* `differentiable`: whether `purify_differentiable` gives a float path that gradients
  flow through (test-time attacks differentiate through the purification).

Per batch the engine calls `purify(x, ctx)` on fp32 model-space images in [-1, 1]
(NCHW), or `purify_pixels(images_u8)` for a method with `pixels = True` (JPEG),
and `network_evaluations()` for progress and benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import numpy as np
import torch

from ..engine.noise_key import NoiseKey

SCOPES = ("batch", "prepass", "fit")

DatasetState = dict  # JSON values and torch tensors; see `puregen.methods.state_io`


@dataclass
class BatchContext:
    """What a method's `purify` gets besides the images."""

    networks: Any  # the backend evaluating this purifier's `ebm` / `unet` (energy, energy_grad, epsilon)
    key: NoiseKey
    on_step: Callable[[int], None] | None = None
    energy_before: np.ndarray | None = None  # fp32 EBM energy of each input image, when the method has an EBM
    state: DatasetState | None = None  # the dataset state of a prepass or fit method
    first_stage_output: torch.Tensor | None = None  # `first_stage`'s fp32 result for these rows, when given
    models: Mapping[str, torch.nn.Module] = field(default_factory=dict)  # the loaded networks by kind
    labels: torch.Tensor | None = None  # int64 class of each row, for a method that `needs_labels`
    precision: str = "fp32"  # how a method with `own_networks` runs them (fp32, bf16, fp16 autocast)
    backend: str = "torch"  # and whether eager (torch) or under torch.compile (compiled)
    # `purify_differentiable`: recompute each network evaluation in the backward pass instead of keeping its
    # activations (gradient checkpointing), so memory no longer grows with the steps' activations.
    checkpoint: bool = False
    work_dir: Path | None = None  # `fit`: a folder of the job's resumable state for the fit's own checkpoints
    progress: bool = False  # `fit`: whether a long fit may show a progress bar

    def step(self, k: int = 1) -> None:
        if self.on_step is not None:
            self.on_step(k)


@dataclass
class MethodOutput:
    x: torch.Tensor  # fp32 model space
    audit: dict[str, np.ndarray] = field(default_factory=dict)  # per-sample columns of the job's audit
    unchanged: np.ndarray | None = None  # rows whose input bytes pass through exactly


class Method:
    """One purification method over one config (see the module docstring for what it declares)."""

    name: ClassVar[str]
    help: ClassVar[str]
    label: ClassVar[str | None] = None  # its name in result tables (default: `name`)
    Config: ClassVar[type]
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    networks: ClassVar[tuple[str, ...]] = ()
    needs_labels: ClassVar[bool] = False
    noise_streams: ClassVar[tuple[int, ...]] = ()
    scope: ClassVar[str] = "batch"
    state_options: ClassVar[tuple[str, ...]] = ()  # options that fix the dataset state (no pass needed then)
    first_stage: ClassVar[str | None] = None
    differentiable: ClassVar[bool] = False
    pixels: ClassVar[bool] = False  # works on the uint8 pixels, not in model space
    min_side: ClassVar[int] = 4  # the smallest image side it purifies
    # Networks of its own (a fit method's fitted models, in its dataset state) that it runs on the purifier's
    # device in its precision (`BatchContext.precision`), which is then part of a job's fingerprint.
    own_networks: ClassVar[bool] = False

    def __init__(self, config):
        if not isinstance(config, self.Config):
            raise TypeError(f"method {self.name!r} takes a {self.Config.__name__}, got {type(config).__name__}")
        self.config = config

    # -- per batch ---------------------------------------------------------------------------------------

    def network_evaluations(self) -> int:
        """Network evaluations per image (progress bars count these; benchmarks divide by them)."""
        raise NotImplementedError(f"method {self.name!r} does not say its cost")

    def purify(self, x: torch.Tensor, ctx: BatchContext) -> MethodOutput:
        raise NotImplementedError(f"method {self.name!r} has no model-space purification")

    def purify_pixels(self, images_u8: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"method {self.name!r} has no pixel purification")

    def purify_differentiable(self, x: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        """The purification as a float function that gradients flow through (methods with `differentiable`)."""
        raise NotImplementedError(f"method {self.name!r} has no differentiable path")

    # -- beyond one batch --------------------------------------------------------------------------------

    def given_state(self) -> DatasetState | None:
        """A dataset state fixed by the config itself (`filt` with an explicit threshold), else None."""
        return None

    def prepass(self, x: torch.Tensor, ctx: BatchContext) -> np.ndarray:
        """`prepass` scope: one float per image of a batch (fp32 model space)."""
        raise NotImplementedError(f"method {self.name!r} has no prepass")

    def state_from_prepass(self, values: np.ndarray, indices: np.ndarray) -> DatasetState:
        """`prepass` scope: the dataset state from every image's value and global index."""
        raise NotImplementedError(f"method {self.name!r} has no prepass")

    def fit(self, images_u8: torch.Tensor, labels: torch.Tensor | None, ctx: BatchContext) -> DatasetState:
        """`fit` scope: the state fitted on the whole input (uint8 NHWC; labels when `needs_labels`).

        `ctx.work_dir`, when given, is a folder inside the job's resumable state: a fit that checkpoints there
        and resumes from what it finds continues where a killed job stopped."""
        raise NotImplementedError(f"method {self.name!r} has no fit")

    def check_input(self, state: DatasetState, height: int, width: int, channels: int, labels) -> None:
        """An InputError when images of this shape (and these labels) cannot go through a given dataset state
        (D-VAE's fitted networks); called before a job writes anything."""

    def describe_state(self, state: DatasetState) -> dict:
        """What a job's manifest records of a dataset state (JSON values)."""
        return {k: v for k, v in state.items() if not torch.is_tensor(v)}
