"""One step of each purifier against an independent float64 computation of the published formulas."""

import math

import numpy as np
import pytest
import torch

from puregen.engine.noise_key import NoiseKey
from puregen.engine.samplers import DiffusionConfig, LangevinConfig
from puregen.backends.torch_backend import TorchBackend
from puregen.engine.samplers import diffuse_denoise, langevin
from puregen.kernels import philox
from puregen.models.ebm import EBM, EBMConfig
from puregen.models.unet import UNet2D
from puregen.models.unet_config import UNetConfig


def _random_images(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) * 1.8 - 0.9


@pytest.mark.parametrize("nf,side", [(32, 16), (128, 32)], ids=["small", "paper"])
def test_one_langevin_step_matches_float64_formula(nf, side):
    torch.manual_seed(0)
    ebm = EBM(EBMConfig(in_channels=3, nf=nf))
    x = _random_images((5, 3, side, side), 1)
    idx = torch.tensor([3, 9, 0, 41, 7])
    cfg = LangevinConfig()  # published eps=1.25e-2, temp=1e-4
    out = langevin(x, TorchBackend(ebm, micro_batch=4), cfg, steps=1, key=NoiseKey.of(123, idx))

    ebm64 = EBM(ebm.config).double()
    ebm64.load_state_dict(ebm.state_dict())
    x64 = x.double().requires_grad_(True)
    # x <- x - eps^2/2 * grad_x[G(x)/temp] + eps * n, all in float64
    (g,) = torch.autograd.grad((ebm64(x64) / 1e-4).sum(), x64)
    n = philox.normal_noise(idx, (3, side, side), seed=123, stream=philox.STREAM_EBM, step=0).double()
    ref = x.double() - (1.25e-2**2 / 2) * g + 1.25e-2 * n
    err = (out.double() - ref).abs().max().item()
    drift = ((1.25e-2**2 / 2) * g).abs().max().item()
    assert drift > 1e-6, "the test needs a non-trivial gradient"
    print(f"\none Langevin step: max abs error vs float64 = {err:.3e} (drift term up to {drift:.3e})")
    assert err < 2e-6, err  # fp32 state and gradient vs float64: a few fp32 ulp of values ~1


def _float64_schedule():
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    return betas, np.cumprod(1 - betas)


@pytest.mark.parametrize("arch", ["tiny", "paper"])
def test_forward_noising_and_one_reverse_step_match_float64_formulas(arch):
    torch.manual_seed(0)
    config = UNetConfig.tiny(in_channels=1, sample_size=28) if arch == "tiny" else UNetConfig.paper()
    unet = UNet2D(config)
    shape = (1, 28, 28) if arch == "tiny" else (3, 32, 32)
    x0 = _random_images((3, *shape), 2)
    idx = torch.tensor([5, 1, 8])
    t_star, seed = 1 + 1, 77  # noise to index 1, then reverse steps t=1 and t=0
    cfg = DiffusionConfig(t_star=t_star)
    ev = TorchBackend(unet=unet, micro_batch=4)

    # Reference in float64 from the DDPM paper's formulas.
    betas, abar = _float64_schedule()
    n_fwd = philox.normal_noise(idx, shape, seed=seed, stream=philox.STREAM_DDPM_FORWARD, step=0).double()
    x_t = math.sqrt(abar[t_star - 1]) * x0.double() + math.sqrt(1 - abar[t_star - 1]) * n_fwd
    unet64 = UNet2D(unet.config).double().eval()
    unet64.load_state_dict(unet.state_dict())
    for t in (1, 0):
        with torch.no_grad():
            eps = unet64(x_t, torch.full((3,), t))
        x0_hat = ((x_t - math.sqrt(1 - abar[t]) * eps) / math.sqrt(abar[t])).clamp(-1, 1)
        abar_prev = abar[t - 1] if t > 0 else 1.0
        mean = (math.sqrt(abar_prev) * betas[t] / (1 - abar[t])) * x0_hat + (
            math.sqrt(1 - betas[t]) * (1 - abar_prev) / (1 - abar[t])
        ) * x_t
        var = (1 - abar_prev) / (1 - abar[t]) * betas[t]  # fixed_small
        n = philox.normal_noise(idx, shape, seed=seed, stream=philox.STREAM_DDPM_REVERSE, step=t).double()
        x_t = mean + (math.sqrt(var) * n if t > 0 else 0)

    out = diffuse_denoise(x0, ev, cfg, key=NoiseKey.of(seed, idx))
    err = (out.double() - x_t).abs().max().item()
    print(f"\nforward noising + reverse steps t=1,0: max abs error vs float64 = {err:.3e}")
    assert err < 1e-5, err  # fp32 UNet and state vs float64 over two steps


