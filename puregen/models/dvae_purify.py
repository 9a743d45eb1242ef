"""Applying two fitted D-VAE stages to images: the purification itself, shared by the fit and the method.

Stage 1 removes its predicted perturbation, x1 = clamp(x - p_hat_1); stage 2
(fitted on x1 with a looser rate bound) removes what is left,
x2 = clamp(x1 - p_hat_2), and the output is stage 2's reconstruction of x2.
Every latent sample draws its Gaussians from the per-sample Philox stream
`STREAM_DVAE` (step 0, 1, 2 for the three encoder passes), so a row's bytes
depend on its image, label, seed and global index only, never on the batch.
Networks run in eval mode (BatchNorm on its running statistics, InstanceNorm
per image) over fixed-size, zero-padded micro-batches: the convolutions then
see one batch shape whatever the caller's batch is.

Images are [0, 1] pixel units, NCHW float32.
"""

from __future__ import annotations

import torch

from ..engine.noise_key import NoiseKey
from ..kernels import philox
from .dvae import DVAE

MICRO_BATCH = 32
STEP_STAGE1, STEP_STAGE2, STEP_RECONSTRUCT = 0, 1, 2


def _autocast(precision: str, device: torch.device):
    enabled = precision == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


@torch.no_grad()
def _forward(model: DVAE, x: torch.Tensor, labels: torch.Tensor, key: NoiseKey, step: int, precision: str):
    """(x_hat, p_hat) in fp32 for every row, over fixed micro-batches."""
    model.eval()
    x_hats, p_hats = [], []
    for s in range(0, x.shape[0], MICRO_BATCH):
        # Drawn per micro-batch (a row's noise is a function of its index alone): the whole input's latent
        # noise at once took gigabytes for a 10,000-image fit.
        nb = philox.normal_noise(key.indices[s : s + MICRO_BATCH], model.latent_shape(), seed=key.seed,
                                 stream=philox.STREAM_DVAE, step=step).to(x.device)
        xb, yb = x[s : s + MICRO_BATCH], labels[s : s + MICRO_BATCH]
        k = xb.shape[0]
        if k < MICRO_BATCH:  # pad to the one shape the networks ever see
            pad = MICRO_BATCH - k
            xb = torch.cat([xb, xb.new_zeros((pad, *xb.shape[1:]))])
            yb = torch.cat([yb, yb.new_zeros(pad)])
            nb = torch.cat([nb, nb.new_zeros((pad, *nb.shape[1:]))])
        with _autocast(precision, x.device):
            out = model(xb.contiguous(), yb, nb.contiguous())
        x_hats.append(out.x_hat[:k].float())
        p_hats.append(out.p_hat[:k].float())
    return torch.cat(x_hats), torch.cat(p_hats)


def remove_perturbation(model: DVAE, x: torch.Tensor, labels: torch.Tensor, key: NoiseKey, step: int,
                        precision: str = "fp32") -> torch.Tensor:
    """clamp(x - p_hat, 0, 1): one stage's removal of its predicted perturbation."""
    _, p_hat = _forward(model, x, labels, key, step, precision)
    return (x - p_hat).clamp(0, 1)


def purify_two_stage(stage1: DVAE, stage2: DVAE, x: torch.Tensor, labels: torch.Tensor, key: NoiseKey,
                     precision: str = "fp32") -> torch.Tensor:
    """The D-VAE purification of `x` (labels: the images' classes; key: their noise key)."""
    x1 = remove_perturbation(stage1, x, labels, key, STEP_STAGE1, precision)
    x2 = remove_perturbation(stage2, x1, labels, key, STEP_STAGE2, precision)
    x_hat, _ = _forward(stage2, x2, labels, key, STEP_RECONSTRUCT, precision)
    return x_hat.clamp(0, 1)
