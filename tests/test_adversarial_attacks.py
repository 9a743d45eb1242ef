"""The adaptive attacks of the test-time evaluation on tiny problems with known answers: PGD reaches the
optimal L-inf attack on a linear model, EOT averages the gradients of the model's calls, APGD-CE/DLR from
torchattacks stays in budget and breaks an undefended linear model, and the judgement's Wilson interval."""

import pytest
import torch

from puregen.errors import InputError
from puregen.evaluation.adversarial.attacks import apgd_eot, eot_gradient, judge, pgd_eot
from puregen.evaluation.report import wilson_interval as wilson


class _Linear2(torch.nn.Module):
    """Logits (w . x + b, 0): the margin falls by at most eps ||w||_1 in an L-inf ball of radius eps."""

    def __init__(self, w, b):
        super().__init__()
        self.w, self.b = w, b

    def forward(self, x):
        s = (x.flatten(1) * self.w).sum(1) + self.b
        return torch.stack([s, torch.zeros_like(s)], 1)


def test_pgd_reaches_the_optimal_linf_attack_on_a_linear_model():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, generator=g)
    x = torch.rand((5, 1, 4, 4), generator=g) * 0.4 + 0.3  # inside [0.3, 0.7]: the box never binds at eps 0.05
    model = _Linear2(w, b=3.0)
    eps = 0.05
    adv = pgd_eot(model, x, torch.zeros(5, dtype=torch.long), eps, steps=10)
    margin = model(adv)[:, 0]
    optimal = model(x)[:, 0] - eps * w.abs().sum()
    assert (adv - x).abs().max() <= eps + 1e-7
    assert torch.allclose(margin, optimal, atol=1e-5)  # the optimum: every pixel at -eps sign(w)


def test_eot_averages_the_gradients_of_successive_calls():
    class Noisy(torch.nn.Module):
        """A stochastic model: call k multiplies its weights by a noise draw k (a counter, like fresh keys)."""

        def __init__(self):
            super().__init__()
            self.calls, self.w = 0, torch.randn(16, 3, generator=torch.Generator().manual_seed(1))

        def forward(self, x):
            g = torch.Generator().manual_seed(100 + self.calls)
            self.calls += 1
            return x.flatten(1) @ (self.w * (1 + torch.randn(self.w.shape, generator=g)))

    x, y = torch.rand((4, 1, 4, 4)), torch.tensor([0, 1, 2, 0])
    averaged = eot_gradient(Noisy(), x, y, eot=5)
    model, single = Noisy(), []
    for _ in range(5):
        xv = x.clone().requires_grad_(True)
        single.append(torch.autograd.grad(torch.nn.functional.cross_entropy(model(xv), y, reduction="sum"), xv)[0])
    assert torch.allclose(averaged, torch.stack(single).mean(0), atol=1e-6)
    assert not torch.allclose(single[0], single[1])  # the draws differ: EOT has something to average


def test_apgd_ce_then_dlr_breaks_an_undefended_linear_model_within_budget():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    x = torch.rand((12, 1, 8, 8))
    y = model(x).argmax(1)  # every image classified correctly before the attack
    adv = apgd_eot(model, x, y, 0.3, steps=20)
    assert (adv - x).abs().max() <= 0.3 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert judge(model, adv, y).accuracy < 0.2 < judge(model, x, y).accuracy


def test_the_judgement_and_its_interval():
    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)  # the textbook values
    assert wilson(0, 20)[0] == 0 and wilson(0, 20)[1] == pytest.approx(0.161, abs=1e-3)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    x, y = torch.rand((10, 1, 2, 2)), torch.zeros(10, dtype=torch.long)
    j = judge(model, x, y, draws=3)
    assert j.images == 10 and j.draws == 3 and j.low <= j.accuracy <= j.high
    with pytest.raises(InputError, match="in \\[0, 1\\]"):
        pgd_eot(model, x * 3, y, 0.1)
    with pytest.raises(InputError, match="budget"):
        pgd_eot(model, x, y, 0.0)
