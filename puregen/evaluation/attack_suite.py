"""The attacks of `puregen eval`: what each crafts at a given scale, crafted once and cached on disk.

A backdoor attack (BadNets, Narcissus) gives one poison set, evaluated over
several classifier seeds. A targeted attack (Gradient Matching, Bullseye
Polytope) gives one poison set per target, each evaluated once: its
success is the share of targets flipped. An unlearnable-example attack
(family `unlearnable`) gives one poison set that replaces every base image,
labels kept; it is in neither default table.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data import to_model_space
from ..errors import InputError
from ..training.classifier import predict, train_classifier
from .attacks.badnets import checkerboard_patch, craft_badnets
from .attacks.bullseye import BullseyeRecipe, craft_bullseye, train_feature_extractor
from .attacks.gradient_matching import GradientMatchingRecipe, craft_gradient_matching
from .attacks.narcissus import NarcissusRecipe, craft_narcissus
from .attacks.selection import rank_hardest
from .attacks.unlearnable import (
    AdversarialPoisonRecipe,
    ARRecipe,
    ErrorMinimizingRecipe,
    LSPRecipe,
    OPSRecipe,
    craft_adversarial_poisons,
    craft_autoregressive,
    craft_error_minimizing,
    craft_lsp,
    craft_one_pixel_shortcut,
)
from .poison_set import PoisonSet, load_poison_set
from .scales import ScaleData, ScaleSettings

ATTACKER_SEED = 1000  # the attacker's own models never share a seed with the victim's


@dataclass(frozen=True)
class AttackSpec:
    name: str
    family: str  # badnets | narcissus | gradient-matching | bullseye | unlearnable
    epsilon: float | None = None  # L-inf budget, pixel units
    poison_fraction: float | None = None  # of the base set; None: the scale's (or the attack's own count)
    transfer_mode: str | None = None  # bullseye: linear | finetune
    variant: str | None = None  # unlearnable: em-sample | em-class | lsp | ar | ops | tap

    @property
    def targeted(self) -> bool:
        return self.family in ("gradient-matching", "bullseye")

    def label(self) -> str:
        return {
            "badnets": "BadNets (patch, 1%)",
            "narcissus-16-1pct": "Narcissus 16/255, 1%",
            "narcissus-8-1pct": "Narcissus 8/255, 1%",
            "narcissus-16-10pct": "Narcissus 16/255, 10%",
            "gradient-matching": "Gradient Matching 16/255, 1%",
            "bullseye-linear": "Bullseye Polytope (linear probe)",
            "bullseye-finetune": "Bullseye Polytope (fine-tune)",
            "em-sample-8": "Error-minimising noise, sample-wise 8/255",
            "em-class-8": "Error-minimising noise, class-wise 8/255",
            "lsp": "Linearly separable perturbations (L2)",
            "ar": "Autoregressive perturbations (L2)",
            "ops": "One-pixel shortcut",
            "tap-8": "Targeted adversarial poisoning 8/255",
        }.get(self.name, self.name)


ATTACKS = {a.name: a for a in (
    AttackSpec("badnets", "badnets"),
    AttackSpec("narcissus-16-1pct", "narcissus", 16 / 255, 0.01),
    AttackSpec("narcissus-8-1pct", "narcissus", 8 / 255, 0.01),
    AttackSpec("narcissus-16-10pct", "narcissus", 16 / 255, 0.10),
    AttackSpec("gradient-matching", "gradient-matching", 16 / 255),
    AttackSpec("bullseye-linear", "bullseye", 16 / 255, transfer_mode="linear"),
    AttackSpec("bullseye-finetune", "bullseye", 16 / 255, transfer_mode="finetune"),
    # Unlearnable examples: every base image poisoned, labels kept. Their L2 / L0 budgets live in the recipes.
    AttackSpec("em-sample-8", "unlearnable", 8 / 255, 1.0, variant="em-sample"),
    AttackSpec("em-class-8", "unlearnable", 8 / 255, 1.0, variant="em-class"),
    AttackSpec("lsp", "unlearnable", None, 1.0, variant="lsp"),
    AttackSpec("ar", "unlearnable", None, 1.0, variant="ar"),
    AttackSpec("ops", "unlearnable", None, 1.0, variant="ops"),
    AttackSpec("tap-8", "unlearnable", 8 / 255, 1.0, variant="tap"),
)}
# The targeted attacks need victims trained long enough and crafting strong enough that the default table
# cannot afford them at 50 targets a cell; they are judged in `--full` (docs/results-small.md).
DEFAULT_ATTACKS = ("badnets", "narcissus-16-1pct")
# `puregen eval --family unlearnable`: error-minimising noise (both kinds), LSP, AR and the one-pixel
# shortcut (TAP, tap-8, is offered through --attacks).
UNLEARNABLE_ATTACKS = ("em-sample-8", "em-class-8", "lsp", "ar", "ops")
FULL_ATTACKS = DEFAULT_ATTACKS + ("gradient-matching", "narcissus-8-1pct", "narcissus-16-10pct", "bullseye-linear",
                                  "bullseye-finetune")

BULLSEYE_POISONS = 5  # published


@dataclass
class AttackContext:
    data: ScaleData
    settings: ScaleSettings
    out: Path
    smoke: bool = False
    progress: bool = True


def transfer_split(num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Bullseye Polytope's disjoint classes: the extractor learns the first half, the victim transfers to the rest."""
    half = num_classes // 2
    return np.arange(half), np.arange(half, num_classes)


