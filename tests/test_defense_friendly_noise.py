"""FrieNDs: friendly noise stays in its bound, is large, keeps the model's output; train-time input noise;
and the defense exactly as `puregen eval` runs it, on a tiny problem."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import puregen.training.classifier as classifier_module
from puregen.data import to_model_space
from puregen.errors import InputError
from puregen.evaluation.defenses.friendly_noise import (
    FriendlyNoiseDefense,
    FriendlyNoiseRecipe,
    _batch_noise,
    friendly_noise,
)
from puregen.training.classifier import ClassifierRecipe, predict, train_classifier
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


def _counting_training(monkeypatch):
    """Counts the classifiers the defense trains (it should pre-train one, on first use)."""
    trained = []

    def counting(*args, **kwargs):
        trained.append(args[3])
        return train_classifier(*args, **kwargs)

    monkeypatch.setattr("puregen.evaluation.defenses.friendly_noise.train_classifier", counting)
    return trained


def test_defense_pretrains_once_without_train_time_noise_and_noises_any_rows(problem, monkeypatch):
    images, labels, _ = problem
    trained = _counting_training(monkeypatch)
    # The victim's recipe may carry train-time noise; the model that defines "output unchanged" does not.
    clf = ClassifierRecipe(epochs=1, batch_size=16, crop_padding=0, flip=False, input_noise=4 / 255)
    recipe = dataclasses.replace(FAST, pretrain_epochs=2, precision="bf16")
    defense = FriendlyNoiseDefense(recipe, clf, images, labels, 2, progress=False)
    assert trained == []  # nothing is trained before the first image is noised
    out = defense.apply(images)
    assert out.shape == images.shape and out.dtype == np.uint8
    diff = np.abs(out.astype(np.int16) - images)
    assert diff.max() <= 16 and diff.mean() > 4
    before = predict(defense.model, to_model_space(images), precision=recipe.precision)
    after = predict(defense.model, to_model_space(out), precision=recipe.precision)
    assert float((before != after).float().mean()) <= 0.25
    rows = defense.apply(images[[5, 0, 9]])  # poisons' rows: noised by the same model
    assert np.array_equal(rows, friendly_noise(defense.model, images[[5, 0, 9]], recipe, progress=False))
    assert trained == [dataclasses.replace(clf, epochs=2, seed=recipe.seed, input_noise=0.0)]
    expected = train_classifier(to_model_space(images), torch.from_numpy(labels), 2, trained[0], progress=False)
    assert all(torch.equal(v, expected.state_dict()[k]) for k, v in defense.model.state_dict().items())
    assert dataclasses.replace(clf, **defense.victim_overrides) == dataclasses.replace(clf, input_noise=8 / 255)


def _tiny_scale_data(n=24):
    from puregen.evaluation.scales import ScaleData

    images = smooth_images(n, seed=7)
    labels = np.arange(n) % 10
    return ScaleData("small", images, labels, images[:4], labels[:4], images, labels, images, labels,
                     tuple("abcdefghij"), "test data")


def test_puregen_eval_runs_this_defense_on_the_base_set_and_the_poisons(tmp_path, monkeypatch):
    from puregen.evaluation.defending import DefenseContext, PreparedDefense, defense_spec
    from puregen.evaluation.scales import small_settings, smoke_settings

    data = _tiny_scale_data()
    settings = smoke_settings(small_settings())
    ctx = DefenseContext(data, settings, tmp_path / "out", smoke=True, progress=False)
    trained = _counting_training(monkeypatch)
    defense = PreparedDefense(defense_spec("friends"), ctx)
    recipe = dataclasses.replace(FriendlyNoiseRecipe(), steps=2, pretrain_epochs=1)  # --smoke's
    assert isinstance(defense.friends, FriendlyNoiseDefense) and defense.friends.recipe == recipe
    assert defense.classifier_overrides == {"input_noise": recipe.random_noise}
    base = defense.base()
    rows = np.array([9, 2, 5])
    poisons = 255 - data.base_images[rows]
    defended = defense.rows(poisons, rows, "poisons")
    assert len(trained) == 1  # one model, pre-trained on the clean base set, for the base set and the poisons
    reference = FriendlyNoiseDefense(recipe, settings.classifier, data.base_images, data.base_labels, 10,
                                     progress=False)
    assert np.array_equal(base, reference.apply(data.base_images))
    assert np.array_equal(defended, reference.apply(poisons))
    assert 0 < np.abs(base.astype(int) - data.base_images).max() <= 16
    # Cached: a rerun reads both back and trains nothing.
    trained.clear()
    again = PreparedDefense(defense_spec("friends"), ctx)
    assert again.folder == defense.folder and (defense.folder / "base.npz").is_file()
    assert np.array_equal(again.base(), base) and np.array_equal(again.rows(poisons, rows, "poisons"), defended)
    assert trained == []


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
        FriendlyNoiseDefense(FAST, clf, images, labels[:-1], 2, progress=False)
    with pytest.raises(InputError, match="0..1"):
        FriendlyNoiseDefense(FAST, clf, images, labels + 1, 2, progress=False)
    with pytest.raises(InputError, match="classes"):
        FriendlyNoiseDefense(FAST, clf, images, labels * 0, 1, progress=False)
    with pytest.raises(InputError, match="uint8"):
        FriendlyNoiseDefense(FAST, clf, images.astype(np.float32), labels, 2, progress=False)
    with pytest.raises(InputError, match="steps"):
        FriendlyNoiseDefense(dataclasses.replace(FAST, steps=0), clf, images, labels, 2, progress=False)
