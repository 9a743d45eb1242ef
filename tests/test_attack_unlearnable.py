"""Unlearnable-example attacks: each makes a model trained on the poisoned set fail on clean test images,
inside its stated budget, with class-wise noise shared by a class, deterministically for a seed.

The learning problem: 1,000 of scikit-learn's digits, upsampled to 16 x 16 and drawn faintly (32 grey
levels around mid-grey), 600 to train and 400 to test. A small CNN learns the clean digits to 98% in six
epochs, but the faint strokes are a harder feature than the attacks' noise, which is what these attacks
exploit (on full-contrast digits the noise of LSP and AR barely costs 1 point). Measured accuracies are
written next to the assertions (1 thread, CPU).
"""

import dataclasses
import functools
import math

import numpy as np
import pytest
import torch

from puregen.data import to_model_space
from puregen.errors import InputError
from puregen.evaluation.attacks.unlearnable import (
    AdversarialPoisonRecipe,
    ARRecipe,
    ErrorMinimizingRecipe,
    LSPRecipe,
    OPSRecipe,
    craft_adversarial_poisons,
    craft_autoregressive,
    craft_error_minimizing,
    craft_lsp,
    craft_one_pixel_shortcut,
)
from puregen.evaluation.attacks.unlearnable.autoregressive import ar_processes, generate, matched_filter_response
from puregen.evaluation.attacks.unlearnable.budgets import scaled_l2_budget
from puregen.evaluation.poison_set import PoisonSet, load_poison_set
from puregen.models.classifiers import SmallCNN
from puregen.training.classifier import ClassifierRecipe, accuracy, train_classifier

VICTIM = ClassifierRecipe(arch="small-cnn", epochs=6, batch_size=32, lr=0.05, crop_padding=0, flip=False)
# Error-minimising noise, shrunk for the test: a width-8 CNN, batches of 64, 10 PGD steps a round.
EM_TINY = ErrorMinimizingRecipe(max_rounds=10, batch_size=64, pgd_steps=10)


@pytest.fixture(autouse=True)
def _one_thread():
    # These networks are tiny: one thread runs them 3x faster than two on a busy 2-core machine. The
    # accuracies written below were measured on one thread.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def faint_digits():
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    strokes = np.kron(digits.images / 16, np.ones((1, 2, 2)))  # 16 x 16 in [0, 1]
    images = np.clip(128 + 32 * (strokes - 0.5), 0, 255).round().astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(labels))
    train, test = order[:600], order[600:1000]
    return images[train], labels[train], images[test], labels[test]


def _train(images, labels, seed=0):
    return train_classifier(to_model_space(images), torch.from_numpy(labels), 10,
                            dataclasses.replace(VICTIM, seed=seed), progress=False)


def _clean_test_accuracy(train_images, train_labels, test_images, test_labels) -> float:
    model = _train(train_images, train_labels)
    return accuracy(model, to_model_space(test_images), torch.from_numpy(test_labels))


@pytest.fixture(scope="module")
def attacker_model(faint_digits):
    """TAP's pre-trained model: the victim's recipe on the clean training set, under another seed."""
    return _train(faint_digits[0], faint_digits[1], seed=1000)


@pytest.fixture(scope="module")
def clean_accuracy(faint_digits):
    return _clean_test_accuracy(*faint_digits)


def _em(images, labels, **changes):
    torch.manual_seed(0)
    return craft_error_minimizing(images, labels, dataclasses.replace(EM_TINY, **changes), num_classes=10,
                                  model=SmallCNN(images.shape[3], 10, width=8), progress=False)


CRAFTERS = {
    "lsp": lambda x, y: craft_lsp(x, y, num_classes=10),
    "ar": lambda x, y: craft_autoregressive(x, y, num_classes=10),
    "ops": lambda x, y: craft_one_pixel_shortcut(x, y, num_classes=10),
    "em-class": lambda x, y: _em(x, y, class_wise=True),
    "em-sample": lambda x, y: _em(x, y, class_wise=False),
    # TAP with 10 PGD steps (the paper's 250 are not needed here: every poison reaches its target class).
    "tap": lambda x, y, model: craft_adversarial_poisons(model, x, y, AdversarialPoisonRecipe(steps=10),
                                                         num_classes=10, progress=False),
}
# Clean test accuracy of the victim trained on each poisoned set (measured; trained on the clean set: 0.983).
MEASURED = {"lsp": 0.373, "ar": 0.343, "ops": 0.538, "em-class": 0.093, "em-sample": 0.210, "tap": 0.125}


