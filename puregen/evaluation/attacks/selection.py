"""Which target-class images a clean-label attacker should poison.

A clean-label poison teaches the backdoor only if the model needs the trigger
to fit it: an image its natural features already explain adds little. The
attacker therefore contributes the target-class images of its own pool that a
reference classifier (trained by the attacker on its own labelled data) is
least sure belong to the target class. They keep their true label.
"""

from __future__ import annotations

import numpy as np
import torch

from ...data import to_model_space
from ...training.classifier import ClassifierRecipe, train_classifier


def rank_hardest(reference_u8: np.ndarray, reference_labels: np.ndarray, pool_u8: np.ndarray, target: int,
                 recipe: ClassifierRecipe, num_classes: int = 10, progress: bool = True) -> np.ndarray:
    """Positions in `pool_u8` (target-class images) ordered from least to most target-like."""
    model = train_classifier(to_model_space(reference_u8), torch.from_numpy(reference_labels.astype(np.int64)),
                             num_classes, recipe, progress=progress, desc="reference classifier")
    with torch.no_grad():
        confidence = torch.softmax(model(to_model_space(pool_u8)).float(), dim=1)[:, target].numpy()
    return np.argsort(confidence, kind="stable")
