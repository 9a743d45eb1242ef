"""Which update kernels run, and that the purifiers agree whichever does."""

import numpy as np
import pytest

from puregen.engine.factory import load_purifier
from puregen.engine.pipeline import config_fingerprint
from puregen.kernels import dispatch, native

from .conftest import smooth_images


def test_cpu_uses_the_native_kernels_when_built(monkeypatch):
    monkeypatch.delenv("PUREGEN_KERNELS", raising=False)
    assert native.available(), native.unavailable_reason()  # CI builds the library at install
    assert dispatch.implementation_name("cpu") == "native"
    assert dispatch.describe()["cpu"] == "native"


def test_a_forced_choice_is_honoured_or_refused(monkeypatch):
    monkeypatch.setenv("PUREGEN_KERNELS", "reference")
    assert dispatch.implementation_name("cpu") == "reference"
    monkeypatch.setenv("PUREGEN_KERNELS", "native")
    with pytest.raises(RuntimeError, match="CPU tensors only"):
        dispatch.implementation_name("cuda")
    monkeypatch.setenv("PUREGEN_KERNELS", "cuda-magic")
    with pytest.raises(RuntimeError, match="PUREGEN_KERNELS"):
        dispatch.implementation_name("cpu")


def test_native_and_reference_kernels_give_the_same_purified_images(monkeypatch, tiny_checkpoints):
    ebm_dir, ddpm_dir = tiny_checkpoints
    images = smooth_images(6, seed=2)
    outs, fingerprints = {}, {}
    for impl in ("reference", "native"):
        monkeypatch.setenv("PUREGEN_KERNELS", impl)
        p = load_purifier("naive", ebm=ebm_dir, ddpm=ddpm_dir, preset="tiny", steps=5, t_star=5)
        outs[impl] = p.purify(images, seed=3).astype(int)
        fingerprints[impl] = config_fingerprint(p, 3, 100)[0]
    # The kernels' Gaussians differ by a few ulp (log/cos of different libraries): at most 1 level apart.
    assert np.abs(outs["reference"] - outs["native"]).max() <= 1
    # ... so the implementation is part of the job's fingerprint (a resume never mixes them).
    assert fingerprints["reference"] != fingerprints["native"]
