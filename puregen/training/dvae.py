"""D-VAE fitting (Yu et al., ICML 2024): two rate-constrained VAEs, each a resumable training run.

Stage 1 fits a D-VAE with KL bound tau = 1 on the (poisoned) labelled set;
x1 = clamp(x - p_hat_1) is then computed with the per-sample noise of the
purification itself (`puregen.models.dvae_purify`, keyed by the fit's noise
key), and stage 2 fits a fresh D-VAE with tau = 3 on x1. The run folder holds

    RUN/stage1/   a training run (config.json + model.safetensors + training state)
    RUN/stage2/   the same for stage 2
    RUN/dvae.json written last, once both stages are done: what `--dvae RUN` reads

so a run stopped anywhere resumes where it stopped (stage 2's data, x1, is a
function of stage 1's weights and the key, recomputed on resume and checked
against the fingerprint stage 2 recorded).

Loss per batch (pixels in [0, 1]): MSE(x_hat, x) + MSE(clamp(x_hat + p_hat), x)
+ w * max(KL, tau), plus max(mean(p_hat^2), floor) from epoch
`perturbation_from_epoch` on; KL is the batch-and-position mean of the sum over
latent channels. The hinge is what makes the VAE rate-constrained: below tau
the KL term has no gradient, so the encoder may spend up to tau nats per
position, too few to carry the perturbation, which the class embedding carries.

Cost on this project's 2-core CPU (torch fp32, one thread, while two other
jobs shared the cores; docs/dvae.md): the `small` preset fitted 10,000
28x28x1 images in 15.6 minutes of wall time, 8.7 of CPU time (2 stages x 10
epochs x 78 steps of 128 images; `puregen train dvae --threads 1`,
2026-12-04). The published width (`paper`) costs ~1.9 GFLOP per 28x28 image
per step, about 16x the `small` net's: 6.3 s per step here, a GPU job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.atomic import write_json_atomic
from ..engine.noise_key import NoiseKey
from ..errors import CheckpointError, InputError
from ..models.checkpoints import load_model
from ..models.dvae import DVAE, DVAEConfig
from ..models.dvae_purify import STEP_STAGE1, remove_perturbation
from ..models.safetensors_io import read_json
from .loop import (
    Progress,
    StopSignals,
    TrainingData,
    autocast,
    batch_indices,
    cosine_with_warmup,
    open_run,
    prepare_run,
    save_run,
    set_lr,
    stop_step,
)
from .state import STATE_JSON, step_generator

RUN_FILE = "dvae.json"
RUN_FORMAT = "puregen-dvae"
RUN_VERSION = 1
STAGES = ("stage1", "stage2")


@dataclass
class DVAERecipe:
    epochs: int = 60
    batch_size: int = 128
    lr: float = 5e-3
    grad_clip: float = 5.0
    kl_weight: float = 0.01
    tau_stage1: float = 1.0
    tau_stage2: float = 3.0
    perturbation_floor: float = 0.002
    perturbation_from_epoch: int = 10  # the published recipe adds the perturbation-norm term after epoch 10
    width: int = 64
    latent_channels: int = 256
    seed: int = 0
    precision: str = "fp32"  # "bf16": autocast the networks; losses in fp32

    @classmethod
    def preset(cls, name: str) -> "DVAERecipe":
        if name == "paper":  # CIFAR-10, 60 epochs, a GPU job
            return cls()
        if name == "small":
            # CPU-sized: a quarter of the width (1/16 of the FLOPs), a quarter of the latent, 10 epochs a stage
            # with the perturbation-norm term from epoch 3 on (the published 10 of 60, scaled). Measured 15.6 min
            # (wall) for 10,000 28x28x1 images on one shared thread of this project's CPU (module docstring).
            return cls(epochs=10, width=16, latent_channels=64, perturbation_from_epoch=3)
        if name == "tiny":  # tests: a few steps of a very narrow net
            return cls(epochs=2, batch_size=16, width=8, latent_channels=8, perturbation_from_epoch=1)
        raise InputError(f"unknown D-VAE training preset {name!r}; choose small, tiny or paper")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def steps_per_stage(self, n: int) -> int:
        return self.epochs * self.steps_per_epoch(n)

    def steps_per_epoch(self, n: int) -> int:
        return max(n // self.batch_size, 1)  # `batch_indices`' epochs: the remainder waits for the next

    def model_config(self, images: torch.Tensor, num_classes: int) -> DVAEConfig:
        _, c, h, w = images.shape
        try:
            return DVAEConfig(in_channels=c, image_height=h, image_width=w, num_classes=num_classes,
                              width=self.width, latent_channels=self.latent_channels)
        except ValueError as e:
            raise InputError(str(e)) from None


# -- the loss ----------------------------------------------------------------------------------------------


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)): summed over latent channels, averaged over batch and positions."""
    return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).sum(dim=1).mean()


