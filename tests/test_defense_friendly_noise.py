"""FrieNDs: friendly noise stays in its bound, is large, keeps the model's output; train-time input noise."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import puregen.training.classifier as classifier_module
from puregen.data import to_model_space
from puregen.errors import InputError
from puregen.evaluation.defenses.friendly_noise import (
    FriendlyNoiseRecipe,
    _batch_noise,
    friendly_noise,
    friendly_noise_defense,
    victim_recipe,
)
from puregen.training.classifier import ClassifierRecipe, train_classifier
from puregen.training.loop import batch_indices

from .conftest import smooth_images

SIZE = 12
FAST = FriendlyNoiseRecipe(batch_size=32, precision="fp32")


@pytest.fixture(scope="module")
def problem():
    """Tiny images labelled by whether their top half is brighter than usual, and a model that learned it."""
    images = smooth_images(64, SIZE, SIZE, seed=3)
    x = images.astype(np.float64) / 255
    contrast = x[:, : SIZE // 2].mean((1, 2, 3)) - x[:, SIZE // 2 :].mean((1, 2, 3))
    labels = (contrast > np.median(contrast)).astype(np.int64)
    recipe = ClassifierRecipe(epochs=8, batch_size=16, crop_padding=0, flip=False)
    model = train_classifier(to_model_space(images), torch.from_numpy(labels), 2, recipe, progress=False)
    return images, labels, model


def _log_probs(model, images_u8):
    with torch.no_grad():
        return F.log_softmax(model(to_model_space(images_u8)), 1)


def _kl(model, clean_u8, noised_u8) -> float:
    return float(F.kl_div(_log_probs(model, noised_u8), _log_probs(model, clean_u8), log_target=True,
                          reduction="batchmean"))


@pytest.mark.parametrize("levels", [16, 6])
def test_friendly_noise_stays_in_its_bound_and_is_large(problem, levels):
    images, _, model = problem
    images = images.copy()
    images[:4, :3] = 0  # dark and bright patches: the valid range must cut the noise there, not wrap it
    images[4:8, :3] = 255
    out = friendly_noise(model, images, dataclasses.replace(FAST, epsilon=levels / 255), progress=False)
    assert out.dtype == np.uint8 and out.shape == images.shape
    diff = out.astype(np.int16) - images.astype(np.int16)
    assert np.abs(diff).max() == levels
    assert np.abs(diff).mean() > 0.5 * levels
    assert (diff[:4, :3] >= 0).all() and (diff[:4, :3] > 0).any()
    assert (diff[4:8, :3] <= 0).all() and (diff[4:8, :3] < 0).any()


def test_the_optimised_noise_is_projected_onto_the_bound_and_the_pixel_range(problem):
    images, _, model = problem
    x = torch.from_numpy(images[:16]).permute(0, 3, 1, 2).float() / 255
    x[:, :, :2] = 0.0
    x[:, :, -2:] = 1.0
    x[:, :, 2:4] = 0.01  # closer to the edge than the bound
    zeta, kl = _batch_noise(model, x, dataclasses.replace(FAST, lam=3.0), torch.Generator().manual_seed(0))
    assert float(zeta.abs().max()) <= float(torch.tensor(16 / 255)) and kl >= 0  # the bound in float32
    assert float((x + zeta).min()) >= 0.0 and float((x + zeta).max()) <= 1.0
    near_edge = zeta[:, :, 2:4]
    assert float(near_edge.min()) >= -0.01 and float(near_edge.min()) < -0.009  # cut by the range, not zeroed


def test_friendly_noise_keeps_the_output_where_random_noise_does_not(problem):
    images, _, model = problem
    out = friendly_noise(model, images, dataclasses.replace(FAST, lam=0.1), progress=False)
    diff = out.astype(np.int16) - images.astype(np.int16)
    assert np.abs(diff).mean() > 0.5 * 16
    # The same noise values at random places: as large, but not shaped to the model.
    shuffled = np.random.default_rng(0).permutation(diff.ravel()).reshape(diff.shape)
    scattered = np.clip(images + shuffled, 0, 255).astype(np.uint8)
    assert _kl(model, images, out) < 0.2 * _kl(model, images, scattered)
    same = (_log_probs(model, out).argmax(1) == _log_probs(model, images).argmax(1)).float().mean()
    assert same == 1.0


def test_lam_trades_the_output_for_a_larger_noise(problem):
    images, _, model = problem
    small = friendly_noise(model, images, dataclasses.replace(FAST, lam=0.1), progress=False)
    large = friendly_noise(model, images, dataclasses.replace(FAST, lam=3.0), progress=False)
    mean_abs = [np.abs(o.astype(np.int16) - images).mean() for o in (small, large)]
    assert mean_abs[1] > mean_abs[0] + 1
    assert _kl(model, images, large) > _kl(model, images, small)


def test_friendly_noise_is_reproducible_and_seeded(problem):
    images, _, model = problem
    images = images[:16]
    a = friendly_noise(model, images, FAST, progress=False)
    assert np.array_equal(a, friendly_noise(model, images, FAST, progress=False))
    assert not np.array_equal(a, friendly_noise(model, images, dataclasses.replace(FAST, seed=1), progress=False))


def test_defense_pretrains_and_reports(problem):
    images, labels, _ = problem
    clf = ClassifierRecipe(epochs=1, batch_size=16, crop_padding=0, flip=False)
    recipe = dataclasses.replace(FAST, pretrain_epochs=2, precision="bf16")
    out, info = friendly_noise_defense(images, labels, 2, recipe, clf, progress=False)
    assert out.shape == images.shape and out.dtype == np.uint8
    assert np.abs(out.astype(np.int16) - images).max() <= 16
    assert info["defense"] == "friends" and info["recipe"] == recipe.to_dict()
    assert info["mean_abs_levels"] > 4 and 0 <= info["changed_predictions"] <= 0.25
    assert victim_recipe(clf, recipe) == dataclasses.replace(clf, input_noise=8 / 255)


def test_defense_uses_the_given_model(problem, monkeypatch):
    images, labels, model = problem
    images, labels = images[:16], labels[:16]

    def no_training(*args, **kwargs):
        raise AssertionError("a model was given, so nothing should be trained")

    monkeypatch.setattr("puregen.evaluation.defenses.friendly_noise.train_classifier", no_training)
    out, _ = friendly_noise_defense(images, labels, 2, FAST, ClassifierRecipe(), model=model, progress=False)
    assert np.array_equal(out, friendly_noise(model, images, FAST, progress=False))


def _tiny_training(images, labels, **changes):
    recipe = dataclasses.replace(ClassifierRecipe.preset("tiny"), epochs=2, batch_size=8, **changes)
    return train_classifier(images, labels, 2, recipe, progress=False).state_dict()


def test_input_noise_off_trains_exactly_as_before():
    images = to_model_space(smooth_images(24, SIZE, SIZE, seed=5))
    labels = torch.arange(24) % 2
    default = _tiny_training(images, labels)
    off = _tiny_training(images, labels, input_noise=0.0)
    noisy = _tiny_training(images, labels, input_noise=8 / 255)
    assert all(torch.equal(default[k], off[k]) for k in default)
    assert any(not torch.equal(default[k], noisy[k]) for k in default)
    assert all(torch.equal(noisy[k], v) for k, v in _tiny_training(images, labels, input_noise=8 / 255).items())


def test_input_noise_is_bernoulli_in_pixel_units(monkeypatch):
    seen = []
    build = classifier_module.build_classifier

    def recording_build(*args):
        model = build(*args)
        model.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach().clone()))
        return model

    monkeypatch.setattr(classifier_module, "build_classifier", recording_build)
    images = to_model_space(smooth_images(32, SIZE, SIZE, seed=6)) * 0.5  # away from the range's ends
    images[0] = 0.99  # except one image, where the noise must be clamped
    recipe = ClassifierRecipe(epochs=1, batch_size=32, crop_padding=0, flip=False, input_noise=4 / 255)
    train_classifier(images, torch.arange(32) % 2, 2, recipe, progress=False)
    batch = images[batch_indices(32, 32, 0, recipe.seed)]
    noise = seen[0] - batch
    inside = batch.abs() < 0.9
    torch.testing.assert_close(noise[inside].abs(), torch.full_like(noise[inside], 8 / 255))  # 2x in model space
    assert 0.4 < float((noise[inside] > 0).float().mean()) < 0.6
    assert float(seen[0].max()) == 1.0


@pytest.mark.parametrize("change, match", [
    (dict(epsilon=0.0), "epsilon"),
    (dict(steps=0), "steps"),
    (dict(lr=-1.0), "lr"),
    (dict(lam=-0.5), "lam"),
    (dict(batch_size=0), "batch_size"),
    (dict(random_noise=2.0), "random_noise"),
    (dict(pretrain_epochs=0), "pretrain_epochs"),
    (dict(precision="fp16"), "precision"),
])
def test_bad_recipes_are_refused(problem, change, match):
    images, _, model = problem
    with pytest.raises(InputError, match=match):
        friendly_noise(model, images, dataclasses.replace(FAST, **change), progress=False)


def test_bad_inputs_are_refused(problem):
    images, labels, model = problem
    with pytest.raises(InputError, match="uint8"):
        friendly_noise(model, images.astype(np.float32) / 255, FAST, progress=False)
    with pytest.raises(InputError, match="shape"):
        friendly_noise(model, images[..., 0], FAST, progress=False)
    with pytest.raises(InputError, match="shape"):
        friendly_noise(model, images[:0], FAST, progress=False)
    with pytest.raises(InputError, match="channels"):
        friendly_noise(model, np.repeat(images, 3, axis=-1), FAST, progress=False)
    clf = ClassifierRecipe.preset("tiny")
    with pytest.raises(InputError, match="labels"):
        friendly_noise_defense(images, labels[:-1], 2, FAST, clf, model=model, progress=False)
    with pytest.raises(InputError, match="0..1"):
        friendly_noise_defense(images, labels + 1, 2, FAST, clf, model=model, progress=False)
    with pytest.raises(InputError, match="classes"):
        friendly_noise_defense(images, labels * 0, 1, FAST, clf, model=model, progress=False)
