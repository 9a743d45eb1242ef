import copy

import numpy as np
import pytest
import torch

from puregen.data import to_model_space
from puregen.errors import InputError
from puregen.evaluation.attacks.bullseye import (
    BullseyeRecipe,
    FeatureExtractor,
    bullseye_loss,
    craft_bullseye,
    train_feature_extractor,
    train_transfer,
)
from puregen.evaluation.poison_set import PoisonSet
from puregen.models.classifiers import SmallCNN
from puregen.training.classifier import ClassifierRecipe

from .conftest import smooth_images

EPS = 16 / 255
TINY = ClassifierRecipe(epochs=2, batch_size=8, lr=0.05, crop_padding=0, flip=False)


def _extractor(seed=0):
    torch.manual_seed(seed)
    return FeatureExtractor(SmallCNN(1, 3, width=8)).eval()


def _feature_loss(extractor, poisons_u8, target_u8):
    with torch.no_grad():
        return float(bullseye_loss(extractor.features(to_model_space(poisons_u8)),
                                   extractor.features(to_model_space(target_u8[None]))))


def _labelled(n=24, seed=0):
    images = smooth_images(n, 12, 12, seed=seed)
    labels = np.arange(n) % 3
    # Make the classes learnable: brighten a different third of the picture per class.
    for c in range(3):
        images[labels == c, 4 * c : 4 * c + 4] = np.clip(images[labels == c, 4 * c : 4 * c + 4] + 80, 0, 255)
    return images, labels


def test_bullseye_loss_is_the_relative_distance_from_target_to_centroid():
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert bullseye_loss(feats, torch.tensor([1.0, 1.0])).item() == pytest.approx(0.25)
    assert bullseye_loss(feats, torch.tensor([[0.5, 0.5]])).item() == pytest.approx(0.0)
    with pytest.raises(InputError, match="dimensions"):
        bullseye_loss(feats, torch.ones(3))


def test_crafting_pulls_the_poison_centroid_onto_the_target_feature():
    ext = _extractor()
    poisons, target = smooth_images(3, 12, 12, seed=1), smooth_images(1, 12, 12, seed=2)[0]
    recipe = BullseyeRecipe(epsilon=EPS, steps=40, lr=0.01)
    out, info = craft_bullseye(ext, poisons, target, recipe, progress=False)
    assert info["attack"] == "bullseye-polytope" and info["recipe"] == recipe.to_dict()
    assert {"loss_start", "loss_end", "crafting_seconds"} <= info.keys()
    assert info["loss_end"] < 0.5 * info["loss_start"]
    # Measured independently on the returned uint8 images, not on the optimiser's floats.
    clean_loss = _feature_loss(ext, poisons, target)
    assert clean_loss == pytest.approx(info["loss_start"], rel=1e-4)
    assert _feature_loss(ext, out, target) < 0.5 * clean_loss
    # The extractor is left as it came (eval mode, same weights).
    assert not ext.training


def test_poisons_stay_in_the_budget_and_pixel_range():
    ext = _extractor()
    poisons = smooth_images(2, 12, 12, seed=3)
    poisons[0, :3] = 0  # pixels at the range's ends must not wrap around
    poisons[1, :3] = 255
    before = poisons.copy()
    eps = 0.05  # 12.75 levels: rounding must not push a pixel to 13
    out, info = craft_bullseye(ext, poisons, smooth_images(1, 12, 12, seed=4), BullseyeRecipe(epsilon=eps, steps=30,
                               lr=0.02), progress=False)
    assert out.dtype == np.uint8 and out.shape == poisons.shape
    change = np.abs(out.astype(np.int16) - poisons.astype(np.int16))
    assert change.max() == 12 == info["max_change_levels"]
    np.testing.assert_array_equal(poisons, before)  # the inputs are not written to


def test_an_ensemble_of_extractors_and_a_fixed_seed_give_repeatable_poisons():
    exts = [_extractor(0), _extractor(1)]
    poisons, target = smooth_images(2, 12, 12, seed=5), smooth_images(1, 12, 12, seed=6)
    recipe = BullseyeRecipe(epsilon=EPS, steps=15, random_start=True, seed=3)
    a, info = craft_bullseye(exts, poisons, target, recipe, progress=False)
    b, _ = craft_bullseye(exts, poisons, target, recipe, progress=False)
    np.testing.assert_array_equal(a, b)
    assert info["extractors"] == 2 and info["loss_end"] < info["loss_start"]
    mean_start = np.mean([_feature_loss(e, poisons, target[0]) for e in exts])
    assert info["loss_start"] == pytest.approx(mean_start, rel=1e-4)


