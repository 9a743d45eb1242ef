"""Time D-VAE training steps of a preset on random 28x28x1 images (for the cost in docs/dvae.md).

    python scripts/time_dvae_fit.py --preset small --steps 5 --threads 2
"""

import argparse
import time

import torch

from puregen.models.dvae import DVAE
from puregen.training.dvae import DVAERecipe, dvae_loss


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--images", type=int, default=10_000, help="dataset size the estimate is for")
    p.add_argument("--side", type=int, default=28)
    p.add_argument("--channels", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    recipe = DVAERecipe.preset(args.preset)
    x = torch.rand(recipe.batch_size, args.channels, args.side, args.side)
    y = torch.arange(recipe.batch_size) % 10
    model = DVAE(recipe.model_config(x, 10))
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    g = torch.Generator().manual_seed(0)
    times = []
    for step in range(args.steps + 1):
        t0 = time.perf_counter()
        loss, _ = dvae_loss(model, x, y, g, tau=1.0, epoch=step, recipe=recipe)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    per_step = sorted(times[1:])[len(times[1:]) // 2]  # the first step warms up
    total_steps = 2 * recipe.steps_per_stage(args.images)
    print(f"{args.preset}: {per_step:.3f} s/step of {recipe.batch_size}; 2 stages x {recipe.epochs} epochs = "
          f"{total_steps} steps -> {per_step * total_steps / 60:.1f} min for {args.images} images")


if __name__ == "__main__":
    main()
