"""The purification dynamics as plain functions over a network backend.

The image state is fp32 throughout; the networks only supply `grad_x G` or the
epsilon prediction. Each function draws its noise through the kernels' Philox
contract, keyed by the samples' global indices, so results do not depend on
the batch a sample was processed in. The update steps run on the fused
kernels that `kernels.dispatch` picks for the device (native C++ on CPU,
Triton on CUDA, the torch reference otherwise).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..backends.base import NetworkBackend
from ..config import DiffusionConfig, LangevinConfig
from ..kernels import philox
from ..kernels.dispatch import kernels_for
from .schedule import DDPMSchedule

StepCallback = Callable[[int], None]


def langevin(
    x: torch.Tensor,
    evaluator: NetworkBackend,
    cfg: LangevinConfig,
    *,
    steps: int | None = None,
    indices: torch.Tensor,
    seed: int,
    repetition: int = 0,
    on_step: StepCallback | None = None,
) -> torch.Tensor:
    """EBM Langevin: ``x <- x - eps^2/(2 temp) grad_x G(x) + eps n``; no clamping inside the loop."""
    stream = philox.stage_stream(philox.STREAM_EBM, repetition)
    x = x.to(torch.float32)
    kernels = kernels_for(x.device)
    for step in range(cfg.steps if steps is None else steps):
        grad = evaluator.energy_grad(x)
        x = kernels.langevin_update(
            x, grad, drift=cfg.drift, noise_scale=cfg.eps, indices=indices, seed=seed, stream=stream, step=step
        )
        if on_step is not None:
            on_step(1)
    return x


def diffuse_denoise(
    x0: torch.Tensor,
    evaluator: NetworkBackend,
    cfg: DiffusionConfig,
    *,
    t_star: int | None = None,
    indices: torch.Tensor,
    seed: int,
    repetition: int = 0,
    on_step: StepCallback | None = None,
) -> torch.Tensor:
    """Noise to index t*-1, then run the ancestral reverse steps t*-1 .. 0 (all t*, or `cfg.reverse_steps` of them)."""
    schedule = DDPMSchedule(cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps)
    t_star = cfg.t_star if t_star is None else t_star
    sqrt_abar, sqrt_one_minus = schedule.forward_coefficients(t_star)
    kernels = kernels_for(x0.device)
    x = kernels.ddpm_forward_noise(
        x0.to(torch.float32),
        sqrt_alpha_bar=sqrt_abar,
        sqrt_one_minus_alpha_bar=sqrt_one_minus,
        indices=indices,
        seed=seed,
        stream=philox.stage_stream(philox.STREAM_DDPM_FORWARD, repetition),
    )
    reverse_stream = philox.stage_stream(philox.STREAM_DDPM_REVERSE, repetition)
    timesteps = schedule.reverse_timesteps(t_star, cfg.reverse_steps)
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        eps = evaluator.epsilon(x, t)
        # The step's noise is keyed by its trained timestep t, so a respaced run draws a subset of the
        # full run's noise; the last step (to the clean image) adds none.
        x = kernels.ddpm_reverse_step(
            x,
            eps,
            t=t if t_prev >= 0 else 0,
            coefs=schedule.reverse_coefficients(t, t_prev),
            indices=indices,
            seed=seed,
            stream=reverse_stream,
            clip_x0=cfg.clip_x0,
        )
        if on_step is not None:
            on_step(1)
    return x
