"""Rank EBM checkpoints by how much of an unknown trigger they would let through.

    python scripts/rank_ebm_checkpoints.py CKPT [CKPT ...] [--data ../shared/data/fashion-mnist] \
        [--images 64] [--pattern-seed 12345] [--with-demo-trigger] [--ddpm [CKPT]]

A defender cannot tune on the attack, so each checkpoint is scored on random
sign patterns at the full 16/255 budget (`retention.random_sign_triggers`),
purified at the published 150 steps on the first test images; lower is
better, provided the clean images' change stays small. `--with-demo-trigger`
adds the demo trigger's retention, for the record only. docs/demo.md
("Weight averaging") used the defaults with `--with-demo-trigger`.
`--ddpm` adds a reference row: the DDPM (the shipped one, or CKPT) at the
demo's t* = 75, scored the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from puregen.api import load_purifier
from puregen.data import read_dataset
from puregen.evaluation.datasets import default_fashion_mnist_root
from puregen.evaluation.demo import DEMO_TRIGGER
from puregen.evaluation.retention import random_sign_triggers, retention_of_triggers
from puregen.evaluation.triggers import shipped_trigger


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="*", help="EBM checkpoint folders (config.json + model.safetensors)")
    ap.add_argument("--data", default=str(default_fashion_mnist_root()))
    ap.add_argument("--images", type=int, default=64, help="first N test images")
    ap.add_argument("--pattern-seed", type=int, default=12345)
    ap.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--with-demo-trigger", action="store_true")
    ap.add_argument("--ddpm", nargs="?", const="shipped", metavar="CKPT",
                    help="also score a DDPM at t* = 75 (default: the shipped one)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    images = read_dataset(f"{args.data}/t10k-images-idx3-ubyte.gz").images[: args.images]
    triggers = random_sign_triggers(images.shape[1:], 16 / 255, seed=args.pattern_seed)
    n_random = len(triggers)
    if args.with_demo_trigger:
        triggers.append(shipped_trigger(DEMO_TRIGGER))
    rows = [("ebm", ckpt) for ckpt in args.checkpoints] + ([("ddpm", args.ddpm)] if args.ddpm else [])
    for method, ckpt in rows:
        t0 = time.perf_counter()
        network = {"ebm": ckpt} if method == "ebm" else {"ddpm": None if ckpt == "shipped" else ckpt}
        purifier = load_purifier(method, preset="paper", threads=args.threads, precision=args.precision, **network)
        r = retention_of_triggers(purifier, images, triggers)
        random = r["retention"][:n_random]
        row = {"method": method, "checkpoint": ckpt, "random": [round(x, 3) for x in random],
               "random_mean": round(sum(random) / n_random, 3),
               "clean_change_rms_levels": round(r["clean_change_rms_levels"], 1),
               "seconds": round(time.perf_counter() - t0, 1)}
        if args.with_demo_trigger:
            row["demo"] = round(r["retention"][n_random], 3)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
