"""The defended classifier (purify, round, classify) that test-time attacks differentiate: a fresh noise key per
call, the full gradient with and without checkpointing, BPDA's identity backward, and the straight-through
rounding."""

import pytest
import torch

from puregen.defended import DefendedClassifier
from puregen.engine.noise_key import NoiseKey
from puregen.errors import InputError
from puregen.models.classifiers import build_classifier
from puregen.models.unet import UNet2D
from puregen.models.unet_config import UNetConfig


def _parts(method="diffpure", **options):
    from puregen.api import load_purifier

    torch.manual_seed(0)
    unet = UNet2D(UNetConfig.tiny(in_channels=1, sample_size=16))
    purifier = load_purifier(method, ddpm=unet, preset="tiny", micro_batch=4, threads=2, **options)
    classifier = build_classifier("small-cnn", 1, 10).eval()
    return purifier, classifier


def _images(n=3, seed=0):
    return torch.rand((n, 1, 16, 16), generator=torch.Generator().manual_seed(seed)) * 0.8 + 0.1


@pytest.mark.parametrize("method", ["diffpure", "guided"])
def test_each_call_purifies_with_a_fresh_key_and_rounds_to_uint8_levels(method):
    purifier, classifier = _parts(method, t_star=4)
    model = DefendedClassifier(purifier, classifier, seed=7)
    x = _images()
    first, second = model.purify(x), model.purify(x)
    assert model.seeds_used == 2 and not torch.equal(first, second)  # fresh noise on every call
    levels = (first + 1) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-4)  # on the uint8 grid (fp32 rounding of /127.5)
    # Call k of a module with seed s purifies with seed s * 2**32 + k: the same as the purifier with that key.
    want = purifier.purify_differentiable(x * 2 - 1, NoiseKey.rows(7 * 2**32 + 0, 0, 3))
    assert torch.allclose(first, torch.round((want.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1, atol=1e-6)
    # Another seed: draws an attack with the first module never saw.
    other = DefendedClassifier(purifier, classifier, seed=8)
    assert not torch.equal(other.purify(x), first)
    logits = DefendedClassifier(purifier, classifier, seed=7)(x)
    assert logits.shape == (3, 10) and torch.allclose(logits, classifier(first), atol=1e-5)


def test_the_full_gradient_is_the_same_with_checkpointing_and_bpda_passes_the_identity():
    purifier, classifier = _parts("diffpure", t_star=5)
    x = _images(seed=1)
    grads = []
    for checkpoint in (False, True):
        model = DefendedClassifier(purifier, classifier, seed=3, checkpoint=checkpoint)
        xv = x.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(xv), torch.tensor([1, 4, 9]))
        (g,) = torch.autograd.grad(loss, xv)
        grads.append(g)
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-7, rtol=1e-5)  # recomputation in fp32: the same numbers
    # BPDA: the gradient of the classifier at the purified images, carried back unchanged (times 2: x -> 2x - 1).
    model = DefendedClassifier(purifier, classifier, seed=3, gradient="bpda")
    xv = x.clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(model(xv), torch.tensor([1, 4, 9]))
    (g_bpda,) = torch.autograd.grad(loss, xv)
    purified = DefendedClassifier(purifier, classifier, seed=3).purify(x).requires_grad_(True)
    (g_at_purified,) = torch.autograd.grad(torch.nn.functional.cross_entropy(classifier(purified),
                                                                             torch.tensor([1, 4, 9])), purified)
    assert torch.allclose(g_bpda, 2 * g_at_purified, atol=1e-7)
    assert not torch.allclose(g_bpda, grads[0], atol=1e-5)  # the purifier's Jacobian is not the identity


def test_without_a_purifier_it_is_the_classifier_and_bad_setups_are_refused():
    _, classifier = _parts()
    x = _images()
    assert torch.allclose(DefendedClassifier(None, classifier)(x), classifier(x * 2 - 1), atol=1e-6)
    jpeg = _parts("jpeg")[0]
    with pytest.raises(InputError, match="no differentiable path"):
        DefendedClassifier(jpeg, classifier)
    with pytest.raises(InputError, match="gradient must be"):
        DefendedClassifier(None, classifier, gradient="spsa")
    with pytest.raises(InputError, match="float N x C x H x W"):
        DefendedClassifier(None, classifier)(torch.zeros((2, 16, 16), dtype=torch.uint8))
