"""Acceptance measurements of trained models on held-out data (for the model card).

* EBM: held-out images must have lower energy than the EBM's short-run samples
  (a positive gap), and EBM-purified images must keep their class (a small
  classifier trained on clean data keeps >= 90% of its accuracy on them).
* DDPM: at t* = 75 the predicted clean image must have at most half the error
  of the noised input.
"""

from __future__ import annotations

import math

import torch

from ..backends.torch_backend import TorchBackend
from ..engine.samplers import LangevinConfig
from ..engine.schedule import DDPMSchedule
from ..kernels import philox
from ..kernels.reference import ddpm_forward_noise
from .ebm import short_run
from .state import step_generator


@torch.no_grad()
def ebm_energy_gap(ebm, held_out: torch.Tensor, steps: int = 150, seed: int = 0) -> dict:
    """Mean energy of short-run samples (from uniform noise) minus that of held-out data."""
    g = step_generator(seed, 0)
    start = torch.rand(held_out.shape, generator=g) * 2 - 1
    cfg = LangevinConfig()
    with torch.enable_grad():
        samples = short_run(ebm, start, steps, cfg.drift, cfg.eps, g)
    e_data = ebm(held_out).mean().item()
    e_samples = ebm(samples).mean().item()
    return {"energy_held_out": e_data, "energy_short_run": e_samples, "gap": e_samples - e_data,
            "samples": samples}


def ddpm_denoising_ratio(unet, held_out: torch.Tensor, t_star: int = 75, seed: int = 0) -> dict:
    """RMS error of the predicted x0 at index t*-1 over the RMS error of the noised input."""
    schedule = DDPMSchedule()
    t = t_star - 1
    abar = float(schedule.alphas_cumprod[t])
    x_t = ddpm_forward_noise(held_out, sqrt_alpha_bar=math.sqrt(abar), sqrt_one_minus_alpha_bar=math.sqrt(1 - abar),
                             indices=torch.arange(held_out.shape[0]), seed=seed, stream=philox.STREAM_DDPM_FORWARD)
    ev = TorchBackend(unet=unet)
    eps = ev.epsilon(x_t, t)
    x0_hat = ((x_t - math.sqrt(1 - abar) * eps) / math.sqrt(abar)).clamp(-1, 1)
    err_pred = (x0_hat - held_out).pow(2).mean().sqrt().item()
    err_noisy = (x_t - held_out).pow(2).mean().sqrt().item()
    return {"t_star": t_star, "rms_error_predicted_x0": err_pred, "rms_error_noised_input": err_noisy,
            "ratio": err_pred / err_noisy}
