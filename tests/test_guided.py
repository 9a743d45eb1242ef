"""`guided`: GDMP's guided reverse process. Its guidance gradients against autograd, per sample; with the
guidance scale at 0 it is the `ddpm` method draw for draw; a larger scale keeps the output closer to the input;
through the engine it is batch-invariant and its float path (with the guidance's double backward) is the
purification with a true gradient."""

import numpy as np
import pytest
import torch

from puregen.engine.guided import GuidanceConfig, similarity_gradient, ssim_per_sample
from puregen.engine.noise_key import NoiseKey
from puregen.errors import InputError
from puregen.models.unet import UNet2D
from puregen.models.unet_config import UNetConfig


def _random(shape, seed):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_the_guidance_gradients_are_per_sample_and_match_autograd():
    x, y = _random((4, 3, 12, 12), 0), _random((4, 3, 12, 12), 1)
    xv = x.clone().requires_grad_(True)
    (want,) = torch.autograd.grad((-((xv - y) ** 2).flatten(1).mean(1)).sum(), xv)
    assert torch.allclose(similarity_gradient(x, y, "mse"), want, atol=1e-7)  # closed form, fp32 rounding
    assert torch.allclose(ssim_per_sample(x, x), torch.ones(4), atol=1e-5)  # SSIM(x, x) = 1 (fp32 blur rounding)
    assert (ssim_per_sample(x, y) < 0.5).all()  # independent noise images are dissimilar
    # Per sample: a sample's SSIM and its gradient do not depend on the other samples of the batch.
    alone = similarity_gradient(x[2:3], y[2:3], "ssim")
    assert torch.allclose(similarity_gradient(x, y, "ssim")[2:3], alone, atol=1e-7)
    assert torch.allclose(ssim_per_sample(x, y)[1:2], ssim_per_sample(x[1:2], y[1:2]), atol=1e-7)
    assert alone.abs().sum() > 0
    # The GDMP scale: s_t = sqrt(1 - abar) / (m sqrt(abar)), m = (2 eps / 3) / scale.
    g = GuidanceConfig(scale=600.0, budget=8 / 255)
    assert g.m == pytest.approx(16 / 765 / 600) and g.step_scale(0.64) == pytest.approx(0.6 / (g.m * 0.8))


def _tiny(method="guided", **options):
    from puregen.api import load_purifier

    torch.manual_seed(0)
    unet = UNet2D(UNetConfig.tiny(in_channels=1, sample_size=16))
    return load_purifier(method, ddpm=unet, preset="tiny", micro_batch=4, threads=2, **options)


def test_no_guidance_is_the_ddpm_method_and_more_guidance_stays_closer_to_the_input():
    images = np.random.default_rng(1).integers(0, 256, (6, 16, 16, 1), dtype=np.uint8)
    ddpm = _tiny("ddpm", t_star=8).purify(images, seed=2)
    assert np.array_equal(_tiny(t_star=8, guide_scale=1e-12).purify(images, seed=2), ddpm)
    distances = []
    for scale in (1e-12, 3000.0, 30000.0):
        out = _tiny(t_star=8, guide_scale=scale).purify(images, seed=2)
        distances.append(float(np.abs(out.astype(np.float64) - images).mean()))
    print("\nmean |output - input| at guide scales 0, 3000, 30000:", distances)
    assert distances[0] > distances[1] > distances[2], distances


@pytest.mark.parametrize("mode", ["mse", "ssim"])
def test_guided_through_the_engine_is_batch_invariant_and_its_float_path_has_a_true_gradient(mode):
    from puregen.engine.guided import guided_diffuse_denoise
    from puregen.engine.samplers import DifferentiableEpsilon
    from puregen.kernels import reference

    p = _tiny(t_star=6, guide_mode=mode, guide_scale=30000.0)
    images = np.random.default_rng(0).integers(0, 256, (7, 16, 16, 1), dtype=np.uint8)
    whole = p.purify(images, seed=3)
    assert np.array_equal(whole, np.concatenate([p.purify(images[:3], seed=3), p.purify(images[3:], seed=3,
                                                                                         offset=3)]))
    x = _random((3, 1, 16, 16), 9) * 0.5
    key = NoiseKey.of(11, torch.tensor([4, 0, 9]))
    fused = guided_diffuse_denoise(x, p.evaluator, p.config.diffusion(), p.config.guidance(), key=key)
    x_var = x.clone().requires_grad_(True)
    out = p.purify_differentiable(x_var, key)
    assert (out.detach() - fused).abs().max() < 1e-5  # fp32: native vs reference Gaussians, micro-batches
    weights = _random(tuple(out.shape), 10)
    (grad,) = torch.autograd.grad((out * weights).sum(), x_var)
    direction, h = _random(tuple(x.shape), 12), 1e-2

    def loss(z):
        return float((p.purify_differentiable(z, key) * weights).sum().detach())

    numeric = (loss(x + h * direction) - loss(x - h * direction)) / (2 * h)
    analytic = float((grad * direction).sum())
    # The input enters twice, through x_t and through the guidance's target; SSIM's guidance is differentiated
    # through (a double backward). fp32 central difference: agreement within 1%.
    print(f"\n{mode}: directional derivative autograd {analytic:.6f}, central difference {numeric:.6f}")
    assert abs(numeric - analytic) <= 1e-2 * abs(analytic), (numeric, analytic)
    # The guidance's gradient is part of the map: detaching it (as a purifier that does not differentiate through
    # it would) gives another derivative.
    x_var = x.clone().requires_grad_(True)
    detached = guided_diffuse_denoise(x_var, DifferentiableEpsilon(p.models["unet"]), p.config.diffusion(),
                                      p.config.guidance(), key=key, kernels=reference, differentiable=False)
    if mode == "ssim":
        (grad_detached,) = torch.autograd.grad((detached * weights).sum(), x_var)
        print(f"{mode}: with the guidance detached {float((grad_detached * direction).sum()):.6f}")
        assert abs(float((grad_detached * direction).sum()) - analytic) > 1e-2 * abs(analytic)


