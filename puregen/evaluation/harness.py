"""The harness: purify a (poisoned) training set, train a classifier per defense and seed, measure.

Natural accuracy is measured on the clean test set. Poison success is the
share of test images *not* of the target class that the model assigns to the
target class once the trigger (times `amplify`) is added to them.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass

import numpy as np
import torch

from ..data import to_model_space
from ..engine.pipeline import image_progress_bar
from ..engine.purifiers import Purifier
from ..training.classifier import ClassifierRecipe, predict, train_classifier
from .triggers import Trigger


def purify_images(purifier: Purifier, images_u8: np.ndarray, *, seed: int, batch_size: int = 64,
                  progress: bool = True, desc: str = "purify") -> np.ndarray:
    """Purify uint8 NHWC images in batches with a progress bar; row i is keyed by index i."""
    bar = image_progress_bar(len(images_u8), desc, progress)
    batches = (images_u8[s : s + batch_size] for s in range(0, len(images_u8), batch_size))
    parts = []
    for out in purifier.purify_stream(batches, seed=seed):
        parts.append(out)
        if bar is not None:
            bar.update(len(out))
    if bar is not None:
        bar.close()
    return np.concatenate(parts)


@dataclass
class Measurement:
    defense: str
    seed: int
    natural_accuracy: float
    poison_success: float
    train_seconds: float


@dataclass
class EvalSet:
    """The clean test images in model space and the triggered non-target ones, built once."""

    clean: torch.Tensor
    labels: torch.Tensor
    triggered: torch.Tensor
    target: int

    @classmethod
    def build(cls, images_u8: np.ndarray, labels: np.ndarray, trigger: Trigger, amplify: float) -> EvalSet:
        others = labels != trigger.target
        return cls(
            clean=to_model_space(images_u8, "test images"),
            labels=torch.from_numpy(labels.astype(np.int64)),
            triggered=to_model_space(trigger.apply(images_u8[others], amplify), "triggered test images"),
            target=trigger.target,
        )


def measure(model, test: EvalSet, precision: str = "fp32") -> tuple[float, float]:
    """(natural accuracy, poison success) of a trained classifier, as fractions."""
    natural = float((predict(model, test.clean, precision=precision) == test.labels).float().mean())
    success = float((predict(model, test.triggered, precision=precision) == test.target).float().mean())
    return natural, success


def _train_and_measure(images: np.ndarray, labels: np.ndarray, name: str, seed: int, test: EvalSet,
                       recipe: ClassifierRecipe, progress: bool, num_classes: int) -> Measurement:
    t0 = time.perf_counter()
    model = train_classifier(to_model_space(images, f"{name} training set"),
                             torch.from_numpy(labels.astype(np.int64)), num_classes,
                             dataclasses.replace(recipe, seed=seed), progress=progress,
                             desc=f"train [{name}, seed {seed}]")
    seconds = time.perf_counter() - t0
    natural, success = measure(model, test, recipe.precision)
    return Measurement(name, seed, natural, success, seconds)


_worker_job: dict = {}  # what every task of a training worker shares, set once per process


def _init_training_worker(job: dict, threads: int) -> None:
    torch.set_num_threads(threads)
    _worker_job.update(job)


def _training_task(name: str, seed: int) -> Measurement:
    j = _worker_job
    return _train_and_measure(j["sets"][name], j["labels"], name, seed, j["test"], j["recipe"], False,
                              j["num_classes"])


def evaluate_defenses(training_sets: dict[str, np.ndarray], labels: np.ndarray, test: EvalSet,
                      seeds: list[int], recipe: ClassifierRecipe, *, progress: bool = True,
                      num_classes: int = 10, workers: int = 1, threads_per_worker: int = 1) -> list[Measurement]:
    """Train one classifier per (defense, seed) on that defense's training set and measure it.

    With `workers` > 1 the trainings run in that many processes of `threads_per_worker` threads each
    (on a 2-core CPU two 1-thread trainings finish about 1.7x sooner than two 2-thread ones in turn).
    A training's result depends on its thread count, not on which worker ran it or when.
    """
    tasks = [(name, seed) for name in training_sets for seed in seeds]
    if workers <= 1:
        return [_train_and_measure(training_sets[name], labels, name, seed, test, recipe, progress, num_classes)
                for name, seed in tasks]
    job = {"sets": training_sets, "labels": labels, "test": test, "recipe": recipe, "num_classes": num_classes}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(tasks), desc=f"train classifiers ({workers} workers)", unit="model",
                   dynamic_ncols=True)
    done: dict[tuple[str, int], Measurement] = {}
    ctx = multiprocessing.get_context("spawn")  # a forked child would inherit OpenMP's pool mid-state
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_training_worker,
                             initargs=(job, threads_per_worker)) as pool:
        futures = {pool.submit(_training_task, name, seed): (name, seed) for name, seed in tasks}
        for future in as_completed(futures):
            done[futures[future]] = future.result()
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return [done[t] for t in tasks]


@dataclass
class Summary:
    defense: str
    natural_mean: float
    natural_std: float
    success_mean: float
    success_std: float
    seeds: int


def summarize(measurements: list[Measurement]) -> list[Summary]:
    """Mean and sample standard deviation (in %) over seeds, per defense, in first-seen order."""
    rows = []
    for name in dict.fromkeys(m.defense for m in measurements):
        group = [m for m in measurements if m.defense == name]
        nat = np.array([m.natural_accuracy for m in group]) * 100
        suc = np.array([m.poison_success for m in group]) * 100
        ddof = 1 if len(group) > 1 else 0
        rows.append(Summary(name, float(nat.mean()), float(nat.std(ddof=ddof)), float(suc.mean()),
                            float(suc.std(ddof=ddof)), len(group)))
    return rows


def markdown_table(rows: list[Summary]) -> str:
    lines = ["| defense | poison success % | natural accuracy % | seeds |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.defense} | {r.success_mean:.1f} ± {r.success_std:.1f} | "
                     f"{r.natural_mean:.1f} ± {r.natural_std:.1f} | {r.seeds} |")
    return "\n".join(lines) + "\n"
