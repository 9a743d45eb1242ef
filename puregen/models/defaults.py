"""The default models shipped inside the package (trained on Fashion-MNIST, 28x28x1).

`puregen purify` uses them when no checkpoint is given and the images have
their shape; otherwise a clear error says which checkpoint is needed.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "models"
DEFAULT_SHAPE = (28, 28, 1)  # height, width, channels of the shipped models' training data
DEFAULT_FOLDERS = {"ebm": "fashion-mnist-ebm", "unet": "fashion-mnist-ddpm"}


def default_checkpoint(kind: str) -> Path | None:
    """The shipped checkpoint folder for `kind` ("ebm" or "unet"), or None if not shipped."""
    folder = ASSETS / DEFAULT_FOLDERS[kind]
    return folder if (folder / "model.safetensors").is_file() else None


def check_default_fits(kind: str, height: int, width: int, channels: int, source: str) -> None:
    if (height, width, channels) != DEFAULT_SHAPE:
        flag = "--ebm" if kind == "ebm" else "--ddpm"
        raise InputError(
            f"{source}: images are {height}x{width}x{channels}, but the shipped default "
            f"{'EBM' if kind == 'ebm' else 'DDPM'} was trained on 28x28x1 Fashion-MNIST; "
            f"pass {flag} CKPT with a model for these images (the published PureGen checkpoints, downloaded "
            f"to a local folder, or one trained with `puregen train {'ebm' if kind == 'ebm' else 'ddpm'} DATA -o DIR`)"
        )
