"""`dvae`: remove unlearnable-example noise with two rate-constrained VAEs (D-VAE, Yu et al., ICML 2024).

Its scope is `fit`: D-VAE learns from the very dataset it purifies. A job fits
both stages on its (labelled) input as resumable training runs inside its
work folder (``OUT.parts/fit/``, see `puregen.training.dvae`), keeps the
fitted networks as its dataset state (recorded in the manifest by their
configs and weight digests), then purifies every image with them. With
`--dvae RUN` (a `puregen train dvae` run folder, or a finished job's fit)
the networks are given, and no fit runs: they apply to any data of the same
shape and classes. The perturbation decoder is class-conditioned, so
purification needs the labels either way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...data.convert import to_model_space
from ...errors import InputError
from ...kernels import philox
from ...models.dvae import DVAE, DVAEConfig
from ...models.dvae_purify import purify_two_stage
from ..base import BatchContext, DatasetState, Method, MethodOutput
from ..options import MethodConfig, option
from ..registry import register

FIT_RECIPES = ("paper", "small", "tiny")


def _one_of(choices):
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}, got {v!r}"


@dataclass(frozen=True)
class DVAEMethodConfig(MethodConfig):
    dvae: str | None = option(None, "a fitted D-VAE run folder (`puregen train dvae`) to apply instead of fitting "
                              "on the input", type=str)
    dvae_recipe: str = option("paper", "D-VAE fitting recipe when no --dvae is given: paper (60 epochs, GPU), "
                              "small (CPU) or tiny (tests)", check=_one_of(FIT_RECIPES))


def state_from_models(stage1: DVAE, stage2: DVAE, description: dict) -> DatasetState:
    """The dataset state of two fitted stages: their weights as tensors, their configs and digests as values."""
    state: DatasetState = {"config": stage1.config.to_dict(), "recipe": description.get("recipe", {}),
                           "num_classes": stage1.config.num_classes}
    for name, model in (("stage1", stage1), ("stage2", stage2)):
        h = hashlib.sha256()
        for k, v in sorted(model.state_dict().items()):
            t = v.detach().cpu().contiguous()
            state[f"{name}.{k}"] = t
            h.update(k.encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        state[f"{name}_weights_sha256"] = h.hexdigest()
    return state


def models_from_state(state: DatasetState) -> tuple[DVAE, DVAE]:
    config = DVAEConfig.from_dict(state["config"])
    models = []
    for name in ("stage1", "stage2"):
        model = DVAE(config)
        prefix = f"{name}."
        weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and torch.is_tensor(v)}
        model.load_state_dict(weights)
        models.append(model.eval())
    return models[0], models[1]


def _load_run(folder: str) -> DatasetState:
    from ...training.dvae import load_dvae_run

    stage1, stage2, description = load_dvae_run(folder)
    return state_from_models(stage1, stage2, description)


@dataclass
class _Fitted:
    """The networks built from one dataset state (kept with the state's first tensor so the key stays valid)."""

    anchor: torch.Tensor
    device: torch.device
    compiled: bool
    models: tuple[DVAE, DVAE]


@register
class DVAEPurification(Method):
    name = "dvae"
    label = "D-VAE"
    help = ("D-VAE: fit two rate-constrained VAEs on the labelled input (or apply fitted ones, --dvae) and "
            "remove the class-wise perturbation they predict")
    Config = DVAEMethodConfig
    presets = {"tiny": {"dvae_recipe": "tiny"}}
    needs_labels = True
    noise_streams = (philox.STREAM_DVAE,)
    scope = "fit"
    state_options = ("dvae",)
    own_networks = True

    def __init__(self, config):
        super().__init__(config)
        self._fitted: _Fitted | None = None

    def network_evaluations(self) -> int:
        return 3  # three encoder-decoder passes per image: stage 1, stage 2, stage 2's reconstruction

    def given_state(self) -> DatasetState | None:
        if self.config.dvae is None:
            return None
        return _load_run(self.config.dvae)

    def fit(self, images_u8, labels, ctx: BatchContext) -> DatasetState:
        from ...engine.pipeline import dataset_fingerprint
        from ...training.dvae import DVAERecipe, load_dvae_run, train_dvae
        from ...training.loop import TrainingData

        if labels is None:
            raise InputError("method 'dvae' needs labelled data: its perturbation decoder is class-conditioned")
        u8 = images_u8.cpu().numpy()
        # The same model-space images the purification pass gets, so stage 2 trains on exactly the x1 that
        # the job's own stage-1 pass computes (the fit keys its noise with the job's key).
        data = TrainingData(images=to_model_space(images_u8.cpu()), labels=labels.cpu().to(torch.int64),
                            fingerprint=dataset_fingerprint(u8, labels.cpu().numpy()), source="the job's input")
        # The job's seed seeds the fit too (folded into the training generators' range), so `puregen train dvae
        # --seed S` fits what a job with --seed S fits.
        recipe = dataclasses.replace(DVAERecipe.preset(self.config.dvae_recipe), seed=ctx.key.seed % 2**31)

        def run(folder: Path) -> DatasetState:
            resume = folder.is_dir() and any(folder.iterdir())
            train_dvae(data, folder, recipe, resume=resume, key=ctx.key, progress=ctx.progress)
            return state_from_models(*load_dvae_run(folder))

        if ctx.work_dir is not None:
            return run(Path(ctx.work_dir))
        with tempfile.TemporaryDirectory(prefix="puregen-dvae-") as tmp:  # the API's fit: nothing to resume
            return run(Path(tmp) / "run")

    def _models(self, state: DatasetState, device: torch.device, compiled: bool) -> tuple[DVAE, DVAE]:
        anchor = state["stage1.stem.0.weight"]
        cached = self._fitted
        if cached is None or cached.anchor is not anchor or cached.device != device or cached.compiled != compiled:
            stages = [m.to(device) for m in models_from_state(state)]
            if compiled:  # 1.1-1.3x over eager at bf16 on CPU (docs/dvae.md); one micro-batch shape, one compile
                stages = [torch.compile(m) for m in stages]
            cached = self._fitted = _Fitted(anchor, device, compiled, (stages[0], stages[1]))
        return cached.models

    def check_input(self, state: DatasetState, height: int, width: int, channels: int, labels) -> None:
        config = DVAEConfig.from_dict(state["config"])
        if (channels, height, width) != (config.in_channels, config.image_height, config.image_width):
            raise InputError(f"the D-VAE was fitted on {config.image_height}x{config.image_width}x"
                             f"{config.in_channels} images; these are {height}x{width}x{channels}")
        if labels is None:
            raise InputError("method 'dvae' needs the images' labels to purify them")
        labels = np.asarray(labels)
        if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= config.num_classes):
            raise InputError(f"labels must be in [0, {config.num_classes}) for this D-VAE "
                             f"({config.num_classes} classes), got {int(labels.min())}..{int(labels.max())}")

    def purify(self, x, ctx: BatchContext) -> MethodOutput:
        stage1, stage2 = self._models(ctx.state, x.device, ctx.backend == "compiled")
        labels = ctx.labels
        self.check_input(ctx.state, *x.shape[2:], x.shape[1], None if labels is None else labels.cpu().numpy())
        out01 = purify_two_stage(stage1, stage2, (x + 1) / 2, labels.to(x.device), ctx.key, ctx.precision)
        ctx.step(self.network_evaluations())
        return MethodOutput(out01 * 2 - 1)
