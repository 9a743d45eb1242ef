"""`puregen demo`: poison a Fashion-MNIST subset, purify it, train, and print the defense table.

A class-balanced subset of the real Fashion-MNIST training set gets the
shipped clean-label trigger added to 1% of its images (10% of the target
class; labels unchanged). The subset is purified with the shipped EBM and
DDPM at their published settings, a small CNN is trained on the raw and on
each purified set for every seed, and poison success and natural accuracy
are measured on the real test set.
"""

from __future__ import annotations

import hashlib
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from ..data import read_dataset
from ..data.atomic import atomic_write_file, write_npz_atomic
from ..engine.factory import load_purifier, pin_threads
from ..engine.pipeline import config_fingerprint, dataset_fingerprint
from ..engine.workers import keep_thread_count, purify_in_workers
from ..errors import InputError
from ..methods import registry
from ..training.classifier import ClassifierRecipe
from ..training.loop import fastest_training_precision
from .clean_label import clean_label_poison, contribute_poisons
from .datasets import FASHION_MNIST_CLASSES, balanced_subset, load_fashion_mnist
from .figures import image_grid
from .harness import EvalSet, evaluate_defenses, purify_images
from .poison_set import PoisonSet
from .report import Cell, Row, markdown_seed_table, summarize, write_report
from .triggers import Trigger, load_trigger, shipped_trigger

DEMO_TRIGGER = "fashion-mnist-narcissus-16"
DEFENSES = ("ebm", "ddpm")
VICTIM_ROWS = 50_000  # the victim samples from these training rows, the attacker owns the rest


@dataclass
class DemoConfig:
    data: Path
    out: Path
    subset: int = 1000  # training images, 10% per class
    poison_fraction: float = 0.01  # of the subset; all in the target class
    seeds: tuple[int, ...] = (0, 1, 2)
    trigger: str = DEMO_TRIGGER  # a shipped trigger's name or a trigger folder
    amplify: float = 3.0  # test-time multiplier of the trigger (Narcissus uses 3)
    purify_seed: int = 0
    ebm_steps: int = 150  # the published Langevin steps
    ebm_temp: float = 1e-4  # the published Langevin temperature
    ebm: Path | None = None  # checkpoint folders; None: the shipped default models
    ddpm: Path | None = None
    ddpm_t_star: int = 75  # the published diffusion depth
    micro_batch: int = 64
    # How the networks are evaluated (fp32 on `torch` is the oracle; bf16 and `compiled` are the fast paths).
    precision: str = "fp32"
    backend: str = "torch"
    threads: int | None = 2  # of this process: EBM purification and classifier training
    # 1-thread processes for the DDPM purification (1 = none): 1.16-1.19x faster than one 2-thread process on
    # 2 cores. Classifier training was measured too and does not gain (about 19 s a model either way).
    workers: int = 2
    # Fashion-MNIST is usually trained without augmentation; 60 epochs on 1,000 images fit the training set.
    classifier: ClassifierRecipe = field(default_factory=lambda: ClassifierRecipe(
        epochs=60, crop_padding=0, flip=False, weight_decay=0.0, precision=fastest_training_precision()))
    progress: bool = True

    @property
    def poison_count(self) -> int:
        return round(self.subset * self.poison_fraction)


# Pass criteria of the demo (percentage points).
MAX_DEFENDED_SUCCESS, MIN_UNDEFENDED_SUCCESS, MAX_ACCURACY_DROP = 10.0, 60.0, 3.0


def verdict(cells: list[Cell]) -> dict[str, bool]:
    by = {c.defense: c for c in cells}
    none = by["none"]
    checks = {"no defense: poison success >= 60%": none.success_mean >= MIN_UNDEFENDED_SUCCESS}
    for name in DEFENSES:
        if name in by:
            checks[f"{name}: poison success <= 10%"] = by[name].success_mean <= MAX_DEFENDED_SUCCESS
            checks[f"{name}: natural-accuracy drop <= 3 points"] = (
                none.natural_mean - by[name].natural_mean <= MAX_ACCURACY_DROP)
    return checks


def _contributed_images(trigger: Trigger, images: np.ndarray, labels: np.ndarray, count: int) -> np.ndarray | None:
    """The attacker's chosen images named in the trigger's description, or None if it names none."""
    listed = trigger.meta.get("contributed", {}).get("indices")
    if not listed:
        return None
    rows = np.asarray(listed[:count], dtype=np.int64)
    if len(rows) < count:
        raise InputError(f"the trigger lists {len(listed)} contributed images, the demo needs {count}")
    if rows.min() < VICTIM_ROWS or rows.max() >= len(images) or (labels[rows] != trigger.target).any():
        raise InputError("the trigger's contributed images must be target-class rows after the victim's range")
    return images[rows]


