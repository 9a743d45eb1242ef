"""Serving example: purify inputs with `diffpure` before a classifier, and see what an attack does to both.

    python scripts/defended_classifier_example.py [--classifier RUN] [--images 32] [--reverse-steps 10]

Without --classifier it first trains a small classifier on 5,000 Fashion-MNIST images (about a minute on two
cores) into runs/example-classifier; `puregen train classifier DATA -o RUN` makes one as well. It then
classifies the first test images clean and under a PGD attack (8/255, EOT over the purifier's noise, the
gradient through the purifier), with and without the purifier in front (docs/adversarial-purification.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from puregen.api import load_purifier
from puregen.data import to_model_space
from puregen.defended import DefendedClassifier
from puregen.evaluation.adversarial.attacks import judge, pgd_eot
from puregen.evaluation.datasets import balanced_subset, default_fashion_mnist_root, load_fashion_mnist
from puregen.models.checkpoints import load_model
from puregen.training.classifier import ClassifierRecipe, train_classifier_run
from puregen.training.loop import TrainingData


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classifier", help="a classifier run folder (default: train one)")
    p.add_argument("--data", default=str(default_fashion_mnist_root()), help="the Fashion-MNIST IDX folder")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--reverse-steps", type=int, default=10, help="diffpure's solver steps (published: 100)")
    p.add_argument("--pgd-steps", type=int, default=10)
    p.add_argument("--eot", type=int, default=4)
    p.add_argument("--epochs", type=int, default=5, help="epochs of the classifier trained when none is given")
    args = p.parse_args()

    if args.classifier is None:
        run = Path("runs/example-classifier")
        if not (run / "model.safetensors").exists():
            train = load_fashion_mnist(args.data, "train")
            keep = balanced_subset(train.labels[:50_000], 500, seed=0)
            images = torch.from_numpy(train.images[keep])
            data = TrainingData(to_model_space(images), torch.from_numpy(train.labels[keep].astype(np.int64)),
                                "example", "Fashion-MNIST, 5,000 training images")
            recipe = ClassifierRecipe(arch="fast-cnn", epochs=args.epochs, crop_padding=0, flip=False)
            train_classifier_run(data, run, recipe, progress=True)
        args.classifier = str(run)
    classifier = load_model(args.classifier, expect="classifier").model.eval()

    # The defended model: float images in [0, 1] in, logits out. Each call draws fresh purification noise.
    purifier = load_purifier("diffpure", reverse_steps=args.reverse_steps)
    defended = DefendedClassifier(purifier, classifier, seed=1)
    plain = DefendedClassifier(None, classifier)

    test = load_fashion_mnist(args.data, "test")
    x = torch.from_numpy(test.images[:args.images]).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(test.labels[:args.images].astype(np.int64))
    for name, model, eot in (("no defense", plain, 1), ("diffpure", defended, args.eot)):
        adv = pgd_eot(model, x, y, 8 / 255, steps=args.pgd_steps, eot=eot)
        # Judge with draws the attack never saw: a module of another seed.
        judge_model = model if model is plain else DefendedClassifier(purifier, classifier, seed=2)
        clean, robust = judge(judge_model, x, y), judge(judge_model, adv, y)
        print(f"{name:>10}: clean {100 * clean.accuracy:5.1f}%, under PGD-{args.pgd_steps} x EOT-{eot} at 8/255 "
              f"{100 * robust.accuracy:5.1f}% [{100 * robust.low:.0f}, {100 * robust.high:.0f}] of {len(y)} images")


if __name__ == "__main__":
    main()
