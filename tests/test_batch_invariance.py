"""DESIGN section 4: a sample's purified bytes do not depend on how the job is cut."""

import numpy as np
import pytest

from puregen.api import load_purifier
from puregen.models.ebm import EBM, EBMConfig

from .conftest import needs_onnx, smooth_images

# Few steps keep the test fast; the invariance does not depend on the count.
OVERRIDES = {
    "ebm": {"steps": 4},
    "ddpm": {"t_star": 4},
    "naive": {"steps": 3, "t_star": 3},
    "reps": {"steps": 2, "t_star": 2, "reps": 2},
    "filt": {"t_star": 4, "filter_frac": 0.5},
}


@pytest.fixture(scope="module")
def images():
    return smooth_images(64, seed=1)


@pytest.mark.parametrize("backend", ["torch", pytest.param("onnxruntime", marks=needs_onnx)])
@pytest.mark.parametrize("method", list(OVERRIDES))
def test_bytes_identical_for_batch_sizes_and_order(method, backend, images, tiny_models):
    ebm, unet = tiny_models
    p = load_purifier(method, ebm=ebm, ddpm=unet, preset="tiny", micro_batch=8, threads=2, backend=backend,
                      **OVERRIDES[method])
    ref = p.purify(images, seed=5, batch_size=64)
    assert ref.dtype == np.uint8 and ref.shape == images.shape
    changed = (ref != images).mean()
    assert changed > 0.2, f"{method} left {1 - changed:.0%} of pixels unchanged: the test would be vacuous"
    assert ((ref == 0) | (ref == 255)).mean() < 0.5, "output saturated: the test would be vacuous"

    assert np.array_equal(p.purify(images, seed=5, batch_size=7), ref)

    rng = np.random.default_rng(0)
    perm = rng.permutation(64)
    shuffled = p.purify(images[perm], seed=5, indices=perm, batch_size=64)
    assert np.array_equal(shuffled, ref[perm])

    if method == "filt":
        # filt ranks the whole set: batch 1 over all images
        assert np.array_equal(p.purify(images, seed=5, batch_size=1), ref)
    else:
        sub = rng.choice(64, size=9, replace=False)
        assert np.array_equal(p.purify(images[sub], seed=5, indices=sub, batch_size=1), ref[sub])


def test_seed_changes_result(images, tiny_models):
    p = load_purifier("ebm", ebm=tiny_models[0], preset="tiny", steps=3, micro_batch=8, threads=2)
    assert not np.array_equal(p.purify(images[:8], seed=0), p.purify(images[:8], seed=1))


def test_stream_equals_one_call(images, tiny_models):
    p = load_purifier("naive", ebm=tiny_models[0], ddpm=tiny_models[1], preset="tiny", steps=2, t_star=2,
                      micro_batch=8, threads=2)
    whole = p.purify(images[:20], seed=3, offset=100)
    parts = list(p.purify_stream([images[:5], images[5:12], images[12:20]], seed=3, offset=100))
    assert np.array_equal(np.concatenate(parts), whole)


def test_filt_passes_unselected_images_through(images, tiny_models):
    ebm, unet = tiny_models
    p = load_purifier("filt", ebm=ebm, ddpm=unet, preset="tiny", t_star=3, filter_frac=0.25, micro_batch=8,
                      threads=2)
    out = p.purify(images, seed=0)
    energies = p.energies(__import__("torch").from_numpy(images))
    order = np.lexsort((np.arange(64), energies))
    kept, purified = order[:48], order[48:]
    assert np.array_equal(out[kept], images[kept])
    assert all(not np.array_equal(out[i], images[i]) for i in purified)


def test_filt_stream_needs_and_uses_an_energy_threshold(images, tiny_models):
    from puregen.errors import InputError

    ebm, unet = tiny_models
    p = load_purifier("filt", ebm=ebm, ddpm=unet, preset="tiny", t_star=2, micro_batch=8, threads=2)
    with pytest.raises(InputError, match="threshold"):
        list(p.purify_stream([images[:4]]))
    threshold = float(np.median(p.energies(__import__("torch").from_numpy(images[:16]))))
    q = load_purifier("filt", ebm=ebm, ddpm=unet, preset="tiny", t_star=2, micro_batch=8, threads=2,
                      energy_threshold=threshold)
    streamed = np.concatenate(list(q.purify_stream([images[:6], images[6:16]], seed=1)))
    assert np.array_equal(streamed, q.purify(images[:16], seed=1))
    assert 0 < (streamed != images[:16]).any(axis=(1, 2, 3)).sum() < 16  # some purified, some passed through


@pytest.mark.parametrize("method, backend", [("ebm", "torch"), ("naive", "torch"),
                                             pytest.param("ebm", "onnxruntime", marks=needs_onnx)])
def test_worker_processes_give_the_bytes_of_one_process(method, backend, images, tiny_checkpoints):
    import torch

    from puregen.engine.workers import keep_thread_count, purify_in_workers

    ebm, ddpm = tiny_checkpoints
    options = {"ebm": ebm, "ddpm": ddpm, "preset": "tiny", "micro_batch": 8, "backend": backend, **OVERRIDES[method]}
    threads_before = torch.get_num_threads()
    with keep_thread_count():
        ref = load_purifier(method, threads=1, **options).purify(images, seed=5, offset=100)
    # batches of 12 do not align with the micro-batch of 8, and two workers take them in any order
    out = purify_in_workers(method, images, seed=5, workers=2, threads_per_worker=1, batch_size=12, offset=100,
                            progress=False, **options)
    assert (ref != images).mean() > 0.2
    assert np.array_equal(out, ref)
    assert torch.get_num_threads() == threads_before  # the caller's thread count is left alone


def test_worker_processes_refuse_filt_ranking_and_bad_checkpoints(images, tmp_path, tiny_checkpoints):
    from puregen.engine.workers import purify_in_workers
    from puregen.errors import CheckpointError, InputError

    ebm, ddpm = tiny_checkpoints
    with pytest.raises(InputError, match="energy threshold"):
        purify_in_workers("filt", images, ebm=ebm, ddpm=ddpm, preset="tiny", progress=False)
    with pytest.raises((InputError, CheckpointError), match="nowhere"):
        purify_in_workers("ebm", images, ebm=tmp_path / "nowhere", progress=False)


class ExitOnUse(EBM):
    """A tiny EBM that ends its process when evaluated, as an out-of-memory kill would."""

    def forward(self, x):
        import os

        os._exit(3)


def test_a_dead_worker_is_a_clear_error(images):
    from puregen.engine.workers import purify_in_workers

    with pytest.raises(RuntimeError, match="worker process died"):
        purify_in_workers("ebm", images[:8], ebm=ExitOnUse(EBMConfig.tiny(in_channels=1)), steps=1, micro_batch=8,
                          progress=False)
