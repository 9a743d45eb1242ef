"""The guided reverse process of GDMP (Wang et al. 2022, "Guided diffusion model for adversarial purification").

The input is diffused to t* and denoised by the DDPM's ancestral steps, and every step's mean is pulled
toward the input itself (eq. 8 of the paper): with x_adv_t the input diffused to step t with fresh noise,

    x_{t-1} = mu_theta(x_t, t) + Sigma_t * s_t * grad_{x_t} D(x_t, x_adv_t) + sigma_t n,

where Sigma_t = sigma_t^2 is the step's (fixed small) variance, D a similarity (the negative MSE or SSIM),
and the scale follows the noise level and the attack's budget (their section 3.3):

    s_t = sqrt(1 - abar_t) / (m sqrt(abar_t)),   m = (2 eps / 3) / guide_scale,  eps in [0, 1] pixel units.

Two choices differ from the authors' code, both for the noise contract (a sample's result may not depend
on its batch):

* D is computed per sample (the mean over that sample's pixels), not over the batch: `F.mse_loss` over a
  batch of B scales each sample's guidance by 1/B. The default scale, 600, is the authors' CIFAR-10 value
  (60,000 over a batch of 100) read per sample.
* x_adv_t's noise is drawn from its own Philox stream at step t, keyed by the sample's index.

Since the guidance is an addition to each step's output, the process is the DDPM method's `diffuse_denoise`
with a `guide` term (the fused kernels on the purification path; the torch reference on the differentiable
one), with its forward and reverse noise streams: at guide_scale -> 0 this is the `ddpm` method's
purification, draw for draw.

SSIM is the usual one (Wang et al. 2004): an 11x11 Gaussian window of sigma 1.5 per channel, on images
mapped to [0, 1], C1 = 0.01^2, C2 = 0.03^2, averaged over the sample's pixels.

Adversarial guidance (Lin et al., arXiv 2403.16067) measures the distance in the feature space of an
auxiliary, adversarially trained network instead of in pixels: D = -mean_j (phi(x_t)_j - phi(x_adv_t)_j)^2
per sample, phi the network's penultimate layer (in eval mode, so per sample). A robust network's features
barely move under the attack's perturbation, so the pull keeps what the input shows without pulling the
perturbation back in, as the pixel distance does. The paper gives only this outline; the choices here
(penultimate features, the same per-sample mean and the same GDMP scale rule) are written down in
docs/adversarial-purification.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels import philox
from .noise_key import NoiseKey
from .samplers import DiffusionConfig, StepCallback, diffuse_denoise
from .schedule import DDPMSchedule

GUIDE_MODES = ("mse", "ssim", "adversarial")


@dataclass(frozen=True)
class GuidanceConfig:
    mode: str = "mse"
    scale: float = 600.0  # guide_scale
    budget: float = 8 / 255  # the attack budget eps the scale is written against, [0, 1] pixel units

    def __post_init__(self):
        if self.mode not in GUIDE_MODES:
            raise ValueError(f"guidance mode must be one of {GUIDE_MODES}, got {self.mode!r}")

    @property
    def m(self) -> float:
        return (2 * self.budget / 3) / self.scale

    def step_scale(self, abar: float) -> float:
        """s_t for a step at abar_t."""
        return math.sqrt(1 - abar) / (self.m * math.sqrt(abar))


def _gaussian_window(channels: int, size: int = 11, sigma: float = 1.5, device=None) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float32, device=device) - size // 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim_per_sample(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SSIM of each sample of x against the same sample of y (model space [-1, 1], NCHW): shape (B,)."""
    x, y = (x + 1) / 2, (y + 1) / 2
    c = x.shape[1]
    w = _gaussian_window(c, device=x.device).to(x.dtype)
    pad = w.shape[-1] // 2

    def blur(z):
        return F.conv2d(z, w, padding=pad, groups=c)

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def feature_similarity(features, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """-mean_j (phi(x)_j - phi(y)_j)^2 per sample, phi = `features` (a FeatureExtractor in eval mode): (B,)."""
    return -((features(x).float() - features(y).float()) ** 2).flatten(1).mean(1)


def similarity_gradient(x: torch.Tensor, target: torch.Tensor, mode: str, *, create_graph: bool = False,
                        features=None) -> torch.Tensor:
    """grad_x D(x, target) per sample. MSE in closed form (-2 (x - target) / pixels); SSIM and the feature
    distance (`features`: the auxiliary network) by autograd, with `create_graph` for a caller that
    differentiates through the guidance (a double backward)."""
    if mode == "mse":
        return -2.0 * (x - target) / x[0].numel()
    with torch.enable_grad():
        x_in = x if create_graph and x.requires_grad else x.detach().requires_grad_(True)
        if mode == "ssim":
            d = ssim_per_sample(x_in, target)
        else:
            if features is None:
                raise ValueError("adversarial guidance needs the auxiliary network's features")
            d = feature_similarity(features, x_in, target if create_graph else target.detach())
        (grad,) = torch.autograd.grad(d.sum(), x_in, create_graph=create_graph)
    return grad


def guided_diffuse_denoise(
    x0: torch.Tensor,
    evaluator,
    cfg: DiffusionConfig,
    guidance: GuidanceConfig,
    *,
    key: NoiseKey,
    on_step: StepCallback | None = None,
    kernels=None,
    differentiable: bool = False,
    features=None,
) -> torch.Tensor:
    """GDMP's guided purification of model-space images (fp32 NCHW in [-1, 1]), guided toward x0 itself.

    `kernels`: the DDPM steps' implementation (default: the device's fused kernels; the torch reference for
    the differentiable path). `differentiable`: the guidance gradient keeps its graph (a double backward).
    `features`: the auxiliary network of adversarial guidance."""
    schedule = DDPMSchedule(cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps)
    x0 = x0.to(torch.float32)

    def guide(x, t, t_prev, coefs):
        if t_prev < 0:  # the last step has no variance, so no guidance
            return None
        abar = float(schedule.alphas_cumprod[t])
        n = philox.normal_noise(key.indices, tuple(x0.shape[1:]), seed=key.seed, stream=philox.STREAM_GUIDED_TARGET,
                                step=t).to(x0)
        target = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * n
        grad = similarity_gradient(x, target, guidance.mode, create_graph=differentiable, features=features)
        return (coefs.sigma**2 * guidance.step_scale(abar)) * grad

    return diffuse_denoise(x0, evaluator, cfg, key=key, on_step=on_step, kernels=kernels, guide=guide)
