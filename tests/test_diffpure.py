"""`diffpure`: the reverse VP-SDE / probability-flow ODE solver against torchsde on the same Brownian path, its
defining property on a Gaussian whose score is exact, and the method through the engine (batch invariance,
the differentiable path, its options)."""

import math

import numpy as np
import pytest
import torch

from puregen.engine.noise_key import NoiseKey
from puregen.engine.vpsde import VPSDE, DiffPureConfig, denoise, diffpure, diffuse, increment_noise
from puregen.errors import InputError
from puregen.models.unet import UNet2D
from puregen.models.unet_config import UNetConfig


def _random(shape, seed):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


class _WigglyEpsilon:
    """A non-linear, timestep-dependent stand-in for the UNet (the solver only needs epsilon(x, t))."""

    def epsilon(self, x, t):
        return torch.tanh(0.8 * x + 0.3) * (1 + t / 500) - 0.1 * x.roll(1, dims=-1)


class _ExactGaussianEpsilon:
    """The exact epsilon of data N(mu, sigma^2) per pixel under the VP-SDE, at the time of trained timestep k."""

    def __init__(self, sde: VPSDE, mu: float, sigma: float):
        self.sde, self.mu, self.sigma = sde, mu, sigma

    def epsilon(self, x, k):
        abar = self.sde.alpha_bar((k + 1) / self.sde.num_train_timesteps)
        # x_t ~ N(sqrt(abar) mu, abar sigma^2 + 1 - abar): score -(x - sqrt(abar) mu) / var, eps = -sqrt(1-abar) score
        var = abar * self.sigma**2 + 1 - abar
        return math.sqrt(1 - abar) * (x - math.sqrt(abar) * self.mu) / var


def test_the_vpsde_is_the_ddpm_schedule_in_continuous_time():
    from puregen.engine.schedule import DDPMSchedule

    sde, schedule = VPSDE(), DDPMSchedule()
    assert (sde.beta_min, sde.beta_max) == (pytest.approx(0.1), pytest.approx(20.0))
    for k in (0, 9, 99, 249):
        # abar of trained timestep k against the continuous marginal at t = (k + 1) / N: the product of (1 - beta)
        # and the exponential of the integral, over a grid of 999 or 1000 intervals (measured: 8.2e-4 relative at
        # k = 99). DiffPure reads the discrete model with the continuous abar in the same way.
        assert sde.alpha_bar((k + 1) / 1000) == pytest.approx(schedule.alphas_cumprod[k], rel=1e-3)
        assert sde.model_timestep((k + 1) / 1000) == k
    assert sde.model_timestep(1e-5) == 0 and sde.model_timestep(1.0) == 999
    cfg = DiffPureConfig()
    assert cfg.steps == 100 and cfg.dt == pytest.approx(1e-3) and cfg.times()[0] == 0.1


class _PathBrownian:
    """torchsde's Brownian motion given by our Philox increments on the solver's grid (reversed time tau = -t)."""

    def __init__(self, x, key, cfg):
        import torchsde

        class Path(torchsde.BrownianInterval.__mro__[1]):  # torchsde's BaseBrownian
            __slots__ = ()

            def __call__(_, ta, tb=None, return_U=False, return_A=False):
                i = round((float(ta) + cfg.t_star) / cfg.dt)
                assert tb is not None and abs((float(tb) - float(ta)) - cfg.dt) < 1e-9, (ta, tb)
                return math.sqrt(cfg.dt) * increment_noise(x.double(), key, i).flatten(1)

            def __repr__(_):
                return "PathBrownian"

            dtype = property(lambda _: torch.float64)
            device = property(lambda _: x.device)
            shape = property(lambda _: (x.shape[0], x[0].numel()))
            levy_area_approximation = property(lambda _: "none")

        self.bm = Path()


@pytest.mark.parametrize("solver", ["sde", "ode"])
def test_the_solver_is_torchsdes_euler_on_the_same_brownian_path(solver):
    import torchsde
    cfg = DiffPureConfig(t_star=0.05, solver=solver, steps=25)
    x = _random((3, 1, 6, 5), 0) * 0.8
    key = NoiseKey.of(5, torch.tensor([7, 2, 40]))
    net, shape = _WigglyEpsilon(), x.shape
    ours = denoise(x.double(), net, cfg, key=key)

    class ReverseSDE(torch.nn.Module):
        # Reverse time tau = -t runs forward: dx = [beta x / 2 + beta s] dtau + sqrt(beta) dW (eq. 6 of Song et al.).
        noise_type, sde_type = "diagonal", "ito"

        def f(self, tau, y):
            t = -float(tau)
            eps = net.epsilon(y.reshape(shape), cfg.sde.model_timestep(t)).flatten(1)
            s = -eps / math.sqrt(1 - cfg.sde.alpha_bar(t))
            beta = cfg.sde.beta(t)
            return beta * (0.5 * y + (s if solver == "sde" else 0.5 * s))

        def g(self, tau, y):
            return torch.full_like(y, math.sqrt(cfg.sde.beta(-float(tau))) if solver == "sde" else 0.0)

    taus = torch.tensor([-cfg.t_star, 0.0], dtype=torch.float64)
    ref = torchsde.sdeint(ReverseSDE(), x.double().flatten(1), taus, method="euler", dt=cfg.dt,
                          bm=_PathBrownian(x, key, cfg).bm)[-1].reshape(shape)
    # float64 on both sides; the grids' times agree to rounding (torchsde accumulates tau += dt).
    assert (ours - ref).abs().max() < 1e-9, (ours - ref).abs().max()


