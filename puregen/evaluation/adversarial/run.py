"""`puregen eval --family adversarial`: test-time purification against adaptive attacks.

On real Fashion-MNIST: a standard classifier trained on clean data (the poisoning table's victim recipe),
and an adversarially trained auxiliary classifier (PGD training at the larger budget). Each row is a
defense at an L-inf budget: no defense, the auxiliary network alone, `diffpure` (SDE and ODE), and
`guided` with pixel (MSE) and adversarial guidance, every purifier in front of the standard classifier
(`puregen.defended.DefendedClassifier`). Each row is attacked by

* PGD-EOT through the purifier (the full gradient, checkpointed),
* PGD-EOT with BPDA (the purifier's backward as the identity), beside it,
* APGD-CE then APGD-DLR with EOT (torchattacks),

and judged on fresh purifications (a module whose noise keys the attack never used). An image is robust
in the "worst" column when it survives all of the row's attacks. A convergence row repeats PGD-EOT on
`diffpure` (SDE) at 8/255 with twice the steps and twice the EOT samples.

Every row is written to OUT/results.json as it finishes, and a rerun skips the rows already there (the
trained classifiers are run folders under OUT/models/, reused too).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ...data import to_model_space
from ...data.atomic import atomic_write_file
from ...defended import DefendedClassifier
from ...engine.factory import load_purifier
from ...models.checkpoints import load_model
from ...training.classifier import ClassifierRecipe, accuracy, train_classifier_run
from ...training.loop import TrainingData
from ..datasets import balanced_subset
from ..scales import small_settings
from .attacks import apgd_eot, judge, pgd_eot, worst_case


@dataclass(frozen=True)
class PurifierSpec:
    name: str  # the row's label
    method: str | None  # None: no purifier
    options: dict = field(default_factory=dict)
    aux_guided: bool = False  # guided by the auxiliary network (adversarial guidance)
    classifier: str = "standard"  # the classifier behind it: standard, or the auxiliary network ("aux")


@dataclass
class AdversarialSettings:
    per_class: int = 1000  # training images per class for both classifiers (rows 0-49,999, class-balanced)
    # The poisoning table's victim, and the same network PGD-trained at the larger budget.
    classifier: ClassifierRecipe = field(default_factory=lambda: small_settings().classifier)
    aux: ClassifierRecipe = field(default_factory=lambda: dataclasses.replace(
        small_settings().classifier, adversarial_epsilon=0.1, adversarial_steps=5))
    images: int = 64  # the first test images
    budgets: tuple[float, ...] = (8 / 255, 0.1)
    reverse_steps: int = 10  # of every purifier
    pgd_steps: int = 20
    eot: int = 10
    apgd_steps: int = 20
    judge_draws: int = 4
    convergence: bool = True
    seed: int = 0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["classifier"], d["aux"] = self.classifier.to_dict(), self.aux.to_dict()
        return d


def smoke_settings() -> AdversarialSettings:
    """Every stage at its smallest: checks the pipeline, measures nothing."""
    s = AdversarialSettings()
    return dataclasses.replace(
        s, per_class=10, classifier=dataclasses.replace(s.classifier, epochs=1),
        aux=dataclasses.replace(s.aux, epochs=1, adversarial_steps=1), images=4, reverse_steps=2, pgd_steps=1,
        eot=1, apgd_steps=2, judge_draws=1)


def purifier_specs(s: AdversarialSettings) -> list[PurifierSpec]:
    steps = {"reverse_steps": s.reverse_steps}
    return [
        PurifierSpec("none", None),
        PurifierSpec("aux classifier alone", None, classifier="aux"),
        PurifierSpec("diffpure SDE", "diffpure", {"solver": "sde", **steps}),
        PurifierSpec("diffpure ODE", "diffpure", {"solver": "ode", **steps}),
        PurifierSpec("guided MSE", "guided", {"guide_mode": "mse", **steps}),
        PurifierSpec("guided adversarial", "guided", {"guide_mode": "adversarial", **steps}, aux_guided=True),
    ]


def rows_to_run(s: AdversarialSettings) -> list[tuple[PurifierSpec, float, str]]:
    """(purifier, budget, kind) for every row: every defense at the first budget; no defense and diffpure
    (SDE) at the others; the convergence row."""
    specs = purifier_specs(s)
    rows = [(p, s.budgets[0], "main") for p in specs]
    for eps in s.budgets[1:]:
        rows += [(p, eps, "main") for p in specs if p.name in ("none", "diffpure SDE")]
    if s.convergence:
        rows.append((next(p for p in specs if p.name == "diffpure SDE"), s.budgets[0], "convergence"))
    return rows


def _train(out: Path, name: str, data: TrainingData, recipe: ClassifierRecipe, progress: bool):
    run = out / "models" / name
    if not (run / "model.safetensors").exists():
        resume = (run / "training_state.json").exists()
        train_classifier_run(data, run, recipe, resume=resume, progress=progress)
    return load_model(run, expect="classifier").model.eval()


def _row_key(spec: PurifierSpec, eps: float, kind: str) -> str:
    return f"{spec.name} @ {eps:.4f} ({kind})"


def run_adversarial(out: Path, data, settings: AdversarialSettings, *, ddpm=None, progress: bool = True,
                    threads: int | None = None) -> dict:
    """Train (or reuse) both classifiers, attack every row, write results.json and results.md."""
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    keep = balanced_subset(data.base_labels, min(settings.per_class, int(np.bincount(data.base_labels).min())),
                           seed=0, num_classes=data.num_classes)
    images = data.base_images[keep]
    fingerprint = hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()[:20]
    train = TrainingData(to_model_space(torch.from_numpy(images)), torch.from_numpy(data.base_labels[keep]),
                         fingerprint, "the adversarial table's training set")
    standard = _train(out, "standard", train, settings.classifier, progress)
    aux = _train(out, "aux", train, settings.aux, progress)
    x = torch.from_numpy(data.test_images[:settings.images]).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(data.test_labels[:settings.images])
    results_path = out / "results.json"
    previous = json.loads(results_path.read_text()) if results_path.exists() else {}
    if previous.get("settings") != json.loads(json.dumps(settings.to_dict())):
        previous = {}  # other settings: nothing to reuse
    rows = previous.get("rows", {})
    test_images, test_labels = to_model_space(torch.from_numpy(data.test_images)), torch.from_numpy(data.test_labels)
    natural = {name: accuracy(model, test_images, test_labels)
               for name, model in (("standard", standard), ("aux", aux))}
    for spec, eps, kind in rows_to_run(settings):
        key = _row_key(spec, eps, kind)
        if key in rows:
            continue
        t0 = time.perf_counter()
        rows[key] = _attack_row(spec, eps, kind, standard, aux, out, x, y, settings, ddpm, threads)
        rows[key]["seconds"] = round(time.perf_counter() - t0, 1)
        _write_json(results_path, {"settings": settings.to_dict(), "natural": natural, "rows": rows})
        if progress:
            print(f"{key}: {json.dumps({k: v for k, v in rows[key].items() if k != 'per_image'})}", flush=True)
    report = {"settings": settings.to_dict(), "natural": natural, "rows": rows,
              "seconds": round(time.perf_counter() - t_start, 1)}
    _write_json(results_path, report)
    (out / "results.md").write_text(markdown(report))
    return report


def _write_json(path: Path, value: dict) -> None:
    # Atomically: a run killed while writing keeps the rows it had, and its rerun can read them.
    with atomic_write_file(path) as f:
        f.write(json.dumps(value, indent=1).encode())


def _purifier(spec: PurifierSpec, out: Path, ddpm, threads):
    """The row's purifier (None without one), loaded once: its defended classifiers differ only by seed."""
    if spec.method is None:
        return None
    options = dict(spec.options)
    if spec.aux_guided:
        options["guide_classifier"] = str(out / "models" / "aux")
    return load_purifier(spec.method, ddpm=ddpm, threads=threads, **options)


