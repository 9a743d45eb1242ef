"""DDPM training: epsilon-prediction MSE on the restricted timesteps purification uses.

Purification only ever runs the first t* <= 250 of the T = 1000 timesteps, so
by default the model is trained on t drawn uniformly from [0, 250) (the
published restricted schedule). AdamW, cosine learning rate with warm-up,
EMA weights (the EMA model is the one saved for purification).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..engine.schedule import DDPMSchedule
from ..errors import InputError
from ..models.unet import UNet2D
from ..models.unet_config import UNetConfig
from .loop import (
    Progress,
    StopSignals,
    TrainingData,
    autocast,
    batch_indices,
    cosine_with_warmup,
    ema_tensors,
    ema_update,
    open_run,
    prepare_run,
    restore_ema,
    save_run,
    set_lr,
    stop_step,
)
from .state import step_generator


def small_unet(in_channels: int = 1, sample_size: int = 28) -> UNetConfig:
    """The `small` DDPM for 28x28 Fashion-MNIST: 3 levels, attention at 14x14."""
    return UNetConfig(
        sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
        block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=32, norm_num_groups=8,
    )


@dataclass
class DDPMRecipe:
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 100
    ema_decay: float = 0.995
    t_train: int = 250
    grad_clip: float = 1.0
    seed: int = 0
    # "bf16": autocast the UNet; the loss is taken in fp32. "auto": bf16 where the CPU has it natively, else
    # fp32; fixed when the run starts and recorded in its recipe.
    precision: str = "fp32"
    unet: dict = field(default_factory=lambda: small_unet().to_dict())

    @classmethod
    def preset(cls, name: str, in_channels: int = 1, sample_size: int = 28) -> DDPMRecipe:
        if name == "small":
            return cls(unet=small_unet(in_channels, sample_size).to_dict())
        if name == "tiny":
            return cls(steps=20, batch_size=8, warmup=2, unet=UNetConfig.tiny(in_channels, sample_size).to_dict())
        if name == "paper":
            return cls(steps=200_000, batch_size=128, lr=2e-4, warmup=5000, ema_decay=0.9999,
                       unet=UNetConfig.paper().to_dict())
        raise InputError(f"unknown DDPM training preset {name!r}; choose small, tiny or paper")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def ddpm_loss(unet: UNet2D, x0: torch.Tensor, schedule: DDPMSchedule, t_train: int, g: torch.Generator,
              precision: str = "fp32") -> torch.Tensor:
    t = torch.randint(0, t_train, (x0.shape[0],), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    abar = torch.as_tensor(schedule.alphas_cumprod, dtype=torch.float32)[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    with autocast(precision):
        predicted = unet(x_t, t)
    return F.mse_loss(predicted.float(), noise)


def train_ddpm(
    data: TrainingData,
    run_dir: str | Path,
    recipe: DDPMRecipe,
    *,
    resume: bool = False,
    checkpoint_every: int = 200,
    progress: bool = True,
    max_steps_this_call: int | None = None,
) -> dict:
    """Train (or continue training) a DDPM; returns the final info. The run folder is a checkpoint."""
    run_dir = Path(run_dir)
    cfg = UNetConfig.from_dict(recipe.unet)
    if data.images.shape[1] != cfg.in_channels:
        raise InputError(f"{data.source}: images have {data.images.shape[1]} channels, the UNet expects {cfg.in_channels}")
    recipe = prepare_run(run_dir, recipe, resume=resume)
    torch.manual_seed(recipe.seed)
    unet = UNet2D(cfg)
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    schedule = DDPMSchedule()
    start, history, extra = open_run(run_dir, resume=resume, model=unet, optimizer=opt, recipe=recipe.to_dict(),
                                     data=data)
    if start:
        restore_ema(ema, extra)

    def save(step: int) -> None:
        save_run(run_dir, "ddpm", recipe.to_dict(), data, history, step=step, model=unet, optimizer=opt,
                 export_model=ema, extra_tensors=ema_tensors(ema))

    stop = stop_step(start, recipe.steps, max_steps_this_call)
    bar = Progress(recipe.steps, start, "train ddpm", recipe.batch_size, progress)
    running = None
    unet.train()
    with StopSignals() as signals, contextlib.closing(bar):
        for step in range(start, stop):
            g = step_generator(recipe.seed, step)
            x0 = data.images[batch_indices(len(data), recipe.batch_size, step, recipe.seed)]
            set_lr(opt, cosine_with_warmup(step, recipe.steps, recipe.warmup, recipe.lr))
            loss = ddpm_loss(unet, x0, schedule, recipe.t_train, g, recipe.precision)
            if not math.isfinite(loss.item()):
                raise RuntimeError(f"DDPM loss became {loss.item()} at step {step}; lower the learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), recipe.grad_clip)
            opt.step()
            ema_update(ema, unet, recipe.ema_decay)
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            bar.update(step, loss=running)
            if (step + 1) % 50 == 0:
                history.append({"step": step + 1, "loss": round(running, 6)})
            signals.end_of_step(step + 1, stop, run_dir, lambda: save(step + 1),
                                due=(step + 1) % checkpoint_every == 0 or step + 1 == stop)
    return {"step": stop, "history": history, "run_dir": str(run_dir), "precision": recipe.precision}