@pytest.mark.parametrize("name", list(CRAFTERS))
def test_training_on_the_poisoned_set_fails_on_clean_test_images(name, faint_digits, clean_accuracy, request):
    x, y, x_test, y_test = faint_digits
    extra = (request.getfixturevalue("attacker_model"),) if name == "tap" else ()
    poisoned, info = CRAFTERS[name](x, y, *extra)
    assert poisoned.shape == x.shape and poisoned.dtype == np.uint8
    poisoned_accuracy = _clean_test_accuracy(poisoned, y, x_test, y_test)
    print(f"{name}: clean-trained {clean_accuracy:.3f}, poison-trained {poisoned_accuracy:.3f}")  # for -s
    assert clean_accuracy > 0.9  # measured 0.983
    # Measured in MEASURED (0.09-0.54): at least 0.35 below the clean model; OPS, the weakest here, has
    # 0.095 to spare (0.983 - 0.538 = 0.445), the others 0.26 or more.
    assert poisoned_accuracy < clean_accuracy - 0.35, (name, poisoned_accuracy, clean_accuracy)
    if name.startswith("em"):
        assert info["reached_stop_accuracy"] and info["train_accuracy"][-1] >= 0.99  # the min-min stop condition
    if name == "tap":
        assert info["reach_target_rate"] > 0.9  # measured 1.0
    if name in ("em-class", "em-sample", "tap"):
        assert info["norm"] == "linf" and 0 < info["max_change_levels"] <= 8


@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3)])
def test_l2_attacks_sit_at_their_scaled_budget(shape):
    # Mid-range images: no pixel is clipped at 0 or 255, so the stored noise is the noise as rounded.
    images = np.random.default_rng(1).integers(80, 176, (20, *shape), dtype=np.uint8)
    labels = np.arange(20) % 4
    dim = math.prod(shape)
    spread = lambda x, y: craft_lsp(x, y, LSPRecipe(sample_spread=1.0))  # noqa: E731 (per-image LSP points)
    for craft, expected in ((craft_lsp, math.sqrt(dim) * 6 / 255), (spread, math.sqrt(dim) * 6 / 255),
                            (craft_autoregressive, math.sqrt(dim / 3072))):
        poisoned, info = craft(images, labels)
        assert info["norm"] == "l2" and info["budget"] == pytest.approx(expected, abs=1e-6)
        norms = np.linalg.norm((poisoned.astype(float) - images).reshape(20, -1), axis=1) / 255
        assert norms.max() <= info["budget"] + 1e-9  # never over, after rounding to whole levels
        assert norms.min() >= 0.97 * info["budget"]  # and not far under it
    assert scaled_l2_budget(1.0, (32, 32, 3)) == 1.0  # the AR paper's CIFAR-10 budget, unscaled
    assert craft_lsp(images, labels)[1]["budget"] == pytest.approx(
        {1: 0.658824, 3: 1.304132}[shape[2]], abs=1e-6)


@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3)])
def test_linf_attacks_stay_inside_8_levels(shape):
    images = np.random.default_rng(2).integers(0, 256, (16, *shape), dtype=np.uint8)  # clipping at 0/255 too
    labels = np.arange(16) % 4
    for class_wise in (False, True):
        poisoned, info = _em(images, labels, class_wise=class_wise, max_rounds=1, pgd_steps=3, train_steps=2)
        diff = poisoned.astype(int) - images
        assert np.abs(diff).max() <= 8 and info["max_change_levels"] == np.abs(diff).max() > 0
        assert info["norm"] == "linf" and info["budget"] == 8 / 255 and info["budget_levels"] == 8
        assert poisoned.shape == images.shape
    torch.manual_seed(0)
    poisoned, info = craft_adversarial_poisons(SmallCNN(shape[2], 4, width=4), images, labels,
                                               AdversarialPoisonRecipe(steps=3), progress=False)
    assert 0 < np.abs(poisoned.astype(int) - images).max() <= 8 and info["budget_levels"] == 8


