"""Gradient matching (Witches' Brew): the cosine loss, crafting within the budget, restarts, bad input."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from puregen.data import to_model_space
from puregen.errors import InputError
from puregen.evaluation.attacks.gradient_matching import (
    GradientMatchingRecipe,
    adversarial_gradient,
    craft_gradient_matching,
    gradient_matching_loss,
)
from puregen.models.classifiers import SmallCNN

from .conftest import smooth_images

SIZE, CLASSES, ADV = 12, 4, 2


@pytest.fixture(scope="module")
def model():
    """A narrow version of the harness's small CNN after a few SGD steps on random smooth images (eval mode)."""
    torch.manual_seed(0)
    net = SmallCNN(1, CLASSES, width=8)
    images = to_model_space(smooth_images(64, SIZE, SIZE, seed=10))
    labels = torch.from_numpy(np.random.default_rng(0).integers(0, CLASSES, 64))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for step in range(8):
        batch = slice(8 * step, 8 * step + 8)
        opt.zero_grad()
        F.cross_entropy(net(images[batch]), labels[batch]).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)  # crafting must leave .grad untouched; the tests check it stays None
    return net.eval()


def make_data():
    poisons = smooth_images(8, SIZE, SIZE, seed=1)
    # Saturated pixels: the projection must keep them in range (a uint8 wrap-around would break the budget check).
    poisons[0, :4] = 255
    poisons[1, :4] = 0
    return poisons, np.full(8, ADV, dtype=np.int64), smooth_images(1, SIZE, SIZE, seed=2)[0]


@pytest.fixture()
def data():
    return make_data()


def loss_of(model, poisons_u8, labels, target_u8):
    target_grad = adversarial_gradient(model, to_model_space(target_u8[None]), ADV)
    return gradient_matching_loss(model, to_model_space(poisons_u8), torch.from_numpy(labels), target_grad).item()


def test_identical_gradients_give_zero_and_opposite_give_two(model):
    target = to_model_space(smooth_images(1, SIZE, SIZE, seed=3))
    label = torch.tensor([ADV])
    g = adversarial_gradient(model, target, ADV)
    # The target's own gradient: cosine 1 up to float32 rounding.
    assert gradient_matching_loss(model, target, label, g).item() == pytest.approx(0, abs=1e-5)
    # The cosine ignores scale.
    assert gradient_matching_loss(model, target, label, [3 * t for t in g]).item() == pytest.approx(0, abs=1e-5)
    assert gradient_matching_loss(model, target, label, [-t for t in g]).item() == pytest.approx(2, abs=1e-5)
    # A different image's gradient is neither aligned nor opposite.
    other = to_model_space(smooth_images(4, SIZE, SIZE, seed=4))
    loss = gradient_matching_loss(model, other, torch.tensor([0, 1, 3, 3]), g).item()
    assert 0.01 < loss < 1.99


