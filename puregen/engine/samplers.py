"""The purification dynamics as plain functions over a network backend.

The image state is fp32 throughout; the networks only supply `grad_x G` or the
epsilon prediction. Each function draws its noise through the kernels' Philox
contract, keyed by the samples' global indices, so results do not depend on
the batch a sample was processed in. The update steps run on the fused
kernels that `kernels.dispatch` picks for the device (native C++ on CPU,
Triton on CUDA, the torch reference otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.utils.checkpoint

from ..backends.base import NetworkBackend, reflect_pad_to
from ..kernels import philox
from ..kernels.dispatch import kernels_for
from .noise_key import NoiseKey
from .schedule import DDPMSchedule

StepCallback = Callable[[int], None]


@dataclass(frozen=True)
class LangevinConfig:
    """One EBM Langevin stage (published PureGen values: 150 steps, eps 1.25e-2, temperature 1e-4)."""

    steps: int = 150
    eps: float = 1.25e-2
    temp: float = 1e-4

    @property
    def drift(self) -> float:
        """The fp32 factor on grad_x G: eps^2 / (2 temp)."""
        return self.eps**2 / (2.0 * self.temp)


@dataclass(frozen=True)
class DiffusionConfig:
    """One DDPM diffuse-then-denoise stage (published: t* = 75 of a linear 1e-4 .. 0.02, 1000-step schedule)."""

    t_star: int = 75
    beta_start: float = 1e-4
    beta_end: float = 0.02
    num_train_timesteps: int = 1000
    clip_x0: bool = True
    # Reverse steps actually run, spread evenly over the t* trained timesteps (respacing, as in
    # improved-diffusion); None runs all t*. Fewer steps trade fidelity for speed at the same noise level.
    reverse_steps: int | None = None

    @property
    def network_evaluations(self) -> int:
        return min(self.t_star, self.reverse_steps or self.t_star)


def langevin(
    x: torch.Tensor,
    evaluator: NetworkBackend,
    cfg: LangevinConfig,
    *,
    steps: int | None = None,
    key: NoiseKey,
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
            x, grad, drift=cfg.drift, noise_scale=cfg.eps, indices=key.indices, seed=key.seed, stream=stream, step=step
        )
        if on_step is not None:
            on_step(1)
    return x


def diffuse_denoise(
    x0: torch.Tensor,
    evaluator: NetworkBackend,
    cfg: DiffusionConfig,
    *,
    key: NoiseKey,
    repetition: int = 0,
    on_step: StepCallback | None = None,
    kernels=None,
    guide: Callable | None = None,
) -> torch.Tensor:
    """Noise to index t*-1, then run the ancestral reverse steps t*-1 .. 0 (all t*, or `cfg.reverse_steps` of them).

    `kernels`: the update steps' implementation (default: the device's fused kernels; the torch reference
    for a path that gradients flow through). `guide(x_t, t, t_prev, coefs)`: a term added to the output of
    the step t -> t_prev, computed from its input (GDMP's guidance, `engine.guided`), or None to add nothing."""
    schedule = DDPMSchedule(cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps)
    t_star = cfg.t_star
    sqrt_abar, sqrt_one_minus = schedule.forward_coefficients(t_star)
    kernels = kernels_for(x0.device) if kernels is None else kernels
    x = kernels.ddpm_forward_noise(
        x0.to(torch.float32),
        sqrt_alpha_bar=sqrt_abar,
        sqrt_one_minus_alpha_bar=sqrt_one_minus,
        indices=key.indices,
        seed=key.seed,
        stream=philox.stage_stream(philox.STREAM_DDPM_FORWARD, repetition),
    )
    reverse_stream = philox.stage_stream(philox.STREAM_DDPM_REVERSE, repetition)
    timesteps = schedule.reverse_timesteps(t_star, cfg.reverse_steps)
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        eps = evaluator.epsilon(x, t)
        coefs = schedule.reverse_coefficients(t, t_prev)
        extra = guide(x, t, t_prev, coefs) if guide is not None else None
        # The step's noise is keyed by its trained timestep t, so a respaced run draws a subset of the
        # full run's noise; the last step (to the clean image) adds none.
        x = kernels.ddpm_reverse_step(
            x,
            eps,
            t=t if t_prev >= 0 else 0,
            coefs=coefs,
            indices=key.indices,
            seed=key.seed,
            stream=reverse_stream,
            clip_x0=cfg.clip_x0,
        )
        if extra is not None:
            x = x + extra
        if on_step is not None:
            on_step(1)
    return x


class DifferentiableEpsilon:
    """The UNet's noise prediction with autograd on: fp32, eager, on the whole batch.

    For `diffuse_denoise(..., kernels=reference)` as a function of its input that gradients flow
    through (test-time attacks differentiate through the purification). Sides the UNet cannot take
    are reflect-padded, as the backends do. `checkpoint`: each evaluation's activations are recomputed in
    the backward pass rather than kept (torch.utils.checkpoint), so a gradient through K steps keeps K
    inputs instead of K UNets' activations, at the cost of one more forward per step.
    """

    def __init__(self, unet: torch.nn.Module, checkpoint: bool = False):
        self.unet = unet
        self.checkpoint = checkpoint

    def epsilon(self, x: torch.Tensor, t: int) -> torch.Tensor:
        if self.checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._epsilon, x, t, use_reentrant=False)
        return self._epsilon(x, t)

    def _epsilon(self, x: torch.Tensor, t: int) -> torch.Tensor:
        h, w = x.shape[-2:]
        padded = reflect_pad_to(x, self.unet.pad_multiple)
        timesteps = torch.full((x.shape[0],), t, dtype=torch.int64, device=x.device)
        return self.unet(padded, timesteps).float()[..., :h, :w]
