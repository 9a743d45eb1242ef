"""DiffPure's continuous-time purification: the VP-SDE of a DDPM, run back from t* by an SDE or ODE solver.

Song et al. (ICLR 2021, "Score-based generative modeling through SDEs", eq. 11) read a DDPM with N
trained timesteps and a linear beta schedule as the variance-preserving SDE

    dx = -beta(t) x / 2 dt + sqrt(beta(t)) dw,   beta(t) = beta_min + t (beta_max - beta_min),  t in [0, 1],

with beta_min = N beta_start and beta_max = N beta_end (0.1 and 20 for the usual 1e-4 .. 0.02 over 1000
steps). Its marginal at t is x_t = sqrt(abar(t)) x_0 + sqrt(1 - abar(t)) n with
abar(t) = exp(-beta_min t - (beta_max - beta_min) t^2 / 2) (their eq. 29). DiffPure (Nie et al., ICML
2022) diffuses an input to t* with that marginal and integrates the reverse-time SDE (Song et al. eq. 6)

    dx = [-beta(t) x / 2 - beta(t) s(x, t)] dt + sqrt(beta(t)) dw_bar

back to t = 0, with the epsilon-model as the score: s(x, t) = -eps(x, t) / sqrt(1 - abar(t)). Or the
probability-flow ODE (Song et al. eq. 13), the same drift with half the score term and no noise.

Both solvers step on an even grid t_i = t* - i dt, i = 0 .. K-1 (DiffPure: dt = 1e-3, K = 100 for
t* = 0.1), evaluating the drift at the step's start (Euler and Euler-Maruyama, as torchsde's "euler"):

    SDE: x <- x + [beta(t) x / 2 + beta(t) s] dt + sqrt(beta(t) dt) n_i
    ODE: x <- x + [beta(t) x / 2 + beta(t) s / 2] dt

The network sees the trained timestep whose abar the continuous t matches: round(t N) - 1 (t = 0.1 is
timestep 99 of 0..999), so on DiffPure's grid every evaluation is at a timestep the UNet was trained on.
Every Gaussian comes from the Philox streams keyed by the samples' global indices: the forward noise at
step 0 of its stream, the SDE's increment n_i at step i of its own, so a sample's path does not depend on
the batch it ran in. The updates are element-wise torch ops (not the fused DDPM kernels: the update is a
different one), so the same function is the differentiable path when the network is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..kernels import philox
from .noise_key import NoiseKey

SOLVERS = ("sde", "ode")
StepCallback = Callable[[int], None]


@dataclass(frozen=True)
class VPSDE:
    """The VP-SDE of a DDPM trained on `num_train_timesteps` steps of a linear beta schedule."""

    beta_start: float = 1e-4
    beta_end: float = 0.02
    num_train_timesteps: int = 1000

    @property
    def beta_min(self) -> float:
        return self.beta_start * self.num_train_timesteps

    @property
    def beta_max(self) -> float:
        return self.beta_end * self.num_train_timesteps

    def beta(self, t: float) -> float:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def alpha_bar(self, t: float) -> float:
        """abar(t) = exp(-int_0^t beta): the signal's share of the variance at t."""
        return math.exp(-self.beta_min * t - 0.5 * (self.beta_max - self.beta_min) * t * t)

    def model_timestep(self, t: float) -> int:
        """The trained timestep (0 .. N-1) at continuous time t: timestep k sits at t = (k + 1) / N."""
        return min(max(round(t * self.num_train_timesteps) - 1, 0), self.num_train_timesteps - 1)


@dataclass(frozen=True)
class DiffPureConfig:
    """One DiffPure purification (published: t* = 0.1, the SDE, dt = 1e-3)."""

    t_star: float = 0.1  # continuous diffusion time, in (0, 1]
    solver: str = "sde"
    steps: int = 100  # solver steps from t* to 0 (dt = t* / steps)
    sde: VPSDE = VPSDE()

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if not 0 < self.t_star <= 1 or self.steps < 1:
            raise ValueError(f"need 0 < t* <= 1 and at least one step, got t*={self.t_star}, steps={self.steps}")

    @property
    def dt(self) -> float:
        return self.t_star / self.steps

    def times(self) -> list[float]:
        """The time at the start of each solver step, from t* down to dt."""
        return [self.t_star - i * self.dt for i in range(self.steps)]


def diffuse(x0: torch.Tensor, cfg: DiffPureConfig, *, key: NoiseKey, stream: int = philox.STREAM_DIFFPURE_FORWARD
            ) -> torch.Tensor:
    """x_{t*} = sqrt(abar(t*)) x0 + sqrt(1 - abar(t*)) n, n from step 0 of the forward stream."""
    abar = cfg.sde.alpha_bar(cfg.t_star)
    n = philox.normal_noise(key.indices, tuple(x0.shape[1:]), seed=key.seed, stream=stream, step=0).to(x0)
    return math.sqrt(abar) * x0 + math.sqrt(1.0 - abar) * n


def score(evaluator, x: torch.Tensor, t: float, sde: VPSDE) -> torch.Tensor:
    """s(x, t) = -eps(x, t) / sqrt(1 - abar(t)), the epsilon-model read as the score of x_t's density."""
    eps = evaluator.epsilon(x, sde.model_timestep(t)).to(x.dtype)
    return -eps / math.sqrt(1.0 - sde.alpha_bar(t))


def reverse_step(x: torch.Tensor, s: torch.Tensor, t: float, dt: float, sde: VPSDE, noise: torch.Tensor | None
                 ) -> torch.Tensor:
    """One step t -> t - dt: the SDE's Euler-Maruyama step with `noise` (standard normal), the ODE's
    Euler step without (noise None)."""
    beta = sde.beta(t)
    if noise is None:
        return x + (0.5 * beta * dt) * (x + s)
    return x + (beta * dt) * (0.5 * x + s) + math.sqrt(beta * dt) * noise


def increment_noise(x: torch.Tensor, key: NoiseKey, step: int, stream: int = philox.STREAM_DIFFPURE_SDE
                    ) -> torch.Tensor:
    """The SDE's standard normal draw of solver step `step` (its Brownian increment over sqrt(dt))."""
    return philox.normal_noise(key.indices, tuple(x.shape[1:]), seed=key.seed, stream=stream, step=step).to(x)


def denoise(x: torch.Tensor, evaluator, cfg: DiffPureConfig, *, key: NoiseKey,
            on_step: StepCallback | None = None) -> torch.Tensor:
    """Integrate the reverse SDE (or the probability-flow ODE) from x at t* down to t = 0."""
    for i, t in enumerate(cfg.times()):
        s = score(evaluator, x, t, cfg.sde)
        noise = increment_noise(x, key, i) if cfg.solver == "sde" else None
        x = reverse_step(x, s, t, cfg.dt, cfg.sde, noise)
        if on_step is not None:
            on_step(1)
    return x


def diffpure(x0: torch.Tensor, evaluator, cfg: DiffPureConfig, *, key: NoiseKey,
             on_step: StepCallback | None = None) -> torch.Tensor:
    """Diffuse model-space images (fp32 NCHW in [-1, 1]) to t* and solve back to 0; clamped to [-1, 1]."""
    x = diffuse(x0.to(torch.float32), cfg, key=key)
    return denoise(x, evaluator, cfg, key=key, on_step=on_step).clamp(-1.0, 1.0)