def _count(spec: AttackSpec, ctx: AttackContext) -> int:
    frac = spec.poison_fraction or ctx.settings.poison_fraction
    return max(1, round(frac * len(ctx.data.base_labels)))


def _key(spec: AttackSpec, ctx: AttackContext, recipe: dict) -> str:
    blob = json.dumps({"attack": dataclasses.asdict(spec), "base": ctx.data.fingerprint(), "recipe": recipe,
                       "settings": {"poison_fraction": ctx.settings.poison_fraction, "targets": ctx.settings.targets,
                                    "amplify": ctx.settings.amplify, "target": ctx.settings.backdoor_target,
                                    "classifier": ctx.settings.classifier.to_dict()}},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _recipes(ctx: AttackContext, spec: AttackSpec) -> dict:
    if spec.family == "narcissus":
        r = NarcissusRecipe(epsilon=spec.epsilon)
        if ctx.smoke:
            r = dataclasses.replace(r, surrogate_epochs=1, trigger_steps=3)
        return {"narcissus": r}
    if spec.family == "gradient-matching":
        # The differentiable augmentation mirrors the victim's training: the published attack crafts through
        # crops and flips because its victims train with them. The small scale's victim trains without, and
        # poisons made robust to flips it never sees match its gradient less closely.
        c = ctx.settings.classifier
        r = GradientMatchingRecipe(epsilon=spec.epsilon, augment=bool(c.crop_padding or c.flip))
        return {"gm": dataclasses.replace(r, steps=2) if ctx.smoke else r}
    if spec.family == "bullseye":
        r = BullseyeRecipe(epsilon=spec.epsilon)
        return {"bullseye": dataclasses.replace(r, steps=2) if ctx.smoke else r}
    if spec.family == "unlearnable":
        return {"unlearnable": _unlearnable_recipe(spec, ctx)}
    return {}


def _unlearnable_recipe(spec: AttackSpec, ctx: AttackContext):
    if spec.variant in ("em-sample", "em-class"):
        # The crafting model is the victim's architecture, under the attacker's own seed.
        r = ErrorMinimizingRecipe(epsilon=spec.epsilon, class_wise=spec.variant == "em-class",
                                  arch=ctx.settings.classifier.arch, seed=ATTACKER_SEED)
        return dataclasses.replace(r, max_rounds=1, pgd_steps=2, train_steps=2) if ctx.smoke else r
    if spec.variant == "tap":
        r = AdversarialPoisonRecipe(epsilon=spec.epsilon)
        return dataclasses.replace(r, steps=2) if ctx.smoke else r
    recipes = {"lsp": LSPRecipe, "ar": ARRecipe, "ops": OPSRecipe}
    if spec.variant not in recipes:
        raise InputError(f"{spec.name}: unknown unlearnable variant {spec.variant!r}")
    return recipes[spec.variant]()


def poison_sets(spec: AttackSpec, ctx: AttackContext) -> list[PoisonSet]:
    """The attack's poison sets, read from `OUT/poisons/NAME-KEY/` if an earlier run crafted them."""
    recipes = _recipes(ctx, spec)
    # Both Bullseye settings attack the same extractor with the same poisons: craft them once.
    shared = dataclasses.replace(spec, name=spec.family, transfer_mode=None) if spec.family == "bullseye" else spec
    folder = ctx.out / "poisons" / f"{shared.name}-{_key(shared, ctx, {k: r.to_dict() for k, r in recipes.items()})}"
    cases = 1 if not spec.targeted else ctx.settings.targets
    names = [folder / f"case-{i:03d}" for i in range(cases)]
    if all(n.is_dir() for n in names):
        return [load_poison_set(n) for n in names]
    crafted = []
    for i, name in enumerate(names):
        if name.is_dir():
            crafted.append(load_poison_set(name))
            continue
        ps = _craft(spec, ctx, recipes, i)
        ps.save(name)
        crafted.append(ps)
    return crafted


def _craft(spec: AttackSpec, ctx: AttackContext, recipes: dict, case: int) -> PoisonSet:
    if spec.family == "badnets":
        return _badnets(spec, ctx)
    if spec.family == "narcissus":
        return _narcissus(spec, ctx, recipes["narcissus"])
    if spec.family == "gradient-matching":
        return _gradient_matching(spec, ctx, recipes["gm"], case)
    if spec.family == "unlearnable":
        return _unlearnable(spec, ctx, recipes["unlearnable"])
    return _bullseye(spec, ctx, recipes["bullseye"], case)


def _unlearnable(spec: AttackSpec, ctx: AttackContext, recipe) -> PoisonSet:
    """Every base image poisoned, labels kept: one PoisonSet over all rows, with no target (class -1)."""
    d = ctx.data
    args = (d.base_images, d.base_labels)
    if isinstance(recipe, ErrorMinimizingRecipe):
        images, info = craft_error_minimizing(*args, recipe, num_classes=d.num_classes, progress=ctx.progress)
    elif isinstance(recipe, LSPRecipe):
        images, info = craft_lsp(*args, recipe, num_classes=d.num_classes)
    elif isinstance(recipe, ARRecipe):
        images, info = craft_autoregressive(*args, recipe, num_classes=d.num_classes)
    elif isinstance(recipe, AdversarialPoisonRecipe):
        # The attacker's model: the victim's architecture trained on the clean base set (as Gradient Matching's).
        images, info = craft_adversarial_poisons(_attacker_model(ctx), *args, recipe, num_classes=d.num_classes,
                                                 progress=ctx.progress)
    else:
        images, info = craft_one_pixel_shortcut(*args, recipe, num_classes=d.num_classes)
    return PoisonSet(spec.name, np.arange(len(images)), images, d.base_labels, -1, d.fingerprint(),
                     {"poisons": len(images), **info}, info["crafting_seconds"], availability=True)


def _badnets(spec: AttackSpec, ctx: AttackContext) -> PoisonSet:
    d, target = ctx.data, ctx.settings.backdoor_target
    h = d.base_images.shape[1]
    patch = checkerboard_patch(d.base_images.shape[1:], size=max(3, h // 8))
    indices, images, labels = craft_badnets(d.base_images, d.base_labels, target, _count(spec, ctx), patch, seed=0)
    return PoisonSet(spec.name, indices, images, labels, target, d.fingerprint(),
                     {"patch": f"{max(3, h // 8)}px checkerboard, bottom right", "dirty_label": True}, 0.0,
                     test_trigger=patch)


def _narcissus(spec: AttackSpec, ctx: AttackContext, recipe: NarcissusRecipe) -> PoisonSet:
    d, target = ctx.data, ctx.settings.backdoor_target
    own = d.attacker_images[d.attacker_labels == target]
    keep = d.pood_labels != target if d.pood_images is d.attacker_images else np.ones(len(d.pood_labels), bool)
    pood, pood_labels = d.pood_images[keep], d.pood_labels[keep]
    # POOD labels must be 0..K-1 for the surrogate; the target class is appended as class K.
    _, pood_labels = np.unique(pood_labels, return_inverse=True)
    trigger = craft_narcissus(pood, pood_labels.astype(np.int64), own, target, recipe, progress=ctx.progress)
    count = _count(spec, ctx)
    victims = np.flatnonzero(d.base_labels == target)
    if count > len(victims):
        raise InputError(f"{spec.name}: {count} poisons, but the target class has {len(victims)} base images")
    rows = np.sort(np.random.default_rng(0).choice(victims, count, replace=False))
    if d.attacker_images is d.base_images:
        # The attacker knows the training set: it adds the trigger to the victim's own target-class images.
        contributed, selection = d.base_images[rows], "the victim's own target-class images, at random"
    else:
        # The attacker contributes its own target-class images, those a classifier of its own finds least
        # target-like first: they need the trigger most to be fitted (`attacks.selection`).
        order = rank_hardest(d.attacker_images, d.attacker_labels, own, target,
                             dataclasses.replace(ctx.settings.classifier, seed=ATTACKER_SEED),
                             num_classes=d.num_classes, progress=ctx.progress)
        if count > len(order):
            raise InputError(f"{spec.name}: {count} poisons, but the attacker has {len(order)} target-class images")
        contributed, selection = own[order[:count]], "the attacker's own target-class images, least target-like first"
    images = trigger.apply(contributed)
    params = {"epsilon": spec.epsilon, "poisons": count, "selection": selection, **trigger.meta}
    return PoisonSet(spec.name, rows, images, np.full(count, target, np.int64), target, d.fingerprint(), params,
                     trigger.meta.get("crafting_seconds", 0.0), test_trigger=trigger, test_amplify=ctx.settings.amplify)


_ATTACKER_MODELS: dict[str, torch.nn.Module] = {}


def _attacker_model(ctx: AttackContext) -> torch.nn.Module:
    """Gradient Matching's crafting model: the victim's architecture trained by the attacker on the clean
    training set (its threat model), once per run."""
    key = ctx.data.fingerprint() + json.dumps(ctx.settings.classifier.to_dict(), sort_keys=True)
    if key not in _ATTACKER_MODELS:
        d = ctx.data
        _ATTACKER_MODELS[key] = train_classifier(
            to_model_space(d.base_images), torch.from_numpy(d.base_labels), d.num_classes,
            dataclasses.replace(ctx.settings.classifier, seed=ATTACKER_SEED), progress=ctx.progress,
            desc="attacker's model").eval()
    return _ATTACKER_MODELS[key]


def _pick_target(rng, test_labels: np.ndarray, candidates: np.ndarray, classes: np.ndarray) -> tuple[int, int]:
    index = int(rng.choice(candidates))
    true = int(test_labels[index])
    adversarial = int(rng.choice([c for c in classes if c != true]))
    return index, adversarial


def _gradient_matching(spec: AttackSpec, ctx: AttackContext, recipe: GradientMatchingRecipe, case: int) -> PoisonSet:
    d = ctx.data
    model = _attacker_model(ctx)
    # Targets the attacker's model gets right: flipping a target that is misclassified anyway proves nothing.
    preds = predict(model, to_model_space(d.test_images), precision=ctx.settings.classifier.precision).numpy()
    correct = np.flatnonzero(preds == d.test_labels)
    rng = np.random.default_rng([case, 7])
    index, adversarial = _pick_target(rng, d.test_labels, correct, np.arange(d.num_classes))
    count = _count(spec, ctx)
    pool = np.flatnonzero(d.base_labels == adversarial)
    rows = np.sort(rng.choice(pool, min(count, len(pool)), replace=False))
    images, info = craft_gradient_matching(model, d.base_images[rows], d.base_labels[rows], d.test_images[index],
                                           adversarial, dataclasses.replace(recipe, seed=case), progress=ctx.progress)
    return PoisonSet(spec.name, rows, images, d.base_labels[rows], adversarial, d.fingerprint(),
                     {"poisons": len(rows), **info}, info["crafting_seconds"], target_index=index,
                     target_true_class=int(d.test_labels[index]))


_EXTRACTORS: dict[str, torch.nn.Module] = {}


def feature_extractor(ctx: AttackContext) -> torch.nn.Module:
    """The public feature extractor of the transfer task, trained on the attacker's data of the source classes."""
    d = ctx.data
    source, _ = transfer_split(d.num_classes)
    key = d.fingerprint() + json.dumps(ctx.settings.classifier.to_dict(), sort_keys=True)
    if key not in _EXTRACTORS:
        keep = np.isin(d.attacker_labels, source)
        recipe = dataclasses.replace(ctx.settings.classifier, arch=ctx.settings.extractor_arch,
                                     epochs=ctx.settings.extractor_epochs, seed=ATTACKER_SEED)
        _EXTRACTORS[key] = train_feature_extractor(d.attacker_images[keep], d.attacker_labels[keep], len(source),
                                                   recipe, progress=ctx.progress)
    return _EXTRACTORS[key]


def _bullseye(spec: AttackSpec, ctx: AttackContext, recipe: BullseyeRecipe, case: int) -> PoisonSet:
    d = ctx.data
    _, transfer = transfer_split(d.num_classes)
    rng = np.random.default_rng([case, 11])
    index, adversarial = _pick_target(rng, d.test_labels, np.flatnonzero(np.isin(d.test_labels, transfer)), transfer)
    rows = np.sort(rng.choice(np.flatnonzero(d.base_labels == adversarial), BULLSEYE_POISONS, replace=False))
    images, info = craft_bullseye(feature_extractor(ctx), d.base_images[rows], d.test_images[index],
                                  dataclasses.replace(recipe, seed=case), progress=ctx.progress)
    return PoisonSet(spec.name, rows, images, d.base_labels[rows], adversarial, d.fingerprint(),
                     {"poisons": len(rows), "transfer_mode": spec.transfer_mode, **info},
                     info["crafting_seconds"], target_index=index, target_true_class=int(d.test_labels[index]))