def test_loss_is_differentiable_in_the_poisons(model):
    x = to_model_space(smooth_images(4, SIZE, SIZE, seed=5)).requires_grad_(True)
    g = adversarial_gradient(model, to_model_space(smooth_images(1, SIZE, SIZE, seed=6)), ADV)
    (grad,) = torch.autograd.grad(gradient_matching_loss(model, x, torch.full((4,), ADV), g), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("augment", [True, False])
def test_crafting_lowers_the_loss_within_the_budget(model, data, augment):
    poisons, labels, target = data
    poisons_before, labels_before = poisons.copy(), labels.copy()
    model.train()  # the caller's mode must come back
    recipe = GradientMatchingRecipe(steps=12, lr=0.3, augment=augment)
    out, info = craft_gradient_matching(model, poisons, labels, target, ADV, recipe, progress=False)

    assert model.training and all(p.grad is None for p in model.parameters())
    model.eval()
    assert np.array_equal(poisons, poisons_before) and np.array_equal(labels, labels_before)
    assert out.dtype == np.uint8 and out.shape == poisons.shape
    change = np.abs(out.astype(np.int16) - poisons.astype(np.int16))
    assert change.max() <= 16 and change.mean() > 2  # inside 16 levels, and actually perturbed

    clean_loss, poisoned_loss = loss_of(model, poisons, labels, target), loss_of(model, out, labels, target)
    assert info["loss_start"] == pytest.approx(clean_loss, abs=1e-5)
    assert info["loss_end"] == pytest.approx(poisoned_loss, abs=1e-5)
    # A clear drop (not float noise) that rounding to uint8 does not undo: measured 0.091 -> 0.056 (augmented)
    # and 0.091 -> 0.048 (not); the 20% margin leaves room for other CPUs' float rounding.
    assert poisoned_loss < 0.8 * clean_loss
    assert info["attack"] == "gradient-matching" and info["recipe"] == recipe.to_dict()
    assert len(info["restart_losses"]) == 1 and info["crafting_seconds"] >= 0


@pytest.mark.parametrize("epsilon, levels", [(0.05, 13), (1 / 255, 1)])
def test_fractional_and_tiny_budgets_are_respected(model, data, epsilon, levels):
    poisons, labels, target = data
    out, _ = craft_gradient_matching(model, poisons, labels, target, ADV,
                                     GradientMatchingRecipe(epsilon=epsilon, steps=3), progress=False)
    change = np.abs(out.astype(np.int16) - poisons.astype(np.int16))
    assert change.max() == levels  # signed steps push some pixels to the budget's edge, never past it


def test_restarts_keep_the_lowest_loss_and_are_reproducible(model, data):
    poisons, labels, target = data
    one, info1 = craft_gradient_matching(model, poisons, labels, target, ADV,
                                         GradientMatchingRecipe(steps=4, seed=3), progress=False)
    again, _ = craft_gradient_matching(model, poisons, labels, target, ADV,
                                       GradientMatchingRecipe(steps=4, seed=3), progress=False)
    two, info2 = craft_gradient_matching(model, poisons, labels, target, ADV,
                                         GradientMatchingRecipe(steps=4, seed=3, restarts=2), progress=False)
    assert np.array_equal(one, again)
    losses = info2["restart_losses"]
    assert len(losses) == 2 and losses[0] == info1["restart_losses"][0] and losses[0] != losses[1]
    # The first restart does not depend on how many follow it, so the result is it exactly when it won.
    assert np.array_equal(two, one) == (losses[0] <= losses[1])


def test_poisons_are_crafted_batch_by_batch(model, data):
    poisons, labels, target = data
    out, info = craft_gradient_matching(model, poisons, labels, target, ADV,
                                        GradientMatchingRecipe(steps=4, batch_size=3), progress=False)
    assert np.abs(out.astype(np.int16) - poisons.astype(np.int16)).max() <= 16
    assert info["loss_end"] < info["loss_start"]


def test_frozen_model_is_handled_and_left_frozen(model, data):
    poisons, labels, target = data
    model.requires_grad_(False)
    try:
        _, info = craft_gradient_matching(model, poisons, labels, target, ADV, GradientMatchingRecipe(steps=2),
                                          progress=False)
        assert not any(p.requires_grad for p in model.parameters())
        with pytest.raises(InputError, match="trainable parameters"):
            adversarial_gradient(model, to_model_space(target[None]), ADV)
    finally:
        model.requires_grad_(True)
    assert info["loss_end"] <= 2


OK = GradientMatchingRecipe(steps=1)
# Each case turns valid (poisons, labels, target) into craft_gradient_matching's arguments, with the expected message.
BAD = {
    "float poisons": (lambda p, y, t: (p.astype(np.float32), y, t, ADV, OK), "uint8"),
    "NHW poisons": (lambda p, y, t: (p[..., 0], y, t, ADV, OK), "NHWC"),
    "no poisons": (lambda p, y, t: (p[:0], y[:0], t, ADV, OK), "non-empty"),
    "target size": (lambda p, y, t: (p, y, t[:-1], ADV, OK), "target image"),
    "two targets": (lambda p, y, t: (p, y, np.stack([t, t]), ADV, OK), "target image"),
    "list labels": (lambda p, y, t: (p, list(y), t, ADV, OK), "integer"),
    "float labels": (lambda p, y, t: (p, y.astype(np.float32), t, ADV, OK), "integer"),
    "short labels": (lambda p, y, t: (p, y[:-1], t, ADV, OK), "poison labels"),
    "label too big": (lambda p, y, t: (p, np.full_like(y, CLASSES), t, ADV, OK), r"\[0, 4\)"),
    "negative label": (lambda p, y, t: (p, np.full_like(y, -1), t, ADV, OK), r"\[0, 4\)"),
    "class too big": (lambda p, y, t: (p, y, t, CLASSES, OK), "adversarial class"),
    "negative class": (lambda p, y, t: (p, y, t, -1, OK), "adversarial class"),
    "bool class": (lambda p, y, t: (p, y, t, True, OK), "adversarial class"),
    "zero epsilon": (lambda p, y, t: (p, y, t, ADV, GradientMatchingRecipe(epsilon=0.0)), "epsilon"),
    "huge epsilon": (lambda p, y, t: (p, y, t, ADV, GradientMatchingRecipe(epsilon=2.0)), "epsilon"),
    "zero steps": (lambda p, y, t: (p, y, t, ADV, GradientMatchingRecipe(steps=0)), "steps"),
    "zero restarts": (lambda p, y, t: (p, y, t, ADV, GradientMatchingRecipe(restarts=0)), "restarts"),
    "nan lr": (lambda p, y, t: (p, y, t, ADV, GradientMatchingRecipe(lr=float("nan"))), "lr"),
    "zero batch": (lambda p, y, t: (p, y, t, ADV, GradientMatchingRecipe(batch_size=0)), "batch_size"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_input_error(model, case):
    build, message = BAD[case]
    with pytest.raises(InputError, match=message):
        craft_gradient_matching(model, *build(*make_data()), progress=False)


def test_mismatched_target_gradient_raises(model, data):
    poisons, labels, target = data
    g = adversarial_gradient(model, to_model_space(target[None]), ADV)
    with pytest.raises(InputError, match="target_grad"):
        gradient_matching_loss(model, to_model_space(poisons), torch.from_numpy(labels), g[:-1])
    with pytest.raises(InputError, match="one image"):
        adversarial_gradient(model, to_model_space(poisons), ADV)
