"""Purification inside data loaders: PurifiedDataset through DataLoader workers, and Hugging Face `.map`."""

import os

import numpy as np
import pytest
import torch

from puregen.api import load_purifier, purify_dataset
from puregen.data import read_dataset, write_dataset
from puregen.engine.purifiers import Purifier
from puregen.errors import InputError
from puregen.ingest import PurifiedDataset, hf_purify_function, purify_hf_dataset

from .conftest import smooth_images
from .test_method_registry import shrink  # noqa: F401  (a fit method registered for one test)

N = 40


@pytest.fixture(scope="module")
def images():
    return smooth_images(N, seed=7)


@pytest.fixture(scope="module")
def labels():
    return np.arange(N) % 10


@pytest.fixture(scope="module")
def purifier(tiny_models):
    ebm, _ = tiny_models
    # One thread: what each DataLoader worker runs with, so the bytes compare with one process.
    return load_purifier("ebm", ebm=ebm, preset="tiny", steps=2, micro_batch=8, threads=1)


@pytest.fixture(scope="module")
def expected(purifier, images):
    return purifier.purify(images, seed=5)


class Triples(torch.utils.data.Dataset):
    """(image, label, index) items, so a shuffled loader's results can be put back in order."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i]), i


def _epoch(ds, seed):
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, num_workers=2,
                                         generator=torch.Generator().manual_seed(seed))
    out = {}
    for batch_images, batch_labels, batch_index in loader:
        for image, label, i in zip(batch_images.numpy(), batch_labels.numpy(), batch_index.numpy()):
            out[int(i)] = (image, int(label))
    return out


def _record_purified_rows(monkeypatch, log):
    """Append every purified batch's indices to `log` (forked DataLoader workers inherit the patch)."""
    original = Purifier.purify_batch

    def recording(self, images_u8, key, *args, **kwargs):
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            os.write(fd, (" ".join(map(str, key.indices.tolist())) + "\n").encode())
        finally:
            os.close(fd)
        return original(self, images_u8, key, *args, **kwargs)

    monkeypatch.setattr(Purifier, "purify_batch", recording)


def _purified_rows(log):
    return [[int(v) for v in line.split()] for line in log.read_text().splitlines()] if log.exists() else []


def test_two_shuffling_workers_give_the_pipelines_bytes_and_never_purify_a_block_twice(
        tmp_path, monkeypatch, purifier, images, labels, expected):
    log = tmp_path / "purified.log"
    _record_purified_rows(monkeypatch, log)
    ds = PurifiedDataset(Triples(images, labels), purifier, seed=5, cache=tmp_path / "cache", block_size=16)
    first = _epoch(ds, seed=0)
    # Each aligned block purified once, in one batch, by one of the two workers.
    assert sorted(map(tuple, _purified_rows(log))) == [tuple(range(0, 16)), tuple(range(16, 32)),
                                                         tuple(range(32, 40))]
    pipeline = read_dataset(_pipeline_output(tmp_path, purifier, images, labels))
    assert np.array_equal(pipeline.images, expected)
    assert sorted(first) == list(range(N))
    assert np.array_equal(np.stack([first[i][0] for i in range(N)]), expected)
    assert [first[i][1] for i in range(N)] == labels.tolist()

    log.unlink()
    second = _epoch(ds, seed=1)  # another order, the cache's bytes, nothing purified
    assert not log.exists()
    assert np.array_equal(np.stack([second[i][0] for i in range(N)]), expected)


def _pipeline_output(tmp_path, purifier, images, labels):
    write_dataset(tmp_path / "in.npz", images, labels)
    purify_dataset(tmp_path / "in.npz", tmp_path / "out.npz", purifier=purifier, seed=5, chunk_size=16,
                   batch_size=8, progress=False)
    return tmp_path / "out.npz"


