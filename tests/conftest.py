import os
from pathlib import Path

import numpy as np
import pytest
import torch

from puregen.export.onnx_export import missing_onnx_packages

REPO = Path(__file__).resolve().parent.parent
FASHION_MNIST = Path(os.environ.get("PUREGEN_FASHION_MNIST", REPO.parent / "shared" / "data" / "fashion-mnist"))


# The export extra is installed by .ci/run; without it these tests say why they did not run.
needs_onnx = pytest.mark.skipif(
    bool(missing_onnx_packages()),
    reason="needs the onnx extra (pip install 'puregen[onnx]')",
)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    # ONNX exports made on first use go to the cache: keep them out of the user's ~/.cache.
    old = os.environ.get("PUREGEN_CACHE_DIR")
    os.environ["PUREGEN_CACHE_DIR"] = str(tmp_path_factory.mktemp("puregen-cache"))
    yield
    if old is None:
        os.environ.pop("PUREGEN_CACHE_DIR", None)
    else:
        os.environ["PUREGEN_CACHE_DIR"] = old


@pytest.fixture(autouse=True)
def _two_threads():
    # Results are pinned to a thread count; tests run with the CI machine's 2.
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


def smooth_images(n: int, h: int = 28, w: int = 28, c: int = 1, seed: int = 0) -> np.ndarray:
    """Non-constant uint8 NHWC test images: blurred noise plus a gradient, like real pictures."""
    rng = np.random.default_rng(seed)
    noise = rng.random((n, h + 4, w + 4, c))
    blur = sum(noise[:, i : i + h, j : j + w] for i in range(5) for j in range(5)) / 25
    ramp = np.linspace(0, 1, w)[None, None, :, None]
    img = 0.6 * (blur - blur.mean()) * 4 + 0.5 * ramp + 0.25
    return np.clip(img * 255, 0, 255).round().astype(np.uint8)


@pytest.fixture(scope="session")
def tiny_models():
    """Random-weight tiny EBM and UNet for 28x28x1 (fixed seeds)."""
    from puregen.models.ebm import EBM, EBMConfig
    from puregen.models.unet import UNet2D
    from puregen.models.unet_config import UNetConfig

    torch.manual_seed(0)
    return EBM(EBMConfig.tiny(in_channels=1)), UNet2D(UNetConfig.tiny(in_channels=1, sample_size=28))


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory, tiny_models):
    from puregen.models.checkpoints import save_model

    root = tmp_path_factory.mktemp("ckpt")
    ebm, unet = tiny_models
    return save_model(ebm, root / "ebm"), save_model(unet, root / "ddpm")