def _attack_row(spec, eps, kind, standard, aux, out, x, y, s: AdversarialSettings, ddpm, threads) -> dict:
    steps, eot = (2 * s.pgd_steps, 2 * s.eot) if kind == "convergence" else (s.pgd_steps, s.eot)
    stochastic = spec.method is not None
    eot = eot if stochastic else 1  # a deterministic model has nothing to average
    purifier, classifier = _purifier(spec, out, ddpm, threads), aux if spec.classifier == "aux" else standard

    def defended(seed: int, gradient: str = "full") -> DefendedClassifier:
        return DefendedClassifier(purifier, classifier, seed=seed, gradient=gradient)

    attacker = defended(3 * s.seed + 1)
    judge_model = defended(3 * s.seed + 2)  # keys the attack never used
    clean = judge(judge_model, x, y, s.judge_draws if stochastic else 1)
    attacks = {"pgd_eot": pgd_eot(attacker, x, y, eps, steps=steps, eot=eot, seed=s.seed)}
    if kind == "main":
        if stochastic:
            bpda = defended(3 * s.seed + 3, gradient="bpda")
            attacks["bpda_eot"] = pgd_eot(bpda, x, y, eps, steps=steps, eot=eot, seed=s.seed)
        attacks["apgd_eot"] = apgd_eot(attacker, x, y, eps, steps=s.apgd_steps, eot=eot, seed=s.seed,
                                       judge_model=judge_model)
    row = {"defense": spec.name, "budget": eps, "kind": kind, "pgd_steps": steps, "eot": eot,
           "apgd_steps": s.apgd_steps if kind == "main" else None, "images": int(x.shape[0]),
           "judge_draws": clean.draws, "clean": dataclasses.asdict(clean)}
    judged = {name: judge(judge_model, adv, y, clean.draws) for name, adv in attacks.items()}
    for name, j in {**judged, "worst": worst_case(list(judged.values()))}.items():
        row[name] = dataclasses.asdict(j)
    return row