def test_without_a_cache_one_process_purifies_each_block_once_and_keeps_the_item_forms(
        tmp_path, monkeypatch, purifier, images, expected):
    from PIL import Image

    log = tmp_path / "purified.log"
    _record_purified_rows(monkeypatch, log)
    items = [Image.fromarray(images[i, ..., 0], mode="L") if i % 2 else torch.from_numpy(images[i]) for i in range(N)]
    ds = PurifiedDataset(items, purifier, seed=5, block_size=16)
    got = [ds[i] for i in range(N)]
    assert _purified_rows(log) == [list(range(0, 16)), list(range(16, 32)), list(range(32, 40))]
    assert all(isinstance(g, Image.Image) and g.mode == "L" for g in got[1::2])
    assert all(torch.is_tensor(g) and g.dtype == torch.uint8 for g in got[::2])
    as_arrays = np.stack([np.asarray(g)[..., None] if isinstance(g, Image.Image) else g.numpy() for g in got])
    assert np.array_equal(as_arrays, expected)
    mapped = PurifiedDataset([{"image": images[i], "id": i} for i in range(4)], purifier, seed=5, block_size=16)
    assert mapped[3]["id"] == 3 and np.array_equal(mapped[3]["image"], expected[3])


def test_a_cache_folder_reused_for_other_images_is_an_error(tmp_path, purifier, images):
    PurifiedDataset(list(images[:8]), purifier, seed=5, cache=tmp_path, block_size=8)[0]
    other = PurifiedDataset(list(images[8:16]), purifier, seed=5, cache=tmp_path, block_size=8)
    with pytest.raises(InputError, match="another dataset"):
        other[0]
    # Another seed keys another folder, so it purifies rather than read the first seed's blocks.
    assert len(list(tmp_path.iterdir())) == 1
    PurifiedDataset(list(images[8:16]), purifier, seed=6, cache=tmp_path, block_size=8)[0]
    assert len(list(tmp_path.iterdir())) == 2


def test_filt_is_refused_without_its_threshold_and_runs_with_it(tmp_path, tiny_models, images):
    import datasets

    ebm, unet = tiny_models
    p = load_purifier("filt", ebm=ebm, ddpm=unet, preset="tiny", t_star=2, micro_batch=8, threads=1)
    with pytest.raises(InputError, match="PurifiedDataset sees one batch at a time.*threshold"):
        PurifiedDataset(list(images), p)
    hf = datasets.Dataset.from_dict({"image": images[:16]})
    with pytest.raises(InputError, match="datasets map sees one batch at a time.*threshold"):
        purify_hf_dataset(hf, p)
    threshold = float(np.median(p.energies(torch.from_numpy(images[:16]))))
    q = load_purifier("filt", ebm=ebm, ddpm=unet, preset="tiny", t_star=2, micro_batch=8, threads=1,
                      energy_threshold=threshold)
    ds = PurifiedDataset(list(images[:16]), q, seed=1, cache=tmp_path, block_size=8)
    assert np.array_equal(np.stack([ds[i] for i in range(16)]), q.purify(images[:16], seed=1))


def test_hf_map_equals_the_pipeline_for_image_and_array_columns(tmp_path, purifier, images, labels, expected):
    import datasets
    from PIL import Image

    pipeline = read_dataset(_pipeline_output(tmp_path, purifier, images, labels)).images
    assert np.array_equal(pipeline, expected)
    pil = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(im[..., 0], mode="L") for im in images], "label": labels},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}))
    out = purify_hf_dataset(pil, purifier, seed=5, batch_size=16)
    assert isinstance(out.features["image"], datasets.Image)
    assert np.array_equal(np.stack([np.asarray(im)[..., None] for im in out["image"]]), pipeline)
    assert out["label"] == labels.tolist()

    arrays = datasets.Dataset.from_dict({"image": images, "label": labels},
                                        features=datasets.Features({"image": datasets.Array3D((28, 28, 1), "uint8"),
                                                                    "label": datasets.Value("int64")}))
    fn = hf_purify_function(purifier, seed=5)  # the users' own .map call, in other batch sizes
    out = arrays.map(fn, batched=True, with_indices=True, batch_size=12, features=arrays.features)
    assert np.array_equal(np.asarray(out.with_format("numpy")["image"]), pipeline)


