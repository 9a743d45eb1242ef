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

    def reverse_timesteps(self, t_star: int, steps: int | None = None) -> list[int]:
        """The timesteps the reverse process visits, from t*-1 down to 0.

        `steps` < t* keeps that many, evenly spaced (rounded), always including
        t*-1 and 0; the steps between them are skipped, not approximated.
        """
        self.check_t_star(t_star)
        if steps is None or steps >= t_star:
            return list(range(t_star - 1, -1, -1))
        if steps < 1:
            raise ValueError(f"reverse steps must be >= 1, got {steps}")
        if steps == 1:
            return [t_star - 1]
        kept = np.unique(np.rint(np.linspace(0, t_star - 1, steps)).astype(np.int64))
        return [int(t) for t in kept[::-1]]

    def reverse_coefficients(self, t: int, t_prev: int | None = None) -> ReverseCoefficients:
        """Coefficients of the step t -> t_prev (default t-1; -1 means the clean image).

        A respaced step t -> t_prev uses the beta that takes abar[t_prev] to abar[t]. For t_prev = t-1
        that is betas[t]; it is taken from the table so that unrespaced runs keep their exact bits.
        """
        t_prev = t - 1 if t_prev is None else t_prev
        abar = self.alphas_cumprod[t]
        abar_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else 1.0
        beta = self.betas[t] if t_prev == t - 1 else 1.0 - abar / abar_prev
        variance = beta * (1.0 - abar_prev) / (1.0 - abar)
        return ReverseCoefficients(
            recip_sqrt_abar=1.0 / math.sqrt(abar),
            sqrt_recip_abar_m1=math.sqrt(1.0 / abar - 1.0),
            mean_x0=beta * math.sqrt(abar_prev) / (1.0 - abar),
            mean_xt=(1.0 - abar_prev) * math.sqrt(1.0 - beta) / (1.0 - abar),
            sigma=math.sqrt(max(variance, 0.0)),
        )
