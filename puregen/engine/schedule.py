"""The DDPM noise schedule (linear betas, fixed_small posterior variance)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..kernels.reference import ReverseCoefficients


@dataclass(frozen=True)
class DDPMSchedule:
    beta_start: float = 1e-4
    beta_end: float = 0.02
    num_train_timesteps: int = 1000

    @cached_property
    def betas(self) -> np.ndarray:
        return np.linspace(self.beta_start, self.beta_end, self.num_train_timesteps, dtype=np.float64)

    @cached_property
    def alphas_cumprod(self) -> np.ndarray:
        return np.cumprod(1.0 - self.betas)

    def check_t_star(self, t_star: int) -> None:
        if not 1 <= t_star <= self.num_train_timesteps:
            raise ValueError(f"t* must be in [1, {self.num_train_timesteps}], got {t_star}")

    def forward_coefficients(self, t_star: int) -> tuple[float, float]:
        """(sqrt(abar), sqrt(1-abar)) at index t*-1, where purification starts."""
        self.check_t_star(t_star)
        abar = self.alphas_cumprod[t_star - 1]
        return math.sqrt(abar), math.sqrt(1.0 - abar)

    def reverse_coefficients(self, t: int) -> ReverseCoefficients:
        abar = self.alphas_cumprod[t]
        abar_prev = self.alphas_cumprod[t - 1] if t > 0 else 1.0
        beta = self.betas[t]
        variance = beta * (1.0 - abar_prev) / (1.0 - abar)
        return ReverseCoefficients(
            recip_sqrt_abar=1.0 / math.sqrt(abar),
            sqrt_recip_abar_m1=math.sqrt(1.0 / abar - 1.0),
            mean_x0=beta * math.sqrt(abar_prev) / (1.0 - abar),
            mean_xt=(1.0 - abar_prev) * math.sqrt(1.0 - beta) / (1.0 - abar),
            sigma=math.sqrt(max(variance, 0.0)),
        )