def test_spawned_workers_build_the_purifier_from_a_factory(tmp_path, tiny_checkpoints, images, labels):
    from functools import partial

    factory = partial(load_purifier, "ebm", ebm=tiny_checkpoints[0], preset="tiny", steps=2, micro_batch=8,
                      threads=1)
    ds = PurifiedDataset(Triples(images, labels), factory, seed=5, cache=tmp_path, block_size=16)
    assert "_purifier" in ds.__getstate__() and ds.__getstate__()["_purifier"] is None  # workers build their own
    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True, num_workers=2,
                                         multiprocessing_context="spawn")
    got = {int(i): image for b_images, _, b_index in loader for image, i in zip(b_images.numpy(), b_index.numpy())}
    assert np.array_equal(np.stack([got[i] for i in range(N)]), factory().purify(images, seed=5))


# Short settings for each built-in method (an option a method does not read is an error).
SHORT = {"ebm": dict(steps=2), "ddpm": dict(t_star=2), "naive": dict(steps=2, t_star=2),
         "reps": dict(steps=1, t_star=2, reps=1), "filt": dict(t_star=2), "jpeg": {}, "bitdepth": {}, "grayscale": {},
         "diffpure": dict(t_star=2), "guided": dict(t_star=2)}


def test_the_short_settings_cover_every_registered_method():
    from puregen.methods import registry

    # These routes carry images only: a method that needs labels per batch (dvae) is refused there (it purifies
    # through the pipeline and the API, tests/test_dvae.py).
    assert {m.name for m in registry.all_methods() if not m.needs_labels} <= set(SHORT)


@pytest.mark.parametrize("method", sorted(SHORT))
def test_every_method_gives_its_purify_bytes_through_both_routes(method, tiny_models, images):
    import datasets

    ebm, unet = tiny_models
    extra = {}
    if method == "filt":  # its prepass state given: the threshold of the whole-dataset route
        probe = load_purifier("ebm", ebm=ebm, preset="tiny", steps=1, micro_batch=8, threads=1)
        extra["energy_threshold"] = float(np.median(probe.energies(torch.from_numpy(images[:12]))))
    p = load_purifier(method, ebm=ebm, ddpm=unet, preset="tiny", micro_batch=8, threads=1, **SHORT[method], **extra)
    want = p.purify(images[:12], seed=3)
    ds = PurifiedDataset(list(images[:12]), p, seed=3, block_size=8)
    assert np.array_equal(np.stack([ds[i] for i in reversed(range(12))])[::-1], want)
    hf = datasets.Dataset.from_dict({"image": images[:12]},
                                    features=datasets.Features({"image": datasets.Array3D((28, 28, 1), "uint8")}))
    out = purify_hf_dataset(hf, p, seed=3, batch_size=5)
    assert np.array_equal(np.asarray(out.with_format("numpy")["image"]), want)


def test_a_fit_method_is_refused_until_its_state_is_given(shrink, tmp_path, images):
    import datasets

    p = load_purifier("shrink-to-mean")
    with pytest.raises(InputError, match="fit on the whole input"):
        PurifiedDataset(list(images[:12]), p)
    with pytest.raises(InputError, match="fit on the whole input"):
        hf_purify_function(p)
    want = p.purify(images[:12], seed=2)  # the whole-dataset route fits on these images
    p.dataset_state = shrink(p.config).fit(torch.from_numpy(images[:12]), None, None)
    ds = PurifiedDataset(list(images[:12]), p, seed=2, cache=tmp_path, block_size=5)
    assert np.array_equal(np.stack([ds[i] for i in range(12)]), want)
    out = purify_hf_dataset(datasets.Dataset.from_dict({"image": images[:12]}), p, seed=2, batch_size=7)
    assert np.array_equal(np.asarray(out.with_format("numpy")["image"]), want)