def test_placed_poisons_keep_every_label():
    images, labels = _labelled()
    rows = np.flatnonzero(labels == 1)[:3]
    poisons, _ = craft_bullseye(_extractor(), images[rows], images[0], BullseyeRecipe(steps=5), progress=False)
    # As `puregen eval` keeps them: a targeted poison set whose poisons carry their rows' own labels.
    ps = PoisonSet("bullseye", rows, poisons, labels[rows], 1, "f", target_index=0, target_true_class=int(labels[0]))
    new_images, new_labels = ps.poisoned_training_set(images, labels)
    np.testing.assert_array_equal(new_labels, labels)
    np.testing.assert_array_equal(new_images[rows], poisons)
    untouched = np.setdiff1d(np.arange(len(images)), rows)
    np.testing.assert_array_equal(new_images[untouched], images[untouched])
    with pytest.raises(InputError, match="reach row"):
        ps.poisoned_training_set(images[: rows.max()], labels[: rows.max()])


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_linear_probe_freezes_the_extractor_and_finetuning_moves_it():
    images, labels = _labelled()
    ext = train_feature_extractor(images, labels, 3, TINY, progress=False)
    original = _state(ext)
    linear = train_transfer(ext, images, labels, 3, "linear", TINY, progress=False)
    finetuned = train_transfer(ext, images, labels, 3, "finetune", TINY, progress=False)
    for name, value in _state(linear.extractor).items():  # batch-norm statistics included
        torch.testing.assert_close(value, original[name], rtol=0, atol=0)
    moved = [n for n, v in _state(finetuned.extractor).items() if not torch.equal(v, original[n])]
    assert any(n.endswith("weight") for n in moved)
    for name, value in _state(ext).items():  # the caller's extractor is never trained
        torch.testing.assert_close(value, original[name], rtol=0, atol=0)
    assert all(p.requires_grad for p in ext.parameters())
    # The linear head did train, from the initialisation that the recipe's seed gives.
    torch.manual_seed(TINY.seed)
    initial = torch.nn.Linear(ext.dim, 3)
    assert not torch.equal(linear.head.weight, initial.weight)
    assert linear(to_model_space(images)).shape == (len(images), 3)


def test_bad_input_is_refused_with_a_clear_message():
    ext = _extractor()
    poisons, target = smooth_images(2, 12, 12), smooth_images(1, 12, 12)
    recipe = BullseyeRecipe(steps=2)
    with pytest.raises(InputError, match="uint8"):
        craft_bullseye(ext, poisons.astype(np.float32) / 255, target, recipe, progress=False)
    with pytest.raises(InputError, match="one target"):
        craft_bullseye(ext, poisons, smooth_images(2, 12, 12), recipe, progress=False)
    with pytest.raises(InputError, match="target image is"):
        craft_bullseye(ext, poisons, smooth_images(1, 10, 10), recipe, progress=False)
    with pytest.raises(InputError, match="epsilon"):
        craft_bullseye(ext, poisons, target, BullseyeRecipe(epsilon=0.0), progress=False)
    with pytest.raises(InputError, match="steps"):
        craft_bullseye(ext, poisons, target, BullseyeRecipe(steps=0), progress=False)
    with pytest.raises(InputError, match="feature layer"):
        craft_bullseye(torch.nn.Linear(3, 3), poisons, target, recipe, progress=False)
    images, labels = _labelled()
    with pytest.raises(InputError, match="transfer mode"):
        train_transfer(ext, images, labels, 3, "head-only", TINY, progress=False)
    with pytest.raises(InputError, match=r"0\.\.2"):
        train_transfer(ext, images, labels + 5, 3, "linear", TINY, progress=False)
    with pytest.raises(InputError, match="labels must be"):
        train_feature_extractor(images, labels[:-1], 3, TINY, progress=False)


def test_linear_probe_on_cached_features_trains_the_same_head_as_the_full_loop():
    from puregen.evaluation.attacks.bullseye import TransferClassifier
    from puregen.training.classifier import _fit, total_steps
    from puregen.training.loop import Progress

    images, labels = _labelled()
    ext = _extractor()
    fast = train_transfer(ext, images, labels, 3, "linear", TINY, progress=False)
    torch.manual_seed(TINY.seed)
    slow = TransferClassifier(copy.deepcopy(ext), 3, frozen=True)
    opt = torch.optim.SGD(slow.head.parameters(), lr=TINY.lr, momentum=TINY.momentum,
                          weight_decay=TINY.weight_decay, nesterov=True)
    total = total_steps(len(images), TINY)
    _fit(slow, opt, to_model_space(images), torch.from_numpy(labels), TINY, 0, total,
         Progress(total, 0, "", 8, False))
    torch.testing.assert_close(fast.head.weight, slow.head.weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.head.bias, slow.head.bias, rtol=1e-4, atol=1e-5)
