"""Adaptive L-inf attacks on a (possibly randomized) classifier of [0, 1] images, and the judgement.

* `pgd_eot`: PGD (Madry et al. 2018) whose every step follows the mean gradient of `eot` calls of the
  model (Expectation over Transformation, Athalye et al. 2018): against a stochastic purifier each call
  is a fresh purification (`puregen.defended.DefendedClassifier` draws a new noise key per call), so the
  step follows the gradient of the expected loss, not of one noise draw.
* `apgd_eot`: AutoAttack's randomized version, APGD-CE then APGD-DLR with EOT, from torchattacks (the
  kept implementation of Croce and Hein 2020), with the step count set explicitly (AutoAttack's `rand`
  preset lowers it). A sample counts as broken when either attack breaks it.
* `judge`: accuracy on fresh purifications (a model whose noise keys the attack never used), averaged
  over `draws` calls, with a Wilson 95% interval over the images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...errors import InputError
from ..report import wilson_interval


def _check(x: torch.Tensor, y: torch.Tensor, eps: float) -> None:
    if x.ndim != 4 or not x.dtype.is_floating_point or float(x.min()) < 0 or float(x.max()) > 1:
        raise InputError(f"attacks take float N x C x H x W images in [0, 1], got {x.dtype} {tuple(x.shape)}")
    if y.shape != (x.shape[0],):
        raise InputError(f"need one label per image, got {tuple(y.shape)} for {x.shape[0]} images")
    if not 0 < eps <= 1:
        raise InputError(f"the L-inf budget must be in (0, 1] pixel units, got {eps}")


def eot_gradient(model, x: torch.Tensor, y: torch.Tensor, eot: int) -> torch.Tensor:
    """The mean over `eot` calls of grad_x cross-entropy(model(x), y) (summed over the batch)."""
    grad = torch.zeros_like(x)
    for _ in range(eot):
        xv = x.detach().requires_grad_(True)
        loss = F.cross_entropy(model(xv), y, reduction="sum")
        grad += torch.autograd.grad(loss, xv)[0]
    return grad / eot


def pgd_eot(model, x: torch.Tensor, y: torch.Tensor, eps: float, *, steps: int = 20, eot: int = 1,
            step_size: float | None = None, random_start: bool = True, seed: int = 0) -> torch.Tensor:
    """L-inf PGD with EOT: x_{k+1} = Proj(x_k + alpha sign(mean EOT gradient)); alpha defaults to 2.5 eps / steps."""
    _check(x, y, eps)
    if steps < 1 or eot < 1:
        raise InputError(f"PGD needs at least one step and one EOT sample, got steps={steps}, eot={eot}")
    alpha = 2.5 * eps / steps if step_size is None else step_size
    adv = x.clone()
    if random_start:
        g = torch.Generator().manual_seed(seed)
        adv = (x + (torch.rand(x.shape, generator=g) * 2 - 1).to(x) * eps).clamp(0, 1)
    for _ in range(steps):
        grad = eot_gradient(model, adv, y, eot)
        adv = torch.min(torch.max(adv + alpha * grad.sign(), x - eps), x + eps).clamp(0, 1).detach()
    return adv


def apgd_eot(model, x: torch.Tensor, y: torch.Tensor, eps: float, *, steps: int = 20, eot: int = 1,
             seed: int = 0, judge_model=None) -> torch.Tensor:
    """APGD-CE, then APGD-DLR on the images it did not break, both with `eot` EOT samples per step
    (torchattacks). `judge_model` decides which images APGD-CE broke (default: `model`, one more draw)."""
    _check(x, y, eps)
    try:
        import torchattacks
    except ImportError as e:  # pragma: no cover - installed by scripts/setup-env
        raise InputError("AutoAttack's APGD comes from torchattacks: pip install --no-deps torchattacks") from e
    adv = torchattacks.APGD(model, norm="Linf", eps=eps, steps=steps, eot_iter=eot, loss="ce", seed=seed)(x, y)
    with torch.no_grad():
        intact = (judge_model or model)(adv).argmax(1) == y
    if intact.any():
        rows = intact.nonzero().flatten()
        dlr = torchattacks.APGD(model, norm="Linf", eps=eps, steps=steps, eot_iter=eot, loss="dlr", seed=seed)
        adv = adv.clone()
        adv[rows] = dlr(x[rows], y[rows])
    return adv


@dataclass(frozen=True)
class Judgement:
    accuracy: float  # mean over images and draws
    low: float  # Wilson 95% interval over the images
    high: float
    images: int
    draws: int
    per_image: tuple[float, ...] = ()  # each image's share of correct draws


@torch.no_grad()
def judge(model, x: torch.Tensor, y: torch.Tensor, draws: int = 1) -> Judgement:
    """Accuracy of `model` (fresh purifications on every call) on x, averaged over `draws` calls."""
    correct = torch.zeros(x.shape[0])
    for _ in range(draws):
        correct += (model(x).argmax(1) == y).float()
    per_image = correct / draws
    acc = float(per_image.mean())
    low, high = wilson_interval(acc * x.shape[0], x.shape[0])
    return Judgement(acc, low, high, x.shape[0], draws, tuple(float(v) for v in per_image))


def worst_case(judgements: list[Judgement]) -> Judgement:
    """Per image the lowest share of correct draws over several attacks' judgements: an image counts as robust
    only as far as it survives every attack."""
    per_image = torch.tensor([j.per_image for j in judgements]).min(0).values
    acc = float(per_image.mean())
    low, high = wilson_interval(acc * len(per_image), len(per_image))
    return Judgement(acc, low, high, len(per_image), judgements[0].draws, tuple(float(v) for v in per_image))