def test_class_wise_attacks_give_a_class_one_perturbation(faint_digits):
    x, y = faint_digits[0][:200], faint_digits[1][:200]  # 112..144: +-20 levels never clip
    for name in ("lsp", "em-class"):
        poisoned, info = CRAFTERS[name](x, y) if name == "lsp" else _em(x, y, class_wise=True, max_rounds=2)
        assert info["class_wise"]
        diff = poisoned.astype(int) - x
        for k in range(10):
            rows = diff[y == k]
            assert (rows == rows[0]).all(), (name, k)
        assert not (diff[y == 0][0] == diff[y == 1][0]).all()
    poisoned, info = craft_one_pixel_shortcut(x, y)
    changed = (poisoned != x).any(axis=3).reshape(len(x), -1).sum(axis=1)
    assert changed.max() <= 1 and info["norm"] == "l0" and info["budget"] == 1
    positions, values = np.array(info["positions"]), np.array(info["values"])
    assert len({tuple(p) for p in positions}) == 10  # a pixel per class, none shared
    for k in range(10):
        r, c = positions[k]
        assert (poisoned[y == k, r, c] == values[k]).all() and set(values[k]) <= {0, 255}


def test_one_pixel_shortcut_picks_the_pixel_farthest_from_the_class():
    # Noisy mid-grey images; class 0 is always black at (2, 3), class 1 always white at (4, 1): the pixels
    # whose deviation from an extreme colour is largest and most consistent. Class 2 copies class 0, but
    # (2, 3) is taken, so it gets another pixel.
    rng = np.random.default_rng(3)
    images = rng.integers(100, 156, (60, 6, 6, 1), dtype=np.uint8)
    labels = np.arange(60) % 3
    images[labels != 1, 2, 3] = 0
    images[labels == 1, 4, 1] = 255
    poisoned, info = craft_one_pixel_shortcut(images, labels)
    assert info["positions"][:2] == [[2, 3], [4, 1]] and info["values"][:2] == [[255], [0]]
    assert info["positions"][2] not in ([2, 3], [4, 1])
    assert (poisoned[labels == 0, 2, 3] == 255).all() and (poisoned[labels == 1, 4, 1] == 0).all()


def test_ar_noise_is_annihilated_by_its_own_class_filter_only():
    coefficients = ar_processes(3, (16, 16, 3), ARRecipe())
    start = np.random.default_rng(4).standard_normal((3, 3, 20, 20))
    noise = generate(coefficients, start, crop=4)
    for k in range(3):
        assert matched_filter_response(coefficients[k], noise[k]) < 1e-9  # its own process: exactly predicted
        for j in range(3):  # the other classes' filters respond to it (measured 0.18-0.9 relative to its RMS)
            if j != k:
                assert matched_filter_response(coefficients[j], noise[k]) > 0.1, (j, k)


def test_outputs_are_deterministic_for_a_seed():
    images = np.random.default_rng(5).integers(0, 256, (12, 10, 10, 3), dtype=np.uint8)
    labels = np.arange(12) % 3
    for craft, recipe in ((craft_lsp, LSPRecipe), (craft_autoregressive, ARRecipe)):
        a, b = craft(images, labels, recipe(seed=1))[0], craft(images, labels, recipe(seed=1))[0]
        assert np.array_equal(a, b) and not np.array_equal(a, craft(images, labels, recipe(seed=2))[0])
    assert np.array_equal(craft_one_pixel_shortcut(images, labels)[0], craft_one_pixel_shortcut(images, labels)[0])
    small = dict(max_rounds=1, pgd_steps=2, train_steps=2)
    a, b = _em(images, labels, seed=3, **small)[0], _em(images, labels, seed=3, **small)[0]
    assert np.array_equal(a, b) and not np.array_equal(a, _em(images, labels, seed=4, **small)[0])


