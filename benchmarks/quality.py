"""The fast paths' quality bound on real data, with the shipped models.

For the shipped EBM (150 Langevin steps) and DDPM (t* = 75), purifies the
first N Fashion-MNIST test images with the fp32 eager oracle and with each
fast path (same seed and indices, so the same noise) and reports, per path,
the histogram of |uint8 difference|, the mean difference, the share of
pixels within 2 levels and whether the fp32 state stayed finite. The bound:
mean <= 1 level, >= 99% within 2 levels, no NaN. Exit 1 if a path fails.

    python benchmarks/quality.py --num-images 512 --json benchmarks/quality-cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from puregen.bench.quality import compare, default_fast_paths, purify_float, FastPath
from puregen.engine.provenance import run_provenance
from puregen.evaluation.datasets import default_fashion_mnist_root, load_fashion_mnist
from puregen.models.checkpoints import load_model
from puregen.models.defaults import default_checkpoint


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-images", type=int, default=512)
    ap.add_argument("--methods", nargs="+", default=["ebm", "ddpm"], choices=["ebm", "ddpm"])
    ap.add_argument("--paths", nargs="+", help="fast paths to check (default: all for the device)")
    ap.add_argument("--micro-batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=str(default_fashion_mnist_root()))
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    images = load_fashion_mnist(args.data, "test").images[: args.num_images]
    ebm = load_model(default_checkpoint("ebm"), expect="ebm").model
    unet = load_model(default_checkpoint("unet"), expect="unet").model
    paths: list[FastPath] = default_fast_paths(device)
    if args.paths:
        paths = [p for p in paths if p.name in args.paths]
    results, ok = [], True
    for method in args.methods:
        nets = (ebm, None) if method == "ebm" else (None, unet)
        run = lambda p: purify_float(  # noqa: E731
            method, *nets, p, images, seed=args.seed, micro_batch=args.micro_batch, device=device
        )
        t0 = time.perf_counter()
        oracle = run(FastPath("oracle", "fp32", "torch", False))
        print(f"{method}: fp32 eager oracle on {len(images)} images: {time.perf_counter() - t0:.1f} s", flush=True)
        for path in paths:
            t0 = time.perf_counter()
            stats = compare(oracle, run(path))
            stats.update(method=method, path=path.name, seconds=round(time.perf_counter() - t0, 1))
            results.append(stats)
            ok &= stats["passes"]
            print(
                f"  {path.name:<14} mean {stats['mean_levels']:.4f} levels, {100 * stats['within_2_levels']:.3f}% within 2, "
                f"max {stats['max_levels']}, finite {stats['finite']}, {'PASS' if stats['passes'] else 'FAIL'} "
                f"({stats['seconds']} s) histogram {stats['histogram']}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"num_images": len(images), "results": results, "provenance": run_provenance()}, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