def _resolve_trigger(name: str) -> Trigger:
    return load_trigger(name) if Path(name).is_dir() else shipped_trigger(name)


def _examples_png(path: Path, poisons: PoisonSet, originals: np.ndarray, sets: dict[str, np.ndarray],
                  trigger: Trigger, count: int = 8) -> None:
    """Rows: the trigger (stretched to be visible), the poisons before the trigger (`originals`), then each
    training set's version of them: poisoned (no defense), then each purified one."""
    rows_idx = poisons.indices[:count]
    stretched = np.rint((0.5 + trigger.pattern / (2 * trigger.epsilon)) * 255).clip(0, 255).astype(np.uint8)
    rows = [np.repeat(stretched[None], len(rows_idx), 0), originals[:count]]
    rows += [imgs[rows_idx] for imgs in sets.values()]
    with atomic_write_file(path) as f:
        image_grid(np.concatenate(rows), len(rows), scale=3).save(f, format="PNG")


def gains_from_workers(method: str) -> bool:
    """Whether `method` runs faster in 1-thread worker processes than in one multi-threaded process.

    The EBM's input gradient scales well across threads (two 1-thread workers were 0.89-0.92x of one
    2-thread process); the UNet's many small element-wise ops do not (1.16-1.19x for the workers). So:
    a method whose networks are the UNet alone, and that needs no pass over the whole dataset.
    """
    m = registry.get(method)
    return m.networks == ("unet",) and m.scope == "batch"


def cached_purification(method: str, options: dict, images: np.ndarray, cfg: DemoConfig, threads: int) -> np.ndarray:
    """Purify, or reuse `OUT/purified/METHOD-KEY.npz` written by an earlier run with the same key.

    The key covers the input bytes and everything that can change the output
    (method settings, seed, checkpoints, micro-batch, threads per process), so
    a rerun with other classifier seeds or epochs skips purification.
    """
    in_workers = cfg.workers > 1 and gains_from_workers(method)
    with keep_thread_count():
        purifier = load_purifier(method, threads=1 if in_workers else threads, **options)
    config_key, _ = config_fingerprint(purifier, cfg.purify_seed, chunk_size=0)
    key = hashlib.sha256((dataset_fingerprint(images, None) + config_key).encode()).hexdigest()[:20]
    path = cfg.out / "purified" / f"{method}-{key}.npz"
    if path.is_file():
        cached = read_dataset(path).images
        if cached.shape == images.shape:
            return cached
    if in_workers:
        out = purify_in_workers(method, images, seed=cfg.purify_seed, workers=cfg.workers, threads_per_worker=1,
                                batch_size=cfg.micro_batch, progress=cfg.progress,
                                desc=f"purify [{method}, {cfg.workers} workers]", **options)
    else:
        out = purify_images(purifier, images, seed=cfg.purify_seed, batch_size=cfg.micro_batch,
                            progress=cfg.progress, desc=f"purify [{method}]")
    write_npz_atomic(path, x=out)
    return out