def kl_hinge(kl: torch.Tensor, tau: float) -> torch.Tensor:
    """max(KL, tau): constant (zero gradient) below the bound, the KL itself above it."""
    return torch.clamp(kl, min=tau)


def dvae_loss(model: DVAE, x: torch.Tensor, labels: torch.Tensor, g: torch.Generator, *, tau: float, epoch: int,
              recipe: DVAERecipe) -> tuple[torch.Tensor, dict]:
    noise = torch.randn((x.shape[0], *model.latent_shape()), generator=g)
    with autocast(recipe.precision):
        out = model(x, labels, noise)
    x_hat, p_hat = out.x_hat.float(), out.p_hat.float()
    kl = kl_divergence(out.mu.float(), out.logvar.float())
    reconstruction = F.mse_loss(x_hat, x)
    poisoned = F.mse_loss((x_hat + p_hat).clamp(0, 1), x)
    loss = reconstruction + poisoned + recipe.kl_weight * kl_hinge(kl, tau)
    if epoch >= recipe.perturbation_from_epoch:
        # Keeps p_hat from collapsing to zero once the reconstructions are good (the published floor, 0.002).
        loss = loss + torch.clamp(p_hat.pow(2).mean(), min=recipe.perturbation_floor)
    return loss, {"rec": reconstruction.item(), "kl": kl.item()}


# -- one stage ---------------------------------------------------------------------------------------------


def train_stage(data: TrainingData, num_classes: int, run_dir: Path, recipe: DVAERecipe, *, stage: int, tau: float,
                checkpoint_every: int = 100, progress: bool = True, max_steps_this_call: int | None = None) -> dict:
    """Fit (or continue fitting) one D-VAE on `data` (model-space images, labels); the folder is a run."""
    resume = (run_dir / STATE_JSON).is_file()
    recipe = prepare_run(run_dir, recipe, resume=resume)
    x01 = (data.images + 1) / 2  # the D-VAE works in [0, 1] pixel units
    torch.manual_seed(recipe.seed * 10 + stage)  # each stage a fresh, seeded network
    model = DVAE(recipe.model_config(data.images, num_classes))
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    description = {**recipe.to_dict(), "stage": stage, "tau": tau, "num_classes": num_classes}
    start, history, _ = open_run(run_dir, resume=resume, model=model, optimizer=opt, recipe=description, data=data)
    total = recipe.steps_per_stage(len(data))
    per_epoch = recipe.steps_per_epoch(len(data))

    def save(step: int) -> None:
        save_run(run_dir, "dvae", description, data, history, step=step, model=model, optimizer=opt)

    stop = stop_step(start, total, max_steps_this_call)
    bar = Progress(total, start, f"fit dvae stage {stage}", recipe.batch_size, progress)
    running = None
    model.train()
    with StopSignals() as signals, contextlib.closing(bar):
        for step in range(start, stop):
            g = step_generator(recipe.seed * 10 + stage, step)
            rows = batch_indices(len(data), recipe.batch_size, step, recipe.seed)
            set_lr(opt, cosine_with_warmup(step, total, 0, recipe.lr))
            loss, parts = dvae_loss(model, x01[rows], data.labels[rows], g, tau=tau, epoch=step // per_epoch,
                                    recipe=recipe)
            if not math.isfinite(loss.item()):
                raise RuntimeError(f"D-VAE stage {stage} loss became {loss.item()} at step {step}; lower the lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            opt.step()
            running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
            bar.update(step, loss=running, kl=parts["kl"])
            if (step + 1) % 20 == 0 or step + 1 == total:
                history.append({"step": step + 1, "loss": round(running, 6),
                                **{k: round(v, 6) for k, v in parts.items()}})
            signals.end_of_step(step + 1, stop, run_dir, lambda: save(step + 1),
                                due=(step + 1) % checkpoint_every == 0 or step + 1 == stop)
    if start == stop and not resume:  # nothing to train (an empty budget): still leave a resumable folder
        save(start)
    return {"start": start, "step": stop, "total": total, "precision": recipe.precision, "history": history}


# -- both stages -------------------------------------------------------------------------------------------


def _stage2_data(stage1: DVAE, data: TrainingData, key: NoiseKey, precision: str) -> TrainingData:
    x1 = remove_perturbation(stage1, (data.images + 1) / 2, data.labels, key, STEP_STAGE1, precision)
    h = hashlib.sha256(b"dvae-stage1-output")
    h.update(x1.numpy().tobytes())
    h.update(data.labels.numpy().astype(np.int64).tobytes())
    return TrainingData(images=x1 * 2 - 1, labels=data.labels, fingerprint=h.hexdigest(),
                        source=f"{data.source} after D-VAE stage 1")


def _check_run_folder(run_dir: Path, resume: bool) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"{run_dir}: exists and is not a run folder")
    if resume and not run_dir.is_dir():
        raise InputError(f"{run_dir}: no run to resume (the folder does not exist); start a new run without --resume")
    if not resume and run_dir.is_dir() and any(run_dir.iterdir()):
        raise InputError(f"{run_dir}: a run already exists here; pass --resume to continue it")