def test_bad_inputs_are_refused_with_a_clear_message():
    images = np.random.default_rng(6).integers(0, 256, (8, 8, 8, 1), dtype=np.uint8)
    labels = np.arange(8) % 2
    tap = functools.partial(craft_adversarial_poisons, SmallCNN(1, 2, width=4))
    for craft in (craft_lsp, craft_autoregressive, craft_one_pixel_shortcut, craft_error_minimizing, tap):
        with pytest.raises(InputError, match="uint8 N x H x W x C"):
            craft(images.astype(np.float32), labels)
        with pytest.raises(InputError, match="uint8 N x H x W x C"):
            craft(images[..., 0], labels)
        with pytest.raises(InputError, match="1 or 3 channels"):
            craft(np.repeat(images, 2, axis=3), labels)
        with pytest.raises(InputError, match="8 integers"):
            craft(images, labels[:5])
        with pytest.raises(InputError, match=r"labels must lie in 0\.\.1"):
            craft(images, labels + 1, num_classes=2)
        with pytest.raises(InputError, match="at least 2 classes"):
            craft(images, np.zeros(8, np.int64))
    for bad in (0.0, -1 / 255, 1.5, float("nan")):
        with pytest.raises(InputError, match="L-inf budget"):
            craft_error_minimizing(images, labels, ErrorMinimizingRecipe(epsilon=bad))
    with pytest.raises(InputError, match="under one uint8 level"):
        craft_error_minimizing(images, labels, ErrorMinimizingRecipe(epsilon=0.5 / 255, step_size=0.1 / 255))
    with pytest.raises(InputError, match="step_size"):
        craft_error_minimizing(images, labels, ErrorMinimizingRecipe(step_size=16 / 255))
    with pytest.raises(InputError, match="L-inf budget"):
        tap(images, labels, AdversarialPoisonRecipe(epsilon=2.0))
    with pytest.raises(InputError, match="maps every class to itself"):
        tap(images, labels, AdversarialPoisonRecipe(class_shift=2))
    with pytest.raises(InputError, match="LSP rms"):
        craft_lsp(images, labels, LSPRecipe(rms=0))
    with pytest.raises(InputError, match="LSP grid"):
        craft_lsp(images, labels, LSPRecipe(grid=9))
    with pytest.raises(InputError, match="AR reference_budget"):
        craft_autoregressive(images, labels, ARRecipe(reference_budget=-1.0))
    assert OPSRecipe().to_dict() == {"distinct_positions": True}


def test_a_poison_set_can_hold_every_image_with_no_target(tmp_path):
    images = np.random.default_rng(7).integers(0, 256, (6, 8, 8, 1), dtype=np.uint8)
    labels = np.arange(6) % 3
    poisoned, info = craft_lsp(images, labels)
    ps = PoisonSet("lsp", np.arange(6), poisoned, labels, -1, "f", info, availability=True)
    back = load_poison_set(ps.save(tmp_path / "lsp"))
    assert back.availability and back.kind == "availability" and not back.targeted and back.test_trigger is None
    assert back.params["norm"] == "l2" and back.params["budget"] == info["budget"]
    train_x, train_y = back.poisoned_training_set(images, labels)
    assert np.array_equal(train_x, poisoned) and np.array_equal(train_y, labels)
    with pytest.raises(InputError, match="either"):
        PoisonSet("lsp", np.arange(6), poisoned, labels, -1, "f", availability=True, target_index=0)
    with pytest.raises(InputError, match="target_class is -1"):
        PoisonSet("lsp", np.arange(6), poisoned, labels, 2, "f", availability=True)


def test_the_suite_crafts_one_cached_set_over_every_base_image(tmp_path):
    from puregen.evaluation.attack_suite import (
        ATTACKS,
        DEFAULT_ATTACKS,
        FULL_ATTACKS,
        AttackContext,
        poison_sets,
    )
    from puregen.evaluation.scales import ScaleData, small_settings, smoke_settings

    from .conftest import smooth_images

    images, labels = smooth_images(30, seed=8), np.arange(30) % 10
    data = ScaleData("small", images, labels, images[:4], labels[:4], images, labels, images, labels,
                     tuple("abcdefghij"), "test data")
    settings = dataclasses.replace(smoke_settings(small_settings()), precision="fp32")
    ctx = AttackContext(data, settings, tmp_path, smoke=True, progress=False)
    names = ("em-sample-8", "em-class-8", "lsp", "ar", "ops", "tap-8")
    assert not set(names) & (set(FULL_ATTACKS) | set(DEFAULT_ATTACKS))  # their own table comes later
    for name in names:
        spec = ATTACKS[name]
        assert spec.family == "unlearnable" and not spec.targeted
        (ps,) = poison_sets(spec, ctx)
        assert ps.availability and ps.target_class == -1 and np.array_equal(ps.indices, np.arange(30))
        assert np.array_equal(ps.labels, labels) and ps.params["norm"] in ("linf", "l2", "l0")
        (again,) = poison_sets(spec, ctx)  # read back from OUT/poisons
        assert np.array_equal(again.images, ps.images) and again.params == ps.params
    assert len(list((tmp_path / "poisons").iterdir())) == len(names)