def run_demo(cfg: DemoConfig) -> dict:
    t_start = time.perf_counter()
    threads = pin_threads(cfg.threads)
    trigger = _resolve_trigger(cfg.trigger)
    train, test = load_fashion_mnist(cfg.data, "train"), load_fashion_mnist(cfg.data, "test")
    if trigger.pattern.shape != train.images.shape[1:]:
        raise InputError(f"trigger {cfg.trigger!r} has shape {trigger.pattern.shape}, the data {train.images.shape[1:]}")
    if cfg.subset % 10 or cfg.poison_count < 1:
        raise InputError(f"--subset must be a positive multiple of 10 with at least one poison, got {cfg.subset}")
    # The victim's subset comes from the first 50,000 training images; the attacker's images (the
    # trigger's crafting data and the images it contributes) from the last 10,000.
    subset = balanced_subset(train.labels[:VICTIM_ROWS], cfg.subset // 10, seed=0)
    clean, labels = train.images[subset], train.labels[subset]
    contributed = _contributed_images(trigger, train.images, train.labels, cfg.poison_count)
    if contributed is None:
        poisons = clean_label_poison(clean, labels, trigger, cfg.poison_count, seed=0, test_amplify=cfg.amplify)
        originals = clean[poisons.indices]
    else:
        poisons = contribute_poisons(clean, labels, trigger, contributed, seed=0, test_amplify=cfg.amplify)
        originals = contributed
    poisoned, labels = poisons.poisoned_training_set(clean, labels)

    sets = {"none": poisoned}
    timings = {}
    overrides = {"ebm": {"steps": cfg.ebm_steps, "temp": cfg.ebm_temp, "checkpoint": cfg.ebm},
                 "ddpm": {"t_star": cfg.ddpm_t_star, "checkpoint": cfg.ddpm}}
    for method in DEFENSES:
        t0 = time.perf_counter()
        options = {"micro_batch": cfg.micro_batch, "precision": cfg.precision, "backend": cfg.backend,
                   **overrides[method]}
        sets[method] = cached_purification(method, options, poisoned, cfg, threads)
        timings[f"purify_{method}_seconds"] = round(time.perf_counter() - t0, 1)

    test_set = EvalSet.build(test.images, test.labels, poisons.test_trigger, poisons.test_amplify)
    t0 = time.perf_counter()
    rows = evaluate_defenses(sets, labels, test_set, list(cfg.seeds), cfg.classifier, attack=poisons.attack,
                             progress=cfg.progress)
    timings["train_and_measure_seconds"] = round(time.perf_counter() - t0, 1)
    cells = summarize(rows)
    checks = verdict(cells)
    timings["total_seconds"] = round(time.perf_counter() - t_start, 1)

    cfg.out.mkdir(parents=True, exist_ok=True)
    _examples_png(cfg.out / "examples.png", poisons, originals, sets, trigger)
    result = {
        "table": [_table_entry(c) for c in cells],
        "measurements": [_measurement_entry(r) for r in rows],
        "checks": checks,
        "passed": all(checks.values()),
        "timings": timings,
        "setup": {
            "data": str(cfg.data), "subset": cfg.subset, "poisons": cfg.poison_count,
            "target": trigger.target, "target_name": FASHION_MNIST_CLASSES[trigger.target],
            "trigger": cfg.trigger, "trigger_linf": trigger.linf, "epsilon": trigger.epsilon,
            "amplify": cfg.amplify, "seeds": list(cfg.seeds), "classifier": cfg.classifier.to_dict(),
            "ebm_steps": cfg.ebm_steps, "ebm_temp": cfg.ebm_temp, "ddpm_t_star": cfg.ddpm_t_star,
            "ebm": str(cfg.ebm or "shipped default"), "ddpm": str(cfg.ddpm or "shipped default"),
            "micro_batch": cfg.micro_batch, "precision": cfg.precision, "backend": cfg.backend, "threads": threads, "workers": cfg.workers, "puregen": __version__,
            "machine": platform.processor() or platform.machine(),
        },
    }
    write_report(cfg.out, result, report_markdown(result, cells))
    return result


def _table_entry(c: Cell) -> dict:
    """A defense's line of the demo's results.json: one attack, so the defense names it."""
    return {"defense": c.defense, "natural_mean": c.natural_mean, "natural_std": c.natural_std,
            "success_mean": c.success_mean, "success_std": c.success_std, "seeds": c.n}


def _measurement_entry(r: Row) -> dict:
    return {"defense": r.defense, "seed": r.seed, "natural_accuracy": r.natural_accuracy,
            "poison_success": r.poison_success, "train_seconds": r.train_seconds}


def report_markdown(result: dict, cells: list[Cell]) -> str:
    s = result["setup"]
    amplified = "" if s["amplify"] == 1 else f", x{s['amplify']:g} at test time"
    head = (f"Fashion-MNIST, {s['subset']} training images, {s['poisons']} poisoned "
            f"({s['target_name']}, class {s['target']}; trigger L-inf {s['trigger_linf'] * 255:.0f}/255"
            f"{amplified}), "
            f"{len(s['seeds'])} seeds, small CNN; EBM {s['ebm_steps']} Langevin steps at temperature "
            f"{s['ebm_temp']:g}, DDPM t* = {s['ddpm_t_star']}"
            + ("" if (s["precision"], s["backend"]) == ("fp32", "torch")
               else f"; purified with {s['precision']} networks on the {s['backend']} backend")
            + ".\n\n")
    checks = "".join(f"- {'PASS' if ok else 'FAIL'}: {name}\n" for name, ok in result["checks"].items())
    t = result["timings"]
    return head + markdown_seed_table(cells) + "\n" + checks + f"\nTotal time {t['total_seconds']:.0f} s.\n"
