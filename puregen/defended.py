"""A defended classifier: purify the input, then classify it, as one `torch.nn.Module`.

For serving, it is the test-time defense in front of a model; for attacks, it is the function an adaptive
attacker differentiates. Its input is what attacks perturb: float images in [0, 1], N x C x H x W (the
convention of torchattacks and AutoAttack). It maps them to the purifiers' model space [-1, 1], purifies,
rounds to uint8 levels as a served purification would (the rounding's gradient is passed straight
through: it is the identity plus a step function whose derivative is zero almost everywhere), and
classifies.

Randomness. Under the noise contract a purification is a pure function of (seed, row index). A defense
that reused one seed would be deterministic and an attack could overfit its one noise draw, so every call
draws a fresh seed: call k of a module built with `seed=s` uses seed `s * 2**32 + k` (`seeds_used` counts
them). An attack's expectation over transformations (EOT) therefore averages over real randomness, and a
judgement made with a module of another `seed` uses draws the attack never saw.

Gradients (`gradient=`):
* "full": the purification's own float path (`Purifier.purify_differentiable`: the fp32 eager networks
  and the torch reference steps), with gradient checkpointing over the network evaluations by default so
  that memory stays bounded over long reverse processes;
* "bpda": Backward Pass Differentiable Approximation (Athalye et al. 2018): the forward pass purifies for
  real (without a graph), the backward pass treats the purifier as the identity.
"""

from __future__ import annotations

import torch
from torch import nn

from .engine.noise_key import NoiseKey
from .engine.purifiers import Purifier
from .errors import InputError

GRADIENTS = ("full", "bpda")


class _StraightThroughRound(torch.autograd.Function):
    """Rounding to uint8 levels in model space, with the identity as its gradient."""

    @staticmethod
    def forward(ctx, x):
        return torch.round((x.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1

    @staticmethod
    def backward(ctx, grad):
        return grad


class DefendedClassifier(nn.Module):
    """`classifier(round(purify(2 x - 1)))` for x in [0, 1]; `classifier` takes model-space images."""

    def __init__(self, purifier: Purifier | None, classifier: nn.Module, *, seed: int = 0, gradient: str = "full",
                 checkpoint: bool = True):
        super().__init__()
        if gradient not in GRADIENTS:
            raise InputError(f"gradient must be one of {', '.join(GRADIENTS)}, got {gradient!r}")
        if purifier is not None and not purifier.algorithm.differentiable:
            raise InputError(f"method {purifier.method!r} has no differentiable path: it cannot be attacked "
                             f"through or used in a defended classifier")
        if not 0 <= int(seed) < 2**31:
            raise InputError(f"seed must be in [0, 2**31), got {seed}")
        self.purifier, self.classifier = purifier, classifier
        self.seed, self.gradient, self.checkpoint = int(seed), gradient, checkpoint
        self.seeds_used = 0
        self.eval()

    def train(self, mode: bool = True):
        # Inference only: an attack library that restores "training mode" afterwards (torchattacks does, for a
        # module it found in training mode) must not put the classifier's batch norm on attack batches.
        return super().train(False)

    def next_key(self, n: int) -> NoiseKey:
        key = NoiseKey.rows(self.seed * 2**32 + self.seeds_used, 0, n)
        self.seeds_used += 1
        return key

    def purify(self, x01: torch.Tensor) -> torch.Tensor:
        """The purified images in model space (rounded to uint8 levels), with this module's gradient rule."""
        if x01.ndim != 4 or not x01.dtype.is_floating_point:
            raise InputError(f"a defended classifier takes float N x C x H x W images in [0, 1], got "
                             f"{x01.dtype} {tuple(x01.shape)}")
        x = x01.to(torch.float32) * 2 - 1
        if self.purifier is None:
            return x
        key = self.next_key(x.shape[0])
        if self.gradient == "bpda":
            with torch.no_grad():
                purified = self.purifier.purify_differentiable(x.detach(), key)
            out = x + (purified - x).detach()  # forward: the purification; backward: the identity
        else:
            out = self.purifier.purify_differentiable(x, key, checkpoint=self.checkpoint)
        return _StraightThroughRound.apply(out)

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.purify(x01))
