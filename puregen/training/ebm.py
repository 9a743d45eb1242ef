"""EBM training by maximum likelihood with a persistent bank of short-run Langevin samples.

The published recipe: positive samples are data with Gaussian jitter (0.015);
negative samples come from a persistent bank, each refreshed by K Langevin
steps with the same update as purification (eps, temp); before each update 5%
of the drawn bank entries are re-initialised from noisy data; the loss is
``(E(pos) - E(neg)) / temp``; Adam with step decay. The bank is saved with
every checkpoint, so a run resumes exactly.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError
from ..models.ebm import EBM, EBMConfig
from .loop import (
    Progress,
    StopSignals,
    TrainingData,
    autocast,
    batch_indices,
    ema_tensors,
    ema_update,
    open_run,
    prepare_run,
    restore_ema,
    save_run,
    set_lr,
    stop_step,
)
from .state import step_generator, write_snapshot


@dataclass
class EBMRecipe:
    steps: int = 2400
    batch_size: int = 64
    lr: float = 2e-4
    lr_decay_at: tuple[int, ...] = (2000,)
    lr_decay: float = 0.1
    langevin_steps: int = 25
    eps: float = 1.25e-2
    temp: float = 1e-4
    data_jitter: float = 0.015
    bank_size: int = 10_000
    reinit_frac: float = 0.05
    nf: int = 32
    in_channels: int = 1
    seed: int = 0
    # "bf16": autocast the network; samples, bank and update stay fp32. "auto": bf16 where the CPU has it
    # natively, else fp32, as for purification; fixed when the run starts and recorded in its recipe.
    precision: str = "fp32"
    # An exponential moving average of the weights, saved as the run's model when set. Maximum-likelihood
    # training wanders from checkpoint to checkpoint as the model chases its own sample bank; the average
    # damps that. The negative samples always come from the raw weights, as the recipe defines them.
    ema_decay: float | None = None

    @classmethod
    def preset(cls, name: str, in_channels: int = 1) -> EBMRecipe:
        if name == "small":
            # The shipped Fashion-MNIST EBM's recipe. Against the first shipped one (lr 2e-4, 25 Langevin steps
            # per update, lr x0.1 at step 2000, fp32) it kept 0.39 instead of 0.65 of the demo trigger through
            # 150 purification steps (docs/default-models.md).
            # Its bf16 is "auto": emulated bf16 (a CPU without AVX512-BF16 or AMX) is several times slower.
            return cls(lr=5e-4, langevin_steps=20, lr_decay_at=(), precision="auto", in_channels=in_channels)
        if name == "tiny":
            return cls(steps=6, batch_size=8, langevin_steps=3, bank_size=32, nf=8, lr_decay_at=(4,),
                       in_channels=in_channels)
        if name == "paper":
            return cls(steps=100_000, batch_size=100, lr=1e-4, langevin_steps=100, nf=128, bank_size=10_000,
                       lr_decay_at=(60_000, 90_000), in_channels=in_channels)
        raise InputError(f"unknown EBM training preset {name!r}; choose small, tiny or paper")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lr_decay_at"] = list(self.lr_decay_at)
        if d["ema_decay"] is None:  # runs written before the option existed resume unchanged
            del d["ema_decay"]
        return d

    @property
    def drift(self) -> float:
        return self.eps**2 / (2 * self.temp)


def _noisy_data(data: TrainingData, n: int, jitter: float, g: torch.Generator) -> torch.Tensor:
    idx = torch.randint(0, len(data), (n,), generator=g)
    return data.images[idx] + jitter * torch.randn((n, *data.images.shape[1:]), generator=g)


def short_run(ebm: EBM, x: torch.Tensor, steps: int, drift: float, eps: float, g: torch.Generator,
              precision: str = "fp32") -> torch.Tensor:
    """K Langevin steps, the purification update, with gradients for the input only."""
    for _ in range(steps):
        x = x.detach().requires_grad_(True)
        with autocast(precision):
            energy = ebm(x).float().sum()
        (grad,) = torch.autograd.grad(energy, x)
        x = x.detach() - drift * grad.float() + eps * torch.randn(x.shape, generator=g)
    return x.detach()


def train_ebm(
    data: TrainingData,
    run_dir: str | Path,
    recipe: EBMRecipe,
    *,
    resume: bool = False,
    checkpoint_every: int = 100,
    progress: bool = True,
    max_steps_this_call: int | None = None,
    keep_every: int | None = None,
) -> dict:
    """Train (or continue training) an EBM; returns the final info. The run folder is a checkpoint.

    `keep_every` also keeps the model every that many steps in `RUN.snapshots/` (with an EMA, the raw
    weights too, as `step-N-raw`), so that checkpoints can be compared afterwards: maximum-likelihood
    training wanders, and the last step need not be the best purifier.
    """
    run_dir = Path(run_dir)
    if recipe.ema_decay is not None and not 0.0 < recipe.ema_decay < 1.0:
        raise InputError(f"the EMA decay must lie in (0, 1), got {recipe.ema_decay}")
    if keep_every is not None and keep_every < 1:
        raise InputError(f"the snapshot interval (--keep-every) must be a positive number of steps, got {keep_every}")
    if recipe.bank_size < recipe.batch_size:
        raise InputError(f"the sample bank ({recipe.bank_size}) must hold at least one batch ({recipe.batch_size})")
    if data.images.shape[1] != recipe.in_channels:
        raise InputError(f"{data.source}: images have {data.images.shape[1]} channels, the EBM expects {recipe.in_channels}")
    recipe = prepare_run(run_dir, recipe, resume=resume)
    torch.manual_seed(recipe.seed)
    ebm = EBM(EBMConfig(in_channels=recipe.in_channels, nf=recipe.nf))
    opt = torch.optim.Adam(ebm.parameters(), lr=recipe.lr)
    start, history, extra = open_run(run_dir, resume=resume, model=ebm, optimizer=opt, recipe=recipe.to_dict(),
                                     data=data)
    if "bank" in extra:
        bank = extra["bank"]
    else:  # step -1: the bank's initial draw, disjoint from every training step's generator
        bank = _noisy_data(data, recipe.bank_size, recipe.data_jitter, step_generator(recipe.seed, -1))
    ema = None
    if recipe.ema_decay is not None:
        ema = copy.deepcopy(ebm).requires_grad_(False)
        if start:
            restore_ema(ema, extra)

    def save(step: int, keep: bool) -> None:
        tensors = {"bank": bank}
        if ema is not None:
            tensors.update(ema_tensors(ema))
        save_run(run_dir, "ebm", recipe.to_dict(), data, history, step=step, model=ebm, optimizer=opt,
                 export_model=ema, extra_tensors=tensors)
        if keep:
            write_snapshot(run_dir, step, ema if ema is not None else ebm)
            if ema is not None:
                write_snapshot(run_dir, step, ebm, suffix="-raw")

    stop = stop_step(start, recipe.steps, max_steps_this_call)
    bar = Progress(recipe.steps, start, "train ebm", recipe.batch_size, progress)
    running = None
    with StopSignals() as signals, contextlib.closing(bar):
        for step in range(start, stop):
            g = step_generator(recipe.seed, step)
            set_lr(opt, recipe.lr * recipe.lr_decay ** sum(step >= s for s in recipe.lr_decay_at))
            pos_idx = batch_indices(len(data), recipe.batch_size, step, recipe.seed)
            pos = data.images[pos_idx] + recipe.data_jitter * torch.randn(
                (len(pos_idx), *data.images.shape[1:]), generator=g)
            # Distinct slots: with repeats, `bank[slots] = neg` keeps whichever write lands last, which varies
            # between threaded runs and broke exact resumption (seen as a flaky resume test).
            slots = torch.randperm(recipe.bank_size, generator=g)[: recipe.batch_size]
            neg = bank[slots].clone()
            fresh = torch.rand(recipe.batch_size, generator=g) < recipe.reinit_frac
            if fresh.any():
                neg[fresh] = _noisy_data(data, int(fresh.sum()), recipe.data_jitter, g)
            neg = short_run(ebm, neg, recipe.langevin_steps, recipe.drift, recipe.eps, g, recipe.precision)
            bank[slots] = neg

            with autocast(recipe.precision):
                loss = (ebm(pos).float().mean() - ebm(neg).float().mean()) / recipe.temp
            if not math.isfinite(loss.item()):
                raise RuntimeError(f"EBM loss became {loss.item()} at step {step}; lower the learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ema is not None:
                ema_update(ema, ebm, recipe.ema_decay)
            gap = -loss.item() * recipe.temp  # E(neg) - E(pos): positive when data sits lower than samples
            running = gap if running is None else 0.98 * running + 0.02 * gap
            bar.update(step, energy_gap=running)
            if (step + 1) % 25 == 0:
                history.append({"step": step + 1, "energy_gap": round(running, 8)})
            keep = bool(keep_every) and (step + 1) % keep_every == 0
            signals.end_of_step(step + 1, stop, run_dir, lambda: save(step + 1, keep),
                                due=keep or (step + 1) % checkpoint_every == 0 or step + 1 == stop)
    return {"step": stop, "history": history, "run_dir": str(run_dir), "precision": recipe.precision}