@pytest.mark.parametrize("solver", ["sde", "ode"])
def test_with_the_exact_score_both_solvers_bring_back_the_gaussian(solver):
    """From t = 1 (almost pure noise: abar = 4e-5) back to 0 with the exact score: N(mu, sigma^2) again."""
    sde, mu, sigma = VPSDE(), 0.3, 0.2
    n = 64
    x0 = mu + sigma * torch.randn((n, 1, 32, 32), generator=torch.Generator().manual_seed(1))
    cfg = DiffPureConfig(t_star=1.0, solver=solver, steps=1000)
    key = NoiseKey.rows(3, 0, n)
    xt = diffuse(x0, cfg, key=key)
    assert abs(float(xt.mean())) < 0.02 and abs(float(xt.std()) - 1) < 0.02  # t = 1 forgets the data
    out = denoise(xt, _ExactGaussianEpsilon(sde, mu, sigma), cfg, key=key)
    # 65,536 values: the sample mean's standard error is sigma / 256 = 8e-4, and Euler at dt = 1e-3 adds a bias
    # (measured, both solvers and both depths: mean off by at most 1.5e-3, std by at most 0.4%).
    assert abs(float(out.mean()) - mu) < 5e-3, float(out.mean())
    assert abs(float(out.std()) / sigma - 1) < 0.02, float(out.std())
    # And the purification's own setting: from data at t* = 0.1, the samples stay N(mu, sigma^2).
    short = diffpure(x0, _ExactGaussianEpsilon(sde, mu, sigma), DiffPureConfig(solver=solver), key=key)
    assert abs(float(short.mean()) - mu) < 5e-3 and abs(float(short.std()) / sigma - 1) < 0.02


def test_a_wrong_score_does_not_bring_it_back():
    """The Gaussian check can fail: a score for the wrong mean leaves the samples at that mean."""
    sde = VPSDE()
    x0 = 0.3 + 0.2 * torch.randn((16, 1, 32, 32), generator=torch.Generator().manual_seed(2))
    cfg = DiffPureConfig(t_star=1.0, steps=1000)
    key = NoiseKey.rows(4, 0, 16)
    out = denoise(diffuse(x0, cfg, key=key), _ExactGaussianEpsilon(sde, -0.3, 0.2), cfg, key=key)
    assert abs(float(out.mean()) + 0.3) < 0.02


def _tiny_purifier(**options):
    from puregen.api import load_purifier

    torch.manual_seed(0)
    unet = UNet2D(UNetConfig.tiny(in_channels=1, sample_size=16))
    return load_purifier("diffpure", ddpm=unet, preset="tiny", micro_batch=4, threads=2, **options)


@pytest.mark.parametrize("solver", ["sde", "ode"])
def test_diffpure_through_the_engine_is_batch_invariant_and_its_float_path_is_the_purification(solver):
    p = _tiny_purifier(solver=solver, t_star=6)
    images = np.random.default_rng(0).integers(0, 256, (7, 16, 16, 1), dtype=np.uint8)
    whole = p.purify(images, seed=3)
    parts = np.concatenate([p.purify(images[:3], seed=3), p.purify(images[3:], seed=3, offset=3)])
    assert np.array_equal(whole, parts)
    assert not np.array_equal(whole, images)
    x = _random((3, 1, 16, 16), 9) * 0.5
    key = NoiseKey.of(11, torch.tensor([4, 0, 9]))
    engine = diffpure(x, p.evaluator, p.config.vpsde(), key=key)
    x_var = x.clone().requires_grad_(True)
    out = p.purify_differentiable(x_var, key)
    assert (out.detach() - engine).abs().max() < 1e-5  # fp32, the same UNet eagerly on micro-batches vs whole
    (grad,) = torch.autograd.grad((out * _random(tuple(out.shape), 10)).sum(), x_var)
    assert grad.abs().sum() > 0
    if solver == "ode":  # deterministic after the diffusion: the same key gives the same output
        assert torch.equal(p.purify_differentiable(x, key), out.detach())


def test_diffpure_options_are_checked():
    with pytest.raises(InputError, match="--solver"):
        _tiny_purifier(solver="heun")
    with pytest.raises(InputError, match="--reverse-steps"):
        _tiny_purifier(t_star=5, reverse_steps=6)
    p = _tiny_purifier(t_star=8, reverse_steps=4)
    cfg = p.config.vpsde()
    assert cfg.t_star == pytest.approx(0.008) and cfg.steps == 4 and p.algorithm.network_evaluations() == 4
