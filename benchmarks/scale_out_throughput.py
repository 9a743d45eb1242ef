"""The Ray Data path and `PurifiedDataset` against the single-process pipeline, on this machine, in one run.

Purifies real Fashion-MNIST test images with the shipped default models, fp32 eager, three ways:
- `puregen.api.purify_dataset` in this process with `--threads` threads (the reference);
- `purify_ray_dataset` on a local Ray cluster with `--actors` actors of one thread each (half a CPU
  each: Ray Data's own tasks need a share), start-up of the actors included, end to end from the
  arrays to the collected rows;
- `PurifiedDataset` through a `DataLoader` with `--actors` workers of one thread each, one epoch,
  with an empty cache (worker start-up included).
Prints for each: images/s, achieved FLOP/s (counted from the architectures), the fraction of the
fp32 convolution ceiling measured in the same run, the ratio to the reference, and whether the
bytes equal the reference's.

    python -m benchmarks.scale_out_throughput --images 256 --ebm-steps 150 --t-star 40
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.workers import flops_per_image, measured_row, report, workload_arguments
from puregen.api import load_purifier, purify_dataset
from puregen.bench.measure import conv_ceiling
from puregen.data import read_dataset, write_dataset
from puregen.evaluation.datasets import default_fashion_mnist_root, load_fashion_mnist
from puregen.ingest import PurifiedDataset


def main(argv=None) -> int:
    ap = workload_arguments(__doc__.split("\n\n")[0], micro_batch=16)
    ap.add_argument("--actors", type=int, default=2)
    args = ap.parse_args(argv)
    import ray

    from puregen.distributed.ray_data import purify_ray_dataset

    torch.set_num_threads(args.threads)
    images = load_fashion_mnist(default_fashion_mnist_root(), "test").images[: args.images]
    ceiling = conv_ceiling("fp32")
    ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_dataset(Path(tmp) / "in.npz", images)
        for method, options, steps in (("ebm", {"steps": args.ebm_steps}, args.ebm_steps),
                                       ("ddpm", {"t_star": args.t_star}, args.t_star)):
            t0 = time.perf_counter()
            purify_dataset(Path(tmp) / "in.npz", Path(tmp) / f"{method}.npz", method, threads=args.threads,
                           micro_batch=args.micro_batch, progress=False, **options)
            reference = time.perf_counter() - t0
            expected = read_dataset(Path(tmp) / f"{method}.npz").images
            items = [{"image": img, "index": i} for i, img in enumerate(images)]
            t0 = time.perf_counter()
            out = purify_ray_dataset(ray.data.from_items(items), method, concurrency=args.actors, num_cpus=0.5,
                                     threads=1, batch_size=args.micro_batch, micro_batch=args.micro_batch, **options)
            got = np.stack([r["image"] for r in sorted(out.take_all(), key=lambda r: r["index"])])
            on_ray = time.perf_counter() - t0
            loaded = load_purifier(method, threads=1, micro_batch=args.micro_batch, **options)
            wrapped = PurifiedDataset(list(images), loaded, cache=Path(tmp) / f"cache-{method}",
                                      block_size=args.micro_batch)
            loader = torch.utils.data.DataLoader(wrapped, batch_size=args.micro_batch, num_workers=args.actors,
                                                 collate_fn=lambda items: np.stack(items))
            t0 = time.perf_counter()
            from_loader = np.concatenate(list(loader))
            in_loader = time.perf_counter() - t0
            flops = flops_per_image(load_purifier(method, **options), method, steps) * len(images)
            # The reference runs at --threads threads, the actors and loader workers at one: the thread count
            # is part of a job's fingerprint, and equal bytes are checked, not assumed.
            for label, seconds, result in (
                    (f"pipeline, 1 process x {args.threads} threads", reference, expected),
                    (f"Ray Data, {args.actors} actors x 1 thread", on_ray, got),
                    (f"PurifiedDataset, {args.actors} loader workers x 1 thread", in_loader, from_loader)):
                same = bool(np.array_equal(result.reshape(expected.shape), expected))
                rows.append(measured_row(method, label, len(images), seconds, flops, ceiling,
                                         vs_pipeline=reference / seconds, bytes_equal_to_pipeline=same))
    ray.shutdown()
    report(rows, ceiling, {"vs pipeline": ("vs_pipeline", "{:.2f}x"),
                           "same bytes": ("bytes_equal_to_pipeline", "{}")}, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
