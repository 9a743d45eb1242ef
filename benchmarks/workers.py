"""One process with N threads against N one-thread worker processes (`puregen.engine.workers`).

Purifies real Fashion-MNIST test images with the shipped default models, fp32
eager, once in this process with `--threads` threads (the reference) and once
in `--threads` worker processes of one thread each (start-up included), and
prints for both: images/s, achieved FLOP/s (counted from the architectures),
the fraction of the fp32 convolution ceiling measured in the same run, and
the workers' speed-up over the reference.

    python -m benchmarks.workers --images 256 --ebm-steps 150 --t-star 40
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from puregen.bench.flops import count_ebm_flops, count_unet_flops
from puregen.bench.measure import conv_ceiling
from puregen.engine.factory import load_purifier
from puregen.engine.workers import purify_in_workers
from puregen.evaluation.datasets import default_fashion_mnist_root, load_fashion_mnist


def flops_per_image(purifier, method: str, steps: int) -> float:
    if purifier.algorithm.networks == ("ebm",):
        return 2 * count_ebm_flops(purifier.evaluator.ebm.config, 28, 28) * steps  # forward + input grad
    return count_unet_flops(purifier.evaluator.unet.config, 28, 28) * steps


def workload_arguments(description: str, micro_batch: int) -> argparse.ArgumentParser:
    """The options of the benchmarks that purify Fashion-MNIST test images with the shipped models."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--ebm-steps", type=int, default=150)
    ap.add_argument("--t-star", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=micro_batch)
    ap.add_argument("--json", help="also write the results here")
    return ap


def measured_row(method: str, setup: str, images: int, seconds: float, flops: float, ceiling: float,
                 **extra) -> dict:
    """One row of a benchmark table: images/s, achieved FLOP/s and the fraction of the ceiling, plus `extra`."""
    return {"method": method, "setup": setup, "images_per_s": images / seconds, "gflop_per_s": flops / seconds / 1e9,
            "ceiling_fraction": flops / seconds / ceiling, **extra}


def report(rows: list[dict], ceiling: float, extra: dict[str, tuple[str, str]], args) -> None:
    """Print the ceiling and the table (the common columns, then `extra`: header -> (row key, format)), and
    write the JSON that `--json` names."""
    print(f"fp32 conv ceiling (3x3, 128->128, batch 64, 32x32, channels_last): {ceiling / 1e9:.1f} GFLOP/s")
    headers = ["method", "setup", "images/s", "GFLOP/s", "of ceiling", *extra]
    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for r in rows:
        cells = [r["method"], r["setup"], f"{r['images_per_s']:.2f}", f"{r['gflop_per_s']:.1f}",
                 f"{r['ceiling_fraction']:.0%}", *(fmt.format(r[key]) for key, fmt in extra.values())]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ceiling_flop_per_s": ceiling, "rows": rows, "args": vars(args)}, f, indent=2)


def main(argv=None) -> int:
    args = workload_arguments(__doc__.split("\n\n")[0], micro_batch=64).parse_args(argv)
    torch.set_num_threads(args.threads)
    images = load_fashion_mnist(default_fashion_mnist_root(), "test").images[: args.images]
    ceiling = conv_ceiling("fp32")
    rows = []
    for method, overrides, steps in (("ebm", {"steps": args.ebm_steps}, args.ebm_steps),
                                     ("ddpm", {"t_star": args.t_star}, args.t_star)):
        options = {"micro_batch": args.micro_batch, **overrides}
        purifier = load_purifier(method, threads=args.threads, **options)
        purifier.purify(images[: args.micro_batch], seed=0)  # warm-up
        t0 = time.perf_counter()
        purifier.purify(images, seed=0)
        in_process = time.perf_counter() - t0
        t0 = time.perf_counter()
        purify_in_workers(method, images, seed=0, workers=args.threads, threads_per_worker=1,
                          batch_size=args.micro_batch, progress=False, **options)
        in_workers = time.perf_counter() - t0
        flops = flops_per_image(purifier, method, steps) * len(images)
        for label, seconds in ((f"1 process x {args.threads} threads", in_process),
                               (f"{args.threads} workers x 1 thread", in_workers)):
            rows.append(measured_row(method, label, len(images), seconds, flops, ceiling,
                                     speedup_vs_one_process=in_process / seconds))
    report(rows, ceiling, {"vs one process": ("speedup_vs_one_process", "{:.2f}x")}, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
