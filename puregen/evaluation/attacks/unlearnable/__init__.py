"""Unlearnable-example (availability) attacks: noise on every training image, labels kept, that makes a
model trained on the set fail on clean test images.

* `error_minimizing`: error-minimising noise, sample-wise or class-wise, L-inf (Huang et al., ICLR 2021);
* `linear_separable`: linearly separable synthetic patches, L2 (Yu et al., KDD 2022);
* `autoregressive`: class-wise autoregressive-process noise, L2 (Sandoval-Segura et al., NeurIPS 2022);
* `one_pixel`: one-pixel shortcut, L0 (Wu et al., ICLR 2023).

Each `craft_*` takes uint8 N x H x W x C images and integer labels and returns the poisoned uint8 images
(inside the budget after rounding) and a metadata dict naming the norm and the budget.
"""

from .autoregressive import ARRecipe, craft_autoregressive
from .error_minimizing import ErrorMinimizingRecipe, craft_error_minimizing
from .linear_separable import LSPRecipe, craft_lsp
from .one_pixel import OPSRecipe, craft_one_pixel_shortcut

__all__ = ["ARRecipe", "ErrorMinimizingRecipe", "LSPRecipe", "OPSRecipe", "craft_autoregressive",
           "craft_error_minimizing", "craft_lsp", "craft_one_pixel_shortcut"]
