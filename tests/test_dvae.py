"""D-VAE (`--method dvae`, `puregen train dvae`): each test checks one defining property on a tiny problem."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from puregen.api import load_purifier, purify_dataset
from puregen.cli import main
from puregen.data import write_dataset
from puregen.engine.noise_key import NoiseKey
from puregen.errors import CheckpointError, InputError
from puregen.models.checkpoints import load_model
from puregen.models.dvae import DVAE, DVAEConfig
from puregen.models.dvae_purify import _forward
from puregen.training import dvae as dvae_training
from puregen.training.dvae import DVAERecipe, kl_divergence, kl_hinge, load_dvae_run, train_dvae, train_stage
from puregen.training.loop import TrainingData, load_training_data

from .conftest import smooth_images

SIDE, CLASSES = 16, 4


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny convolutions on 2 threads of a busy 2-core machine spin far slower than on one.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _recipe(**changes) -> DVAERecipe:
    return dataclasses.replace(DVAERecipe.preset("tiny"), **changes)


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("dvae") / "train.npz"
    write_dataset(path, smooth_images(40, SIDE, SIDE, seed=5), np.arange(40) % CLASSES)
    return path


@pytest.fixture(scope="module")
def fitted(data_path, tmp_path_factory):
    """A finished tiny run (`puregen train dvae`)."""
    run = tmp_path_factory.mktemp("dvae-run") / "run"
    torch.set_num_threads(1)
    train_dvae(load_training_data(data_path), run, _recipe(), progress=False)
    return run


def _weights(run):
    return {f"{stage}.{k}": v for stage in ("stage1", "stage2")
            for k, v in load_model(run / stage, expect="dvae").model.state_dict().items()}


# -- the network ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels, side, latent_side", [(1, 28, 14), (3, 32, 16)])
def test_model_shapes_follow_the_input(channels, side, latent_side):
    config = DVAEConfig(in_channels=channels, image_height=side, image_width=side, num_classes=10, width=8,
                        latent_channels=12)
    model = DVAE(config)
    x = torch.rand(2, channels, side, side)
    out = model(x, torch.tensor([0, 9]), torch.randn(2, *model.latent_shape()))
    assert out.x_hat.shape == out.p_hat.shape == x.shape
    assert out.mu.shape == out.logvar.shape == (2, 12, latent_side, latent_side)
    assert model.class_embedding.shape == (10, 16, latent_side, latent_side)  # one 2w x h x w map per class
    assert 0 <= float(out.x_hat.min()) and float(out.x_hat.max()) <= 1  # the image decoder ends in a sigmoid
    assert float(out.p_hat.min()) < 0  # the perturbation decoder has no sigmoid: signed
    published = DVAE(dataclasses.replace(config, width=64, latent_channels=256))
    assert published.mu_head.out_channels == 256 and published.post_conv.out_channels == 128
    with pytest.raises(ValueError, match="even image sides"):
        DVAEConfig(in_channels=1, image_height=15, image_width=16)


# -- the loss ------------------------------------------------------------------------------------------------


def test_kl_hinge_has_no_gradient_below_tau_and_the_kl_gradient_above():
    for scale, tau, below in ((0.1, 1.0, True), (3.0, 1.0, False)):
        mu = torch.full((2, 8, 3, 3), scale, requires_grad=True)
        logvar = torch.zeros(2, 8, 3, 3, requires_grad=True)
        kl = kl_divergence(mu, logvar)  # 0.5 * 8 * scale^2 per position: 0.04 or 36 nats
        assert (float(kl) < tau) == below
        (grad_hinge,) = torch.autograd.grad(kl_hinge(kl, tau), mu)
        if below:
            assert float(kl_hinge(kl, tau)) == tau
            assert torch.count_nonzero(grad_hinge) == 0
        else:
            (grad_kl,) = torch.autograd.grad(kl_divergence(mu, logvar), mu)
            assert torch.equal(grad_hinge, grad_kl) and torch.count_nonzero(grad_kl) == grad_kl.numel()