def test_respaced_reverse_process_matches_float64_formula():
    """t* = 10 run in 4 of its timesteps (9, 6, 3, 0): each step's beta takes abar[t_prev] to abar[t]."""
    torch.manual_seed(0)
    unet = UNet2D(UNetConfig.tiny(in_channels=1, sample_size=28))
    shape = (1, 28, 28)
    x0 = _random_images((3, *shape), 6)
    idx = torch.tensor([2, 0, 7])
    t_star, seed = 10, 5
    cfg = DiffusionConfig(t_star=t_star, reverse_steps=4)
    from puregen.engine.schedule import DDPMSchedule

    kept = DDPMSchedule().reverse_timesteps(t_star, 4)
    assert kept == [9, 6, 3, 0]

    _, abar = _float64_schedule()
    n_fwd = philox.normal_noise(idx, shape, seed=seed, stream=philox.STREAM_DDPM_FORWARD, step=0).double()
    x_t = math.sqrt(abar[t_star - 1]) * x0.double() + math.sqrt(1 - abar[t_star - 1]) * n_fwd
    unet64 = UNet2D(unet.config).double().eval()
    unet64.load_state_dict(unet.state_dict())
    for t, t_prev in zip(kept, kept[1:] + [-1]):
        with torch.no_grad():
            eps = unet64(x_t, torch.full((3,), t))
        x0_hat = ((x_t - math.sqrt(1 - abar[t]) * eps) / math.sqrt(abar[t])).clamp(-1, 1)
        abar_prev = abar[t_prev] if t_prev >= 0 else 1.0
        beta = 1 - abar[t] / abar_prev
        mean = (math.sqrt(abar_prev) * beta / (1 - abar[t])) * x0_hat + (
            math.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar[t])) * x_t
        var = (1 - abar_prev) / (1 - abar[t]) * beta
        n = philox.normal_noise(idx, shape, seed=seed, stream=philox.STREAM_DDPM_REVERSE, step=t).double()
        x_t = mean + (math.sqrt(var) * n if t_prev >= 0 else 0)

    ev = TorchBackend(unet=unet, micro_batch=4)
    out = diffuse_denoise(x0, ev, cfg, key=NoiseKey.of(seed, idx))
    err = (out.double() - x_t).abs().max().item()
    assert err < 1e-5, err  # fp32 UNet and state vs float64 over four steps
    # All t* steps, asked for explicitly, are the unrespaced run bit for bit.
    full = diffuse_denoise(x0, ev, DiffusionConfig(t_star=t_star), key=NoiseKey.of(seed, idx))
    same = diffuse_denoise(x0, ev, DiffusionConfig(t_star=t_star, reverse_steps=t_star), key=NoiseKey.of(seed, idx))
    assert torch.equal(full, same)
    assert not torch.equal(full, out)


def test_reverse_timesteps_are_spread_over_t_star():
    from puregen.engine.schedule import DDPMSchedule

    s = DDPMSchedule()
    assert s.reverse_timesteps(75, None) == list(range(74, -1, -1))
    assert s.reverse_timesteps(75, 200) == list(range(74, -1, -1))
    kept = s.reverse_timesteps(75, 15)
    assert len(kept) == 15 and kept[0] == 74 and kept[-1] == 0 and kept == sorted(kept, reverse=True)
    assert s.reverse_timesteps(75, 1) == [74]
    with pytest.raises(ValueError):
        s.reverse_timesteps(75, 0)


def test_reverse_step_at_zero_matches_diffusers_scheduler():
    from diffusers import DDPMScheduler

    from puregen.engine.schedule import DDPMSchedule
    from puregen.kernels.reference import ddpm_reverse_step

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                          variance_type="fixed_small", clip_sample=True, prediction_type="epsilon")
    g = torch.Generator().manual_seed(3)
    x_t = torch.randn(2, 3, 8, 8, generator=g)
    eps = torch.randn(2, 3, 8, 8, generator=g)
    ref = sched.step(eps, 0, x_t).prev_sample  # t=0 adds no noise
    ours = ddpm_reverse_step(x_t, eps, t=0, coefs=DDPMSchedule().reverse_coefficients(0),
                             indices=torch.arange(2), seed=0, stream=philox.STREAM_DDPM_REVERSE)
    assert (ours - ref).abs().max() < 1e-5  # both fp32
    for t in (10, 500):  # the posterior std matches diffusers' fixed_small variance
        ours_sigma = DDPMSchedule().reverse_coefficients(t).sigma
        # diffusers builds its schedule in float32, ours in float64: agreement to ~1e-6 relative
        assert abs(ours_sigma - sched._get_variance(t).sqrt().item()) < 1e-5


def test_unet_sides_not_divisible_are_reflect_padded_and_cropped():
    torch.manual_seed(0)
    unet = UNet2D(UNetConfig.tiny(in_channels=1, sample_size=28))  # sides must be multiples of 4
    ev = TorchBackend(unet=unet, micro_batch=4)
    x = _random_images((3, 1, 30, 29), 4)
    eps = ev.epsilon(x, 10)
    assert eps.shape == x.shape
    padded = torch.nn.functional.pad(x, (0, 3, 0, 2), mode="reflect")
    with torch.no_grad():
        ref = unet(padded, torch.full((3,), 10))[..., :30, :29]
    # same computation; the engine's padded micro-batch of 4 may pick another conv algorithm than batch 3
    assert (eps - ref).abs().max() < 1e-5


