"""Training throughput of the `small` recipes: fp32 eager vs bf16 autocast vs torch.compile.

Times whole optimizer steps (forward, backward, update; for the EBM the 25
Langevin steps of the negative chain as well) on Fashion-MNIST-shaped random
data and prints samples/s per mode, the speed-up over fp32 eager, and for
torch.compile the one-off compile time, so that "where it pays" is a number:
compile pays once (compile seconds) < (steps of the run) x (seconds saved per step).

    python benchmarks/training_speed.py --models ddpm classifier --steps 10 [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from puregen.engine.schedule import DDPMSchedule
from puregen.models.classifiers import build_classifier
from puregen.models.ebm import EBM, EBMConfig
from puregen.models.unet import UNet2D
from puregen.models.unet_config import UNetConfig
from puregen.training.ddpm import DDPMRecipe, ddpm_loss
from puregen.training.ebm import EBMRecipe, short_run
from puregen.training.loop import autocast
from puregen.training.state import step_generator


def _step_fn(kind: str, precision: str, compiled: bool):
    torch.manual_seed(0)
    if kind == "ddpm":
        recipe = DDPMRecipe.preset("small")
        model = UNet2D(UNetConfig.from_dict(recipe.unet))
        batch, schedule = recipe.batch_size, DDPMSchedule()
    elif kind == "ebm":
        recipe = EBMRecipe.preset("small")
        model = EBM(EBMConfig(in_channels=1, nf=recipe.nf))
        batch = recipe.batch_size
    else:
        model, batch = build_classifier("small-cnn", 1, 10), 128
        if precision == "bf16":  # as train_classifier does
            model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    x = torch.rand(batch, 1, 28, 28) * 2 - 1
    if kind == "classifier" and precision == "bf16":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))

    def step(i: int) -> None:
        g = step_generator(0, i)
        if kind == "ddpm":
            loss = ddpm_loss(net, x, schedule, 250, g, precision)
        elif kind == "ebm":
            neg = short_run(net, x, recipe.langevin_steps, recipe.drift, recipe.eps, g, precision)
            with autocast(precision):
                loss = (net(x).float().mean() - net(neg).float().mean()) / recipe.temp
        else:
            with autocast(precision):
                loss = F.cross_entropy(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, batch


def measure(kind: str, precision: str, compiled: bool, steps: int) -> dict:
    step, batch = _step_fn(kind, precision, compiled)
    t0 = time.perf_counter()
    step(0)  # warm-up (and the compile)
    first = time.perf_counter() - t0
    times = []
    for i in range(1, steps + 1):
        t0 = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - t0)
    per_step = statistics.median(times)
    return {"samples_per_s": batch / per_step, "step_s": per_step, "first_step_s": first}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["classifier", "ddpm", "ebm"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (fp32 and bf16)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    modes = [("fp32", False), ("bf16", False)] + ([("fp32", True), ("bf16", True)] if args.compile else [])
    for kind in args.models:
        base = None
        for precision, compiled in modes:
            r = measure(kind, precision, compiled, args.steps)
            base = base or r["step_s"]
            label = f"{precision}{' + compile' if compiled else ''}"
            extra = f", first step {r['first_step_s']:.1f} s" if compiled else ""
            print(f"{kind:10s} {label:16s} {r['samples_per_s']:8.1f} samples/s  x{base / r['step_s']:.2f}{extra}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