def test_guided_options_are_checked():
    with pytest.raises(InputError, match="--guide-mode"):
        _tiny(guide_mode="lpips")
    for bad in (0.0, -5.0, float("nan")):
        with pytest.raises(InputError, match="--guide-scale"):
            _tiny(guide_scale=bad)
    with pytest.raises(InputError, match="--guide-budget"):
        _tiny(guide_budget=2.0)
    assert _tiny(t_star=6, reverse_steps=3).algorithm.network_evaluations() == 3


def _saved_classifier(folder, zero_features=False):
    from puregen.models.checkpoints import save_model
    from puregen.models.classifiers import build_classifier

    torch.manual_seed(1)
    model = build_classifier("small-cnn", 1, 10).eval()
    if zero_features:  # an input-blind network: constant features, so no guidance at all
        with torch.no_grad():
            for p in model.features.parameters():
                p.zero_()
    save_model(model, folder)
    return folder


def test_adversarial_guidance_uses_the_classifiers_features_and_is_the_ddpm_method_when_they_are_blind(tmp_path):
    from puregen.engine.guided import feature_similarity, guided_diffuse_denoise
    from puregen.models.checkpoints import load_model
    from puregen.models.classifiers import FeatureExtractor

    images = np.random.default_rng(4).integers(0, 256, (5, 16, 16, 1), dtype=np.uint8)
    blind = _saved_classifier(tmp_path / "blind", zero_features=True)
    ddpm = _tiny("ddpm", t_star=6).purify(images, seed=1)
    assert np.array_equal(_tiny(t_star=6, guide_mode="adversarial", guide_classifier=str(blind),
                                guide_scale=1e6).purify(images, seed=1), ddpm)
    seeing = _saved_classifier(tmp_path / "seeing")
    p = _tiny(t_star=6, guide_mode="adversarial", guide_classifier=str(seeing), guide_scale=1e6)
    out = p.purify(images, seed=1)
    assert not np.array_equal(out, ddpm)
    assert np.array_equal(out, np.concatenate([p.purify(images[:2], seed=1), p.purify(images[2:], seed=1, offset=2)]))
    # The guidance gradient is autograd's of the per-sample feature distance.
    features = FeatureExtractor(load_model(seeing, expect="classifier").model).eval()
    x, y = _random((3, 1, 16, 16), 5), _random((3, 1, 16, 16), 6)
    xv = x.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(feature_similarity(features, xv, y).sum(), xv)
    from puregen.engine.guided import similarity_gradient

    assert torch.allclose(similarity_gradient(x, y, "adversarial", features=features), want, atol=1e-7)
    # The float path differentiates through the auxiliary network too (a double backward).
    key = NoiseKey.of(2, torch.tensor([0, 5, 3]))
    xv = (x * 0.5).requires_grad_(True)
    (grad,) = torch.autograd.grad(p.purify_differentiable(xv, key).sum(), xv)
    fused = guided_diffuse_denoise(x * 0.5, p.evaluator, p.config.diffusion(), p.config.guidance(), key=key,
                                   features=p.algorithm.features)
    assert (p.purify_differentiable(x * 0.5, key) - fused).abs().max() < 1e-5 and grad.abs().sum() > 0


def test_adversarial_guidance_needs_its_classifier_and_only_that_mode_takes_one(tmp_path):
    with pytest.raises(InputError, match="needs --guide-classifier"):
        _tiny(guide_mode="adversarial")
    with pytest.raises(InputError, match="needs --guide-classifier"):
        _tiny(guide_classifier=str(_saved_classifier(tmp_path / "c")))
    with pytest.raises(InputError, match="missing"):
        _tiny(guide_mode="adversarial", guide_classifier=str(tmp_path / "missing"))