def train_dvae(data: TrainingData, run_dir: str | Path, recipe: DVAERecipe, *, resume: bool = False,
               key: NoiseKey | None = None, checkpoint_every: int = 100, progress: bool = True,
               max_steps_this_call: int | None = None, num_classes: int | None = None) -> dict:
    """Fit both D-VAE stages into `run_dir` (or continue them); returns the final info.

    `key`: the noise key of the training images' rows (default: rows 0..n-1 under `recipe.seed`); stage 2
    trains on stage 1's purification of them under this key, as a purification job with that key computes it.
    `max_steps_this_call` counts the steps of both stages together.
    """
    run_dir = Path(run_dir)
    if data.labels is None:
        raise InputError(f"{data.source}: D-VAE needs labelled data (its perturbation decoder is class-conditioned)")
    _check_run_folder(run_dir, resume)
    if num_classes is None:
        num_classes = max(int(data.labels.max()) + 1, 2)
    if int(data.labels.min()) < 0:
        raise InputError(f"{data.source}: labels must be non-negative class indices")
    key = key if key is not None else NoiseKey.rows(recipe.seed, 0, len(data))
    run_dir.mkdir(parents=True, exist_ok=True)
    budget = max_steps_this_call
    done_steps, infos, stage_data = 0, [], data
    for number, (name, tau) in enumerate(zip(STAGES, (recipe.tau_stage1, recipe.tau_stage2)), start=1):
        info = train_stage(stage_data, num_classes, run_dir / name, recipe, stage=number, tau=tau,
                           checkpoint_every=checkpoint_every, progress=progress, max_steps_this_call=budget)
        recipe = dataclasses.replace(recipe, precision=info["precision"])  # stage 2 keeps stage 1's precision
        infos.append(info)
        done_steps += info["step"]
        if info["step"] < info["total"]:
            return {"step": done_steps, "complete": False, "run_dir": str(run_dir), "precision": info["precision"]}
        if budget is not None:
            budget = max(budget - (info["step"] - info["start"]), 0)
        if number == 1:
            stage1 = load_model(run_dir / name, expect="dvae").model
            stage_data = _stage2_data(stage1, data, key, recipe.precision)
    description = {
        "format": RUN_FORMAT, "version": RUN_VERSION, "recipe": recipe.to_dict(), "num_classes": num_classes,
        "data_fingerprint": data.fingerprint, "data_source": data.source, "noise_seed": key.seed,
        "stages": {name: {"tau": tau, "steps": info["total"]}
                   for name, tau, info in zip(STAGES, (recipe.tau_stage1, recipe.tau_stage2), infos)},
    }
    write_json_atomic(run_dir / RUN_FILE, description)
    return {"step": done_steps, "complete": True, "run_dir": str(run_dir), "precision": recipe.precision}


def load_dvae_run(folder: str | Path) -> tuple[DVAE, DVAE, dict]:
    """The two fitted stages of a finished D-VAE run folder (`puregen train dvae`, or a job's fit), checked."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a D-VAE run folder (no such folder)")
    if not (folder / RUN_FILE).is_file():
        raise CheckpointError(f"{folder}: not a finished D-VAE run ({RUN_FILE} is missing); a run writes it when "
                              f"both stages are fitted (`puregen train dvae DATA -o {folder} --resume` finishes one)")
    description = read_json(folder / RUN_FILE)
    if not isinstance(description, dict) or description.get("format") != RUN_FORMAT \
            or description.get("version") != RUN_VERSION:
        raise CheckpointError(f"{folder / RUN_FILE}: not a {RUN_FORMAT} version {RUN_VERSION} description")
    models = [load_model(folder / name, expect="dvae").model for name in STAGES]
    first, second = models[0].config, models[1].config
    if first != second:
        raise CheckpointError(f"{folder}: its two stages were fitted for different images or classes "
                              f"({first} vs {second})")
    return models[0], models[1], description
