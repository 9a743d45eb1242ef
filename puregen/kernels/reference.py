"""Reference (plain torch, fp32) implementations of the purifiers' update steps.

These are the oracle for the fused native and Triton kernels. Every step draws
its noise from the Philox contract in `philox.py`, so a sample's noise depends
only on ``(seed, stream, global index, step, element)``.
"""

from __future__ import annotations

import torch

from .philox import normal_noise


def _noise_like(x: torch.Tensor, indices: torch.Tensor, seed: int, stream: int, step: int) -> torch.Tensor:
    return normal_noise(indices.to(x.device), tuple(x.shape[1:]), seed=seed, stream=stream, step=step).to(x.device)


def langevin_update(
    x: torch.Tensor,
    grad: torch.Tensor,
    *,
    drift: float,
    noise_scale: float,
    indices: torch.Tensor,
    seed: int,
    stream: int,
    step: int,
) -> torch.Tensor:
    """``x - drift * grad + noise_scale * n``, with ``drift = eps^2 / (2 temp)``, in fp32."""
    n = _noise_like(x, indices, seed, stream, step)
    return x - drift * grad.to(torch.float32) + noise_scale * n


def ddpm_forward_noise(
    x0: torch.Tensor,
    *,
    sqrt_alpha_bar: float,
    sqrt_one_minus_alpha_bar: float,
    indices: torch.Tensor,
    seed: int,
    stream: int,
) -> torch.Tensor:
    """``x_t = sqrt(abar) x0 + sqrt(1 - abar) n`` (step 0 of its stream)."""
    n = _noise_like(x0, indices, seed, stream, 0)
    return sqrt_alpha_bar * x0 + sqrt_one_minus_alpha_bar * n


def ddpm_reverse_step(
    x_t: torch.Tensor,
    eps_pred: torch.Tensor,
    *,
    t: int,
    coefs: "ReverseCoefficients",
    indices: torch.Tensor,
    seed: int,
    stream: int,
    clip_x0: bool = True,
) -> torch.Tensor:
    """One ancestral step t -> t-1: x0 from epsilon, clip, posterior mean, fixed_small noise."""
    eps_pred = eps_pred.to(torch.float32)
    x0 = coefs.recip_sqrt_abar * x_t - coefs.sqrt_recip_abar_m1 * eps_pred
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
    mean = coefs.mean_x0 * x0 + coefs.mean_xt * x_t
    if t == 0:
        return mean
    n = _noise_like(x_t, indices, seed, stream, t)
    return mean + coefs.sigma * n


class ReverseCoefficients:
    """Per-timestep scalars of the reverse step, computed in float64 once."""

    __slots__ = ("recip_sqrt_abar", "sqrt_recip_abar_m1", "mean_x0", "mean_xt", "sigma")

    def __init__(self, recip_sqrt_abar, sqrt_recip_abar_m1, mean_x0, mean_xt, sigma):
        self.recip_sqrt_abar = float(recip_sqrt_abar)
        self.sqrt_recip_abar_m1 = float(sqrt_recip_abar_m1)
        self.mean_x0 = float(mean_x0)
        self.mean_xt = float(mean_xt)
        self.sigma = float(sigma)
