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
    triggered = trigger.apply(images_u8, amplify)
    clean_in = images_u8.astype(np.float64) / 255.0
    applied = triggered.astype(np.float64) / 255.0 - clean_in
    power = float((applied * applied).sum())
    if power == 0.0:
        raise ValueError("the trigger changes none of these images (all of it is clipped away)")
    clean_out = purifier.purify(images_u8, seed=seed).astype(np.float64) / 255.0
    triggered_out = purifier.purify(triggered, seed=seed).astype(np.float64) / 255.0
    survived = triggered_out - clean_out
    return {
        "retention": float((survived * applied).sum() / power),
        "surviving_norm_ratio": float(np.sqrt((survived * survived).sum() / power)),
        "clean_change_rms_levels": float(np.sqrt(((clean_out - clean_in) ** 2).mean()) * 255.0),
        "images": int(len(images_u8)),
    }
