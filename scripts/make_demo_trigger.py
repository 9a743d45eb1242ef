"""Craft the demo's clean-label trigger once and ship it with the package.

    python scripts/make_demo_trigger.py [--data ../shared/data/fashion-mnist] [--target 8] [--ship]

The attacker's knowledge: scikit-learn's digits (public out-of-distribution
data) and its own labelled Fashion-MNIST images, the last 10,000 of the
training file (the demo's victim draws its subset from the first 50,000).

1. Narcissus trigger (16/255) for the target class from the digits and the
   attacker's target-class images (`puregen.evaluation.attacks.narcissus`).
2. A reference classifier on the attacker's images 50,000-54,999 ranks its
   target-class images 55,000-59,999 from least to most target-like
   (`attacks.selection`); the 100 hardest are stored with the trigger as the
   images the attacker contributes.

Writes scratch/demo-trigger/ (or, with --ship, puregen/assets/triggers/).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from puregen.evaluation.attacks.narcissus import NarcissusRecipe, craft_narcissus
from puregen.evaluation.attacks.selection import rank_hardest
from puregen.evaluation.datasets import (
    FASHION_MNIST_CLASSES,
    default_fashion_mnist_root,
    digits_as_images,
    load_fashion_mnist,
)
from puregen.evaluation.demo import DEMO_TRIGGER
from puregen.evaluation.triggers import SHIPPED
from puregen.training.classifier import ClassifierRecipe

REPO = Path(__file__).resolve().parent.parent
ATTACKER_START, REFERENCE_END = 50_000, 55_000
KEEP = 100


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(default_fashion_mnist_root()))
    ap.add_argument("--target", type=int, default=8, help="target class (default 8, Bag)")
    ap.add_argument("--ship", action="store_true", help=f"write to puregen/assets/triggers/{DEMO_TRIGGER}")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    train = load_fashion_mnist(args.data, "train")
    images, labels, t = train.images, train.labels, args.target
    attacker_targets = ATTACKER_START + np.flatnonzero(labels[ATTACKER_START:] == t)
    digits = digits_as_images(images.shape[1])
    trigger = craft_narcissus(digits.images, digits.labels, images[attacker_targets], t, NarcissusRecipe())

    pool = REFERENCE_END + np.flatnonzero(labels[REFERENCE_END:] == t)
    order = rank_hardest(images[ATTACKER_START:REFERENCE_END], labels[ATTACKER_START:REFERENCE_END], images[pool],
                         t, ClassifierRecipe(epochs=10, precision="bf16"))
    trigger.meta.update({
        "dataset": "fashion-mnist", "target_name": FASHION_MNIST_CLASSES[t],
        "pood": "sklearn load_digits, bilinear to 28x28",
        "attacker_images": f"fashion-mnist train rows {ATTACKER_START}..{len(images) - 1}",
        "contributed": {
            "split": "train",
            "indices": [int(i) for i in pool[order[:KEEP]]],
            "ranking": f"least target-like first, by a small CNN (10 epochs) on train rows "
                       f"{ATTACKER_START}..{REFERENCE_END - 1}",
        },
        "command": "python scripts/make_demo_trigger.py" + (f" --target {t}" if t != 8 else ""),
    })
    out = SHIPPED / DEMO_TRIGGER if args.ship else REPO / "scratch" / "demo-trigger"
    trigger.save(out)
    print(f"trigger for class {t} ({FASHION_MNIST_CLASSES[t]}), L-inf {trigger.linf * 255:.2f}/255, "
          f"crafted in {trigger.meta['crafting_seconds']} s; written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
