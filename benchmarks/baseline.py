"""Speed baseline of the reference engine (`torch` backend, fp32 eager).

Times `--method ebm` (150 Langevin steps) and `--method ddpm` (t* = 75) with
the `paper` architectures (random weights: the cost does not depend on them)
on non-constant 32x32x3 images, one purifier call per batch, and reports the
median over batches of images/s, achieved FLOP/s (counted from the
architecture), and the fraction of the machine's fp32 convolution ceiling,
measured in the same run. The fast-path work compares itself with these numbers.

    python benchmarks/baseline.py --methods ebm ddpm --batch 64 --repeats 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch

from puregen.api import load_purifier
from puregen.bench.flops import count_ebm_flops, count_unet_flops
from puregen.bench.measure import conv_ceiling, benchmark_images
from puregen.engine.provenance import run_provenance
from puregen.models import ebm as ebm_module
from puregen.models.unet import UNet2D
from puregen.models.unet_config import UNetConfig

PUBLISHED_SECONDS_CIFAR10 = {"ebm": 923.0, "ddpm": 4181.0}  # PureGen on a TPU, 50,000 images


def flops_per_image(network: str, evaluations: int) -> float:
    """FLOPs per image of `evaluations` steps of the one network (`ebm` or `unet`) a timed method runs."""
    if network == "ebm":
        fwd = count_ebm_flops(ebm_module.EBMConfig.paper(), 32, 32)
        # each step: forward + input-gradient backward (~ one more forward); plus the two audit energies
        return evaluations * 2 * fwd + 2 * fwd
    fwd = count_unet_flops(UNetConfig.paper(), 32, 32)
    return evaluations * fwd


def build(method: str, micro_batch: int, threads: int):
    torch.manual_seed(0)
    if method == "ebm":
        model = ebm_module.EBM(ebm_module.EBMConfig.paper())
        return load_purifier("ebm", ebm=model, preset="paper", micro_batch=micro_batch, threads=threads)
    model = UNet2D(UNetConfig.paper())
    return load_purifier("ddpm", ddpm=model, preset="paper", micro_batch=micro_batch, threads=threads)


def run(method: str, batch: int, repeats: int, micro_batch: int, threads: int) -> dict:
    purifier = build(method, micro_batch, threads)
    times = []
    for r in range(repeats):
        images = benchmark_images(batch, seed=r)
        indices = np.arange(r * batch, (r + 1) * batch)
        t0 = time.perf_counter()
        purifier.purify(images, seed=0, indices=indices, batch_size=batch)
        times.append(time.perf_counter() - t0)
        print(f"  {method} batch {r + 1}/{repeats}: {times[-1]:.1f} s", file=sys.stderr, flush=True)
    median = statistics.median(times)
    steps = purifier.algorithm.network_evaluations()
    flops = flops_per_image(purifier.algorithm.networks[0], steps)
    ips = batch / median
    published_ips = 50_000 / PUBLISHED_SECONDS_CIFAR10[method]
    return {
        "method": method,
        "steps": steps,
        "batch": batch,
        "micro_batch": micro_batch,
        "threads": threads,
        "seconds_per_batch": [round(t, 3) for t in times],
        "median_seconds": round(median, 3),
        "images_per_second": round(ips, 4),
        "flop_per_image": flops,
        "achieved_flop_per_second": ips * flops,
        "published_tpu_images_per_second": round(published_ips, 2),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=["ebm", "ddpm"], choices=["ebm", "ddpm"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    ceiling = conv_ceiling()
    print(f"fp32 conv ceiling (3x3 128->128, b64, 32x32, channels_last): {ceiling / 1e9:.1f} GFLOP/s")
    results = []
    for method in args.methods:
        res = run(method, args.batch, args.repeats, args.micro_batch, args.threads)
        res["ceiling_flop_per_second"] = ceiling
        res["fraction_of_ceiling"] = res["achieved_flop_per_second"] / ceiling
        results.append(res)
        print(
            f"{method}: {res['images_per_second']:.3f} images/s (median of {args.repeats} batches of {args.batch}, "
            f"{args.threads} threads), {res['achieved_flop_per_second'] / 1e9:.1f} GFLOP/s achieved, "
            f"{100 * res['fraction_of_ceiling']:.0f}% of the fp32 conv ceiling; published TPU: "
            f"{res['published_tpu_images_per_second']} images/s"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "provenance": run_provenance()}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
