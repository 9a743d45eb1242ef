"""Unlearnable-example (availability) attacks: noise on every training image, labels kept, that makes a
model trained on the set fail on clean test images.

* `error_minimizing`: error-minimising noise, sample-wise or class-wise, L-inf (Huang et al., ICLR 2021);
* `linear_separable`: linearly separable synthetic patches, L2 (Yu et al., KDD 2022);
* `autoregressive`: class-wise autoregressive-process noise, L2 (Sandoval-Segura et al., NeurIPS 2022);
* `one_pixel`: one-pixel shortcut, L0 (Wu et al., ICLR 2023);
* `adversarial_poisoning`: targeted adversarial poisons of a model trained on the clean set, L-inf
  (Fowl et al., NeurIPS 2021).

Each `craft_*` takes uint8 N x H x W x C images and integer labels and returns the poisoned uint8 images
(inside the budget after rounding) and a metadata dict naming the norm and the budget.
"""

from .adversarial_poisoning import AdversarialPoisonRecipe, craft_adversarial_poisons
from .autoregressive import ARRecipe, craft_autoregressive
from .error_minimizing import ErrorMinimizingRecipe, craft_error_minimizing
from .linear_separable import LSPRecipe, craft_lsp
from .one_pixel import OPSRecipe, craft_one_pixel_shortcut

__all__ = ["ARRecipe", "AdversarialPoisonRecipe", "ErrorMinimizingRecipe", "LSPRecipe", "OPSRecipe",
           "craft_adversarial_poisons", "craft_autoregressive", "craft_error_minimizing", "craft_lsp",
           "craft_one_pixel_shortcut"]