def test_parameter_gradients_are_never_computed():
    torch.manual_seed(0)
    ebm = EBM(EBMConfig(in_channels=1, nf=8))
    unet = UNet2D(UNetConfig.tiny(in_channels=1, sample_size=28))
    ev = TorchBackend(ebm, unet, micro_batch=4)
    x = _random_images((2, 1, 28, 28), 5)
    langevin(x, ev, LangevinConfig(steps=2), key=NoiseKey.of(0, torch.arange(2)))
    diffuse_denoise(x, ev, DiffusionConfig(t_star=2), key=NoiseKey.of(0, torch.arange(2)))
    for model in (ebm, unet):
        for name, p in model.named_parameters():
            assert not p.requires_grad and p.grad is None, name


@pytest.mark.parametrize("cfg,side", [(EBMConfig.paper(), 32), (EBMConfig.tiny(), 28)])
def test_ebm_flop_count_matches_torch_counter(cfg, side):
    from torch.utils.flop_counter import FlopCounterMode

    from puregen.bench.flops import count_ebm_flops

    model = EBM(cfg)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.rand(1, cfg.in_channels, side, side))
    assert counter.get_total_flops() == count_ebm_flops(cfg, side, side)


def test_a_lower_langevin_temperature_equals_a_proportionally_larger_energy():
    """`temp` divides the energy: halving it must purify exactly as the same EBM with its energy doubled."""
    from puregen.api import load_purifier
    from puregen.methods import configure
    from puregen.errors import InputError

    torch.manual_seed(0)
    ebm = EBM(EBMConfig(in_channels=1, nf=8))
    doubled = EBM(ebm.config)
    doubled.load_state_dict({k: v * 2 if k == "l5.weight" else v for k, v in ebm.state_dict().items()})
    images = (_random_images((6, 1, 16, 16), 3).permute(0, 2, 3, 1) * 127.5 + 127.5).round().to(torch.uint8).numpy()
    cooler = load_purifier("ebm", ebm=ebm, preset="paper", steps=20, temp=5e-5).purify(images, seed=4)
    scaled = load_purifier("ebm", ebm=doubled, preset="paper", steps=20).purify(images, seed=4)
    published = load_purifier("ebm", ebm=ebm, preset="paper", steps=20).purify(images, seed=4)
    # Doubling the last layer doubles grad G exactly (a power of two), and 5e-5 is exactly half of 1e-4 in
    # binary: the fp32 updates are bit for bit the same, so exact equality is the tolerance.
    assert np.array_equal(cooler, scaled)
    assert not np.array_equal(cooler, published), "a temperature must change the purification"
    for bad in (0.0, -1e-4, float("nan"), float("inf")):
        with pytest.raises(InputError, match="--temp"):
            configure("ebm", temp=bad)
    assert configure("reps", temp=2e-4).config.langevin().temp == 2e-4  # every EBM stage reads the same option


def test_the_differentiable_ddpm_path_is_the_purification_and_its_gradient_is_the_derivative():
    """ddpm's float path: the bytes' dynamics (within the kernels' few-ulp noise difference) and a true gradient."""
    from puregen.errors import InputError
    from puregen.api import load_purifier

    torch.manual_seed(0)
    unet = UNet2D(UNetConfig.tiny(in_channels=1, sample_size=16))
    p = load_purifier("ddpm", ddpm=unet, preset="tiny", t_star=3, micro_batch=4, threads=2)
    x = _random_images((3, 1, 16, 16), 9) * 0.5  # inside (-0.5, 0.5): no clamp kink within the difference step
    key = NoiseKey.of(11, torch.tensor([4, 0, 9]))
    fused = diffuse_denoise(x, p.evaluator, p.config.diffusion(), key=key)
    x_var = x.clone().requires_grad_(True)
    out = p.purify_differentiable(x_var, key)
    assert (out.detach() - fused).abs().max() < 1e-5  # fp32 (measured 9e-8): native vs reference Gaussians, micro-batches
    weights = _random_images(tuple(out.shape), 10)
    (grad,) = torch.autograd.grad((out * weights).sum(), x_var)
    assert grad.abs().sum() > 0
    direction = _random_images(tuple(x.shape), 12)
    h = 1e-2

    def loss(z):
        with torch.no_grad():
            return float((p.purify_differentiable(z, key) * weights).sum())

    numeric = (loss(x + h * direction) - loss(x - h * direction)) / (2 * h)
    analytic = float((grad * direction).sum())
    print(f"\ndirectional derivative: autograd {analytic:.6f}, central difference {numeric:.6f}; "
          f"max |float path - fused| = {(out.detach() - fused).abs().max():.2e}")
    assert abs(numeric - analytic) <= 2e-3 * abs(analytic), (numeric, analytic)  # fp32 central difference (2e-4 seen)
    # A fresh key is a fresh sample of the noise; another method has no float path.
    assert not torch.equal(p.purify_differentiable(x, NoiseKey.of(12, torch.tensor([4, 0, 9]))), out.detach())
    with pytest.raises(InputError, match="no differentiable path"):
        load_purifier("jpeg").purify_differentiable(x, key)