def _pct(j: dict | None) -> str:
    if not j:
        return ""
    return f"{100 * j['accuracy']:.1f} [{100 * j['low']:.0f}, {100 * j['high']:.0f}]"


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = ["# Test-time purification under adaptive attacks", "",
             f"Fashion-MNIST, the first {s['images']} test images; standard classifier {s['classifier']['arch']} "
             f"(natural accuracy {100 * report['natural']['standard']:.1f}% on all 10,000), auxiliary network "
             f"PGD-trained at {s['aux'].get('adversarial_epsilon')} ({100 * report['natural']['aux']:.1f}%). "
             f"Purifiers at {s['reverse_steps']} reverse steps. Robust accuracy %, [95% interval], judged on "
             f"fresh purifications ({s['judge_draws']} per image for the purifiers).", "",
             "| defense | budget | attack steps x EOT | clean | PGD-EOT | BPDA-EOT | APGD-CE/DLR-EOT | worst | s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"].values():
        budget = f"{r['budget'] * 255:.0f}/255" if abs(r["budget"] * 255 - round(r["budget"] * 255)) < 1e-6 \
            else f"{r['budget']:g}"
        label = r["defense"] + (" (2x steps, 2x EOT)" if r["kind"] == "convergence" else "")
        lines.append(f"| {label} | {budget} | {r['pgd_steps']} x {r['eot']} | {_pct(r['clean'])} | "
                     f"{_pct(r.get('pgd_eot'))} | {_pct(r.get('bpda_eot'))} | {_pct(r.get('apgd_eot'))} | "
                     f"{_pct(r.get('worst'))} | {r.get('seconds', '')} |")
    lines += ["", f"Total time {report['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"
