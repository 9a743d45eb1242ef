"""`puregen eval`: attack -> defend -> train -> measure, for every (attack, defense) cell, and the report.

Everything expensive is cached in the output folder, so an interrupted run
continues where it stopped and a rerun with more defenses or seeds only does
the new work: poison sets (`poisons/`), defended base sets and poison rows
(`defended/`), and every trained classifier's measurement (`results.csv`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..data import to_model_space
from ..data.atomic import atomic_write_file
from ..engine.factory import pin_threads
from ..errors import InputError
from ..training.classifier import predict, train_classifier
from .attack_suite import (
    ATTACKS,
    DEFAULT_ATTACKS,
    FULL_ATTACKS,
    UNLEARNABLE_ATTACKS,
    AttackContext,
    feature_extractor,
    poison_sets,
    transfer_split,
)
from .attacks.bullseye import train_transfer
from .defending import (
    Checkpoints,
    DefenseContext,
    PreparedDefense,
    default_defenses,
    defense_spec,
    unlearnable_defenses,
)
from .poison_set import PoisonSet
from .report import (
    Row,
    markdown_table,
    plot_cells,
    read_rows,
    recovery_table,
    require_matplotlib,
    summarize,
    write_report,
    write_rows,
    write_summary_csv,
)
from .scales import (
    ScaleData,
    ScaleSettings,
    load_paper,
    load_small,
    scale_settings,
    smoke_data,
    smoke_settings,
    unlearnable_data,
)

CHANCE_FILE = "chance.json"  # the clean reference models' success per attack, keyed like the rows
FINETUNE_LR_FACTOR = 0.1  # fine-tuning a pre-trained extractor takes a smaller step than training from scratch
FAMILIES = ("poisoning", "unlearnable", "adversarial")  # the default table; unlearnable examples; test-time


@dataclass
class EvalConfig:
    out: Path = Path("runs/eval")
    scale: str = "small"
    data: Path | None = None
    pood: Path | None = None
    full: bool = False
    family: str = "poisoning"  # or "unlearnable": the UE attacks and their defenses, on the UE base set
    attacks: tuple[str, ...] | None = None
    defenses: tuple[str, ...] | None = None
    seeds: int | None = None
    targets: int | None = None
    epochs: int | None = None
    ebm: Path | None = None
    ddpm: Path | None = None
    threads: int | None = None
    smoke: bool = False  # every stage at its smallest: checks the pipeline, measures nothing
    progress: bool = True


def _settings(cfg: EvalConfig) -> ScaleSettings:
    s = scale_settings(cfg.scale)
    if cfg.family == "unlearnable" and s.ue_classifier is not None:
        s = dataclasses.replace(s, classifier=s.ue_classifier)  # the UE table's own victim
    if cfg.smoke:
        s = smoke_settings(s)
    if cfg.seeds is not None:
        s = dataclasses.replace(s, seeds=cfg.seeds)
    if cfg.targets is not None:
        s = dataclasses.replace(s, targets=cfg.targets)
    if cfg.epochs is not None:
        s = dataclasses.replace(s, classifier=dataclasses.replace(s.classifier, epochs=cfg.epochs))
    if s.seeds < 1 or s.targets < 1 or s.classifier.epochs < 1:
        raise InputError("--seeds, --targets and --epochs must be at least 1")
    return s


def _names(cfg: EvalConfig, settings: ScaleSettings, data: ScaleData | None = None) -> tuple[list[str], list[str]]:
    """The attacks and defenses to run; `data` (the images, for the unlearnable family's grayscale row) may be
    left out to check the names alone."""
    if cfg.family not in FAMILIES:
        raise InputError(f"unknown --family {cfg.family!r}; choose {' or '.join(FAMILIES)}")
    unlearnable = cfg.family == "unlearnable"
    if unlearnable and cfg.full:
        raise InputError("--full adds to the poisoning table; the unlearnable family has one table (drop --full)")
    attacks = list(cfg.attacks or (UNLEARNABLE_ATTACKS if unlearnable else FULL_ATTACKS if cfg.full
                                   else DEFAULT_ATTACKS))
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise InputError(f"unknown attack(s) {unknown}; choose from {', '.join(ATTACKS)}")
    mixed = [a for a in attacks if (ATTACKS[a].family == "unlearnable") != unlearnable]
    if mixed:
        raise InputError(f"attack(s) {mixed} belong to the other --family (unlearnable examples are measured on "
                         f"their own base set, the others on the poisoning table's); run them with "
                         f"--family {'poisoning' if unlearnable else 'unlearnable'}")
    if cfg.defenses:
        defenses = list(cfg.defenses)
    elif unlearnable:
        defenses = list(unlearnable_defenses(data, settings)) if data is not None else ["none"]
    else:
        defenses = list(default_defenses(settings, cfg.full))
    for d in defenses:
        defense_spec(d)  # validates the name
    if "none" not in defenses:
        defenses.insert(0, "none")  # the undefended row is the reference of every other
    return attacks, defenses


class Victim:
    """Trains the victim's classifier on a training set and measures it against one poison set."""

    def __init__(self, data: ScaleData, settings: ScaleSettings, actx: AttackContext, progress: bool):
        self.data, self.settings, self.actx, self.progress = data, settings, actx, progress
        self.test = to_model_space(data.test_images, "test images")
        self.test_labels = torch.from_numpy(data.test_labels)
        self._triggered: dict[str, torch.Tensor] = {}
        self.trained = 0  # classifiers trained by this invocation (a resumed run trains only what is missing)

    def _triggered_test(self, ps: PoisonSet) -> torch.Tensor:
        key = ps.attack
        if key not in self._triggered:
            others = self.data.test_labels != ps.target_class
            self._triggered[key] = to_model_space(ps.test_trigger.apply(self.data.test_images[others],
                                                                        ps.test_amplify),
                                                  "triggered test images")
        return self._triggered[key]

    def train(self, images: np.ndarray, labels: np.ndarray, transfer: str | None, seed: int, overrides: dict,
              desc: str):
        recipe = dataclasses.replace(self.settings.classifier, seed=seed, **overrides)
        self.trained += 1
        if not transfer:
            return train_classifier(to_model_space(images), torch.from_numpy(labels), self.data.num_classes, recipe,
                                    progress=self.progress, desc=desc)
        _, classes = transfer_split(self.data.num_classes)
        keep = np.isin(labels, classes)
        recipe = dataclasses.replace(recipe, epochs=self.settings.transfer_epochs)
        if transfer == "finetune":
            recipe = dataclasses.replace(recipe, lr=recipe.lr * FINETUNE_LR_FACTOR)
        return train_transfer(feature_extractor(self.actx), images[keep], labels[keep] - int(classes[0]),
                              len(classes), transfer, recipe, progress=self.progress)

    def measure(self, model, ps: PoisonSet, transfer: str | None) -> tuple[float, float]:
        """(natural accuracy, poison success) as fractions; for a targeted attack success is 0 or 1."""
        precision = self.settings.classifier.precision
        if transfer:  # the victim's classes are the transfer classes, numbered from 0
            _, classes = transfer_split(self.data.num_classes)
            offset, keep = int(classes[0]), torch.from_numpy(np.isin(self.data.test_labels, classes))
            pred = predict(model, self.test[keep], precision=precision) + offset
            natural = float((pred == self.test_labels[keep]).float().mean())
        else:
            offset = 0
            natural = float((predict(model, self.test, precision=precision) == self.test_labels).float().mean())
        if ps.availability:  # unlearnable examples: the attack succeeds where the clean test images are missed
            return natural, 1.0 - natural
        if ps.targeted:
            pred = predict(model, self.test[ps.target_index : ps.target_index + 1], precision=precision)
            return natural, float(int(pred[0]) + offset == ps.target_class)
        hit = predict(model, self._triggered_test(ps), precision=precision) + offset == ps.target_class
        return natural, float(hit.float().mean())


def _poison_digest(ps: PoisonSet) -> str:
    return hashlib.sha256(ps.images.tobytes() + ps.indices.tobytes()).hexdigest()[:16]


def _run_adversarial(cfg: EvalConfig) -> dict:
    """The test-time family: its own table (`puregen.evaluation.adversarial.run`), small scale only."""
    from .adversarial.run import AdversarialSettings, run_adversarial
    from .adversarial.run import smoke_settings as adversarial_smoke_settings

    given = [flag for flag, value in (("--full", cfg.full), ("--attacks", cfg.attacks), ("--defenses", cfg.defenses),
                                      ("--seeds", cfg.seeds), ("--targets", cfg.targets), ("--ebm", cfg.ebm))
             if value]
    if given:
        raise InputError(f"{', '.join(given)} do not apply to --family adversarial (its attacks and defenses are "
                         f"fixed; see docs/adversarial-purification.md)")
    if cfg.scale != "small":
        raise InputError("--family adversarial runs at --scale small (Fashion-MNIST) only")
    settings = adversarial_smoke_settings() if cfg.smoke else AdversarialSettings()
    if cfg.epochs is not None:
        settings = dataclasses.replace(settings, classifier=dataclasses.replace(settings.classifier, epochs=cfg.epochs),
                                       aux=dataclasses.replace(settings.aux, epochs=cfg.epochs))
    threads = pin_threads(cfg.threads)
    data = load_small(cfg.data)
    return run_adversarial(cfg.out, data, settings, ddpm=cfg.ddpm, progress=cfg.progress, threads=threads)


def _row_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_eval(cfg: EvalConfig) -> dict:
    if cfg.family == "adversarial":
        return _run_adversarial(cfg)
    t_start = time.perf_counter()
    require_matplotlib()  # before an hour of work, not at its end
    threads = pin_threads(cfg.threads)
    settings = _settings(cfg)
    _names(cfg, settings)  # a mistyped name is reported before the data is read
    data = load_small(cfg.data) if cfg.scale == "small" else load_paper(cfg.data, cfg.pood)
    if cfg.family == "unlearnable":
        data = unlearnable_data(data, settings)
    if cfg.smoke:
        data = smoke_data(data)
    attacks, defenses = _names(cfg, settings, data)
    cfg.out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    actx = AttackContext(data, settings, cfg.out, cfg.smoke, cfg.progress)
    poisons: dict[str, list[PoisonSet]] = {}
    for name in attacks:
        t0 = time.perf_counter()
        poisons[name] = poison_sets(ATTACKS[name], actx)
        timings[f"craft {name}"] = round(time.perf_counter() - t0, 1)

    results_path = cfg.out / "results.csv"
    done = {r.key: r for r in read_rows(results_path)}
    rows: list[Row] = []

    def record(row: Row) -> None:
        rows.append(row)
        done[row.key] = row
        write_rows(results_path, list(done.values()))

    victim = Victim(data, settings, actx, cfg.progress)
    dctx = DefenseContext(data, settings, cfg.out, Checkpoints(cfg.ebm, cfg.ddpm), threads=cfg.threads,
                          smoke=cfg.smoke, progress=cfg.progress)
    classifier_key = settings.classifier.to_dict()
    t0 = time.perf_counter()
    chance = _clean_reference(victim, data, settings, attacks, poisons, cfg.out / CHANCE_FILE)
    timings["clean reference"] = round(time.perf_counter() - t0, 1)
    # The defended base set is needed only where a poison set leaves rows of it in place (an unlearnable
    # set replaces every row).
    keeps_base_rows = any(len(np.unique(ps.indices)) < len(data.base_images) for a in attacks for ps in poisons[a])
    for name in defenses:
        spec = defense_spec(name)
        t0 = time.perf_counter()
        defense = PreparedDefense(spec, dctx)
        # A fit defense transforms each poisoned set whole, so it has no defended base set.
        base = defense.base() if keeps_base_rows and not defense.whole_set else data.base_images
        timings[f"defend base {name}"] = round(time.perf_counter() - t0, 1)
        for attack in attacks:
            aspec = ATTACKS[attack]
            for case, ps in enumerate(poisons[attack]):
                seeds = [case] if aspec.targeted else list(range(settings.seeds))
                keys = {s: _row_key(attack, case, _poison_digest(ps), defense.key, s, classifier_key,
                                    aspec.transfer_mode)
                        for s in seeds}
                if all(k in done for k in keys.values()):
                    rows.extend(done[k] for k in keys.values())
                    continue
                t1 = time.perf_counter()
                if defense.whole_set:
                    images, labels = defense.poisoned_set(ps, f"{attack} case {case}")
                else:
                    defended = defense.rows(ps.images, ps.indices, f"{attack} case {case}")
                    images, labels = ps.poisoned_training_set(base, data.base_labels, poison_images=defended)
                timings[f"defend poisons {name}"] = timings.get(f"defend poisons {name}", 0) + round(
                    time.perf_counter() - t1, 1)
                for s, key in keys.items():
                    if key in done:
                        rows.append(done[key])
                        continue
                    t1 = time.perf_counter()
                    model = victim.train(images, labels, aspec.transfer_mode, s, defense.classifier_overrides,
                                         f"train [{attack} {case}, {name}, seed {s}]")
                    nat, suc = victim.measure(model, ps, aspec.transfer_mode)
                    record(Row(attack, case, name, s, nat, suc, round(time.perf_counter() - t1, 2),
                               ps.target_index if ps.targeted else -1, ps.target_class, key))
        timings[f"defense {name} total"] = round(time.perf_counter() - t0, 1)

    targeted = {a: ATTACKS[a].targeted for a in attacks}
    availability = {a: ATTACKS[a].family == "unlearnable" for a in attacks}
    cells = summarize(rows, targeted, availability)
    attack_labels = {a: ATTACKS[a].label() for a in attacks}
    defense_labels = {d: defense_spec(d).label() for d in defenses}
    table = markdown_table(cells, attack_labels, defense_labels, chance)
    recovery = recovery_table(cells, attack_labels, defense_labels, chance) if any(availability.values()) else None
    timings["total_seconds"] = round(time.perf_counter() - t_start, 1)
    result = {
        "table_markdown": table,
        "recovery_markdown": recovery,
        "cells": [asdict(c) for c in cells],
        "chance": chance,
        "timings": timings,  # of this invocation
        "earlier_timings": _earlier_timings(cfg.out / "results.json"),
        "classifiers_trained": victim.trained,  # by this invocation; the others came from results.csv
        "setup": {
            "scale": cfg.scale, "family": cfg.family, "smoke": cfg.smoke, "data": data.description,
            "notes": data.notes, "base_images": len(data.base_images),
            "attacks": attacks, "defenses": defenses, "seeds": settings.seeds, "targets": settings.targets,
            "settings": {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in asdict(settings).items()},
            "classifier": settings.classifier.to_dict(), "threads": threads,
            "poison_sets": {a: {"cases": len(p), "poisons": len(p[0].indices), "target_class": p[0].target_class}
                            for a, p in poisons.items()},
        },
        "environment": {"puregen": __version__, "torch": torch.__version__, "python": platform.python_version(),
                        "machine": platform.machine()},
    }
    write_summary_csv(cfg.out / "summary.csv", cells)
    write_report(cfg.out, result, report_markdown(result))
    plot_cells(cfg.out / "plots.png", cells, attack_labels, defense_labels)
    return result


def _clean_reference(victim: Victim, data: ScaleData, settings: ScaleSettings, attacks: list[str],
                     poisons: dict[str, list[PoisonSet]], cache_path: Path) -> dict[str, float]:
    """Each attack's chance level: its success measured on classifiers trained on the clean base set
    (backdoors: the mean over the seeds; targeted attacks: the share of targets the seed-0 model already
    puts in the adversarial class). Cached in `cache_path`, so that a resumed run trains nothing."""
    cache = _read_chance_cache(cache_path)
    keys = {a: _row_key("chance", a, [_poison_digest(p) for p in poisons[a]], data.fingerprint(),
                        settings.classifier.to_dict(), settings.seeds) for a in attacks}
    chance = {a: float(cache[k]) for a, k in keys.items() if k in cache}
    for mode in dict.fromkeys(ATTACKS[a].transfer_mode for a in attacks if a not in chance):
        models = [victim.train(data.base_images, data.base_labels, mode, s, {},
                               f"train [clean reference{f', {mode}' if mode else ''}, seed {s}]")
                  for s in range(settings.seeds)]
        for attack in (a for a in attacks if ATTACKS[a].transfer_mode == mode and a not in chance):
            if ATTACKS[attack].targeted:
                hits = [victim.measure(models[0], ps, mode)[1] for ps in poisons[attack]]
            else:
                hits = [victim.measure(m, poisons[attack][0], mode)[1] for m in models]
            chance[attack] = cache[keys[attack]] = 100 * float(np.mean(hits))
        with atomic_write_file(cache_path) as f:
            f.write((json.dumps(cache, indent=1, sort_keys=True) + "\n").encode())
    return chance


def _read_chance_cache(path: Path) -> dict[str, float]:
    if not path.is_file():
        return {}
    try:
        cache = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: the cached chance levels are not valid JSON ({e}); delete the file and "
                         "the clean reference models are trained again") from None
    if not isinstance(cache, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                              for v in cache.values()):
        raise InputError(f"{path}: the cached chance levels must be a JSON object of numbers; delete the file "
                         "and the clean reference models are trained again")
    return cache


