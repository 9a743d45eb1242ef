"""How much of an additive trigger survives purification, measured without training a classifier.

Each image is purified twice, once clean and once with the trigger, with the
same seed and indices, so both runs draw the same noise. What the trigger
changes in the output is then compared with what it changed in the input:

    retention = <P(x + d) - P(x), d> / <d, d>

where `d` is the trigger as actually applied (after clipping and rounding to
uint8). 1 means the trigger passes through untouched, 0 means the purified
outputs no longer carry it. It is a cheap proxy for the defense: a backdoor
can only be learnt from what survives.
"""

from __future__ import annotations

import numpy as np

from .triggers import Trigger


def trigger_retention(purifier, images_u8: np.ndarray, trigger: Trigger, *, seed: int = 0,
                      amplify: float = 1.0) -> dict:
    """Purify `images_u8` with and without `trigger`; returns retention and the clean images' change.

    `purifier` is anything with `purify(uint8 NHWC, seed=...) -> uint8 NHWC` that keys its noise by row.
    """
    clean_in = images_u8.astype(np.float64) / 255.0
    triggered = _triggered(images_u8, trigger, amplify)  # before purifying: a useless trigger fails fast
    clean_out = purifier.purify(images_u8, seed=seed).astype(np.float64) / 255.0
    retention, survived_ratio = _survival(purifier, triggered, clean_in, clean_out, seed)
    return {
        "retention": retention,
        "surviving_norm_ratio": survived_ratio,
        "clean_change_rms_levels": _rms_levels(clean_out - clean_in),
        "images": int(len(images_u8)),
    }


def _triggered(images_u8: np.ndarray, trigger: Trigger, amplify: float = 1.0) -> np.ndarray:
    """The images with the trigger added; an error if clipping and rounding leave nothing of it."""
    triggered = trigger.apply(images_u8, amplify)
    if np.array_equal(triggered, images_u8):
        raise ValueError("the trigger changes none of these images (all of it is clipped away)")
    return triggered


def _survival(purifier, triggered, clean_in, clean_out, seed) -> tuple[float, float]:
    """(retention, |survived| / |applied|) of one trigger, given the clean images' purified outputs.

    `applied` is the trigger as it landed on the images, after clipping and rounding to uint8."""
    applied = triggered.astype(np.float64) / 255.0 - clean_in
    survived = purifier.purify(triggered, seed=seed).astype(np.float64) / 255.0 - clean_out
    power = float((applied * applied).sum())
    return float((survived * applied).sum() / power), float(np.sqrt((survived * survived).sum() / power))


def _rms_levels(change: np.ndarray) -> float:
    return float(np.sqrt((change**2).mean()) * 255.0)


def random_sign_triggers(shape: tuple[int, int, int], epsilon: float, *, grids: tuple[int, ...] = (4, 7, 14),
                         seed: int = 0) -> list[Trigger]:
    """Triggers the defender can draw without knowing the attack: the signs of smooth random fields.

    Each field is Gaussian on a `grid x grid` lattice, upsampled bilinearly to the image, and its sign times
    `epsilon` fills the whole L-inf budget, as optimised triggers tend to. Coarse grids stand for patterns
    that look like natural variation of the image, fine grids for texture.
    """
    import torch

    h, w, c = shape
    rng = np.random.default_rng(seed)
    triggers = []
    for grid in grids:
        field = torch.from_numpy(rng.standard_normal((1, c, grid, grid)).astype(np.float32))
        smooth = torch.nn.functional.interpolate(field, size=(h, w), mode="bilinear", align_corners=False)
        sign = np.where(smooth[0].permute(1, 2, 0).numpy() >= 0, 1.0, -1.0).astype(np.float32)
        triggers.append(Trigger(sign * np.float32(epsilon), epsilon, target=-1,
                                meta={"attack": "random sign pattern", "grid": grid, "seed": seed}))
    return triggers


def retention_of_triggers(purifier, images_u8: np.ndarray, triggers: list[Trigger], *, seed: int = 0) -> dict:
    """`trigger_retention` for several triggers, sharing the purification of the clean images."""
    clean_in = images_u8.astype(np.float64) / 255.0
    triggered = [_triggered(images_u8, t) for t in triggers]
    clean_out = purifier.purify(images_u8, seed=seed).astype(np.float64) / 255.0
    retentions = [_survival(purifier, x, clean_in, clean_out, seed)[0] for x in triggered]
    return {
        "retention": retentions,
        "mean_retention": float(np.mean(retentions)),
        "clean_change_rms_levels": _rms_levels(clean_out - clean_in),
        "images": int(len(images_u8)),
    }
