"""Measure trained runs on held-out data, then ship them as the package's default models.

    python scripts/make_default_models.py [--ebm-run RUN] [--ddpm-run RUN] \
        --data ../shared/data/fashion-mnist [--ship]

Prints (and writes to docs/default-models.json) the acceptance numbers of
`puregen.training.acceptance` and the demo trigger's retention, saves sample
grids under docs/, and with --ship copies the given runs into
puregen/assets/models/. A model whose run is not given is the one already
shipped (measured, not copied).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from puregen.api import load_purifier
from puregen.data import from_model_space, read_dataset, to_model_space
from puregen.evaluation.datasets import default_fashion_mnist_root
from puregen.evaluation.demo import DEMO_TRIGGER
from puregen.evaluation.retention import trigger_retention
from puregen.evaluation.triggers import shipped_trigger
from puregen.evaluation.figures import image_grid
from puregen.models.checkpoints import CONFIG_FILE, WEIGHTS_FILE, load_model
from puregen.models.defaults import default_checkpoint
from puregen.training.acceptance import ddpm_denoising_ratio, ebm_energy_gap
from puregen.training.classifier import ClassifierRecipe, accuracy, train_classifier

REPO = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ebm-run", help="EBM run folder (default: the shipped EBM)")
    ap.add_argument("--ddpm-run", help="DDPM run folder (default: the shipped DDPM)")
    ap.add_argument("--data", default=str(default_fashion_mnist_root()))
    ap.add_argument("--held-out", type=int, default=1000, help="test images used for the measurements")
    ap.add_argument("--ship", action="store_true", help="copy the models into puregen/assets/models/")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    data = Path(args.data)
    test = read_dataset(data / "t10k-images-idx3-ubyte.gz")
    train = read_dataset(data / "train-images-idx3-ubyte.gz")
    held_u8 = test.images[: args.held_out]
    held = to_model_space(held_u8)
    ebm = load_model(args.ebm_run or default_checkpoint("ebm"), expect="ebm").model
    unet = load_model(args.ddpm_run or default_checkpoint("unet"), expect="unet").model
    report: dict = {"held_out_images": args.held_out, "data": str(data)}

    t0 = time.perf_counter()
    gap = ebm_energy_gap(ebm, held[:256])
    samples = gap.pop("samples")
    report["ebm_energy_gap"] = gap
    image_grid(from_model_space(samples[:64]).numpy(), 8).save(REPO / "docs" / "ebm-short-run-samples.png")

    report["ddpm_t75"] = ddpm_denoising_ratio(unet, held)

    recipe = dataclasses.replace(ClassifierRecipe.preset("small"), epochs=4)
    clf = train_classifier(to_model_space(train.images[:20000]), torch.from_numpy(train.labels[:20000]), 10,
                           recipe, progress=False)
    labels = torch.from_numpy(test.labels[: args.held_out])
    purifier = load_purifier("ebm", ebm=ebm, preset="paper", threads=2)
    purified = purifier.purify(held_u8, seed=0)
    acc_clean = accuracy(clf, held, labels)
    acc_ebm = accuracy(clf, to_model_space(purified), labels)
    ddpm = load_purifier("ddpm", ddpm=unet, preset="paper", threads=2)
    denoised = ddpm.purify(held_u8[:256], seed=0)
    acc_ddpm = accuracy(clf, to_model_space(denoised), labels[:256])
    report["classifier"] = {
        "train_images": 20000, "epochs": recipe.epochs, "accuracy_clean": acc_clean,
        "accuracy_ebm_purified_150_steps": acc_ebm, "retention_ebm": acc_ebm / acc_clean,
        "accuracy_ddpm_purified_t75_first_256": acc_ddpm,
    }
    trigger = shipped_trigger(DEMO_TRIGGER)
    report["demo_trigger_retention_ebm_150_steps_first_256"] = trigger_retention(purifier, held_u8[:256], trigger)
    report["demo_trigger_retention_ddpm_t75_first_256"] = trigger_retention(ddpm, held_u8[:256], trigger)
    rows = np.concatenate([held_u8[:16], purified[:16], denoised[:16]])
    image_grid(rows, 3).save(REPO / "docs" / "purification-examples.png")
    report["seconds"] = round(time.perf_counter() - t0, 1)
    (REPO / "docs" / "default-models.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))

    if args.ship:
        for run, name in ((args.ebm_run, "fashion-mnist-ebm"), (args.ddpm_run, "fashion-mnist-ddpm")):
            if run is None:
                continue
            dest = REPO / "puregen" / "assets" / "models" / name
            dest.mkdir(parents=True, exist_ok=True)
            for f in (CONFIG_FILE, WEIGHTS_FILE):
                shutil.copy2(Path(run) / f, dest / f)
            state = json.loads((Path(run) / "training_state.json").read_text())
            meta = {k: state[k] for k in ("step", "recipe", "data_source", "data_fingerprint", "history")}
            (dest / "training.json").write_text(json.dumps(meta, indent=1) + "\n")
        print("shipped to puregen/assets/models/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