def _earlier_timings(path: Path) -> list[dict]:
    """The timings of the earlier invocations in this folder, oldest first, from the results.json about to be
    replaced: a resumed run times only its own work, and the first run's timings are the ones worth keeping."""
    try:
        old = json.loads(path.read_text())
        return list(old.get("earlier_timings", [])) + [old["timings"]]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        return []  # none yet, or unreadable: it is about to be rewritten either way


def report_markdown(result: dict) -> str:
    s = result["setup"]
    smoke = " (smoke test: not a measurement)" if s["smoke"] else ""
    if s.get("family") == "unlearnable":
        lines = [
            f"# puregen eval --family unlearnable: {s['scale']} scale{smoke}", "", s["data"] + ".", "",
            f"Each cell: clean test accuracy % of the victim trained on the {s['base_images']:,}-image "
            f"unlearnable set after the defense (every image poisoned, labels kept), mean ± std over "
            f"{s['seeds']} classifier seeds; the last row is the victim trained on the clean set.", "",
            result["table_markdown"],
            "Share of the accuracy each attack took that each defense wins back, % (100: all of it; "
            "negative: the defense costs accuracy; - where the attack took under 1 point):", "",
            result["recovery_markdown"],
        ]
    else:
        lines = [
            f"# puregen eval: {s['scale']} scale{smoke}", "", s["data"] + ".", "",
            "Each cell: poison success % / natural accuracy %. Backdoor attacks: mean ± std over "
            f"{s['seeds']} classifier seeds. Targeted attacks: share of {s['targets']} targets flipped, "
            "[95% Wilson interval] (flipped/targets); natural accuracy is the mean over those models.", "",
            result["table_markdown"],
        ]
    lines += [f"- {n}" for n in s["notes"]]
    lines += ["", f"Total time {result['timings']['total_seconds']} s.", ""]
    return "\n".join(lines)
