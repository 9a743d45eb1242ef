"""Purifying a Hugging Face `datasets.Dataset` with its own `.map(batched=True, with_indices=True)`.

The row indices `.map` passes key the noise, so the result equals `Purifier.purify` and the bulk
pipeline on the same rows in the same order (and seed and thread count). The image column keeps
its feature type: an `Image` column gives back PIL images, an array column arrays.
"""

from __future__ import annotations

import hashlib

import numpy as np

from ..engine.noise_key import NoiseKey, check_seed
from ..engine.purifiers import Purifier
from .item_images import stack_items


def hf_purify_function(purifier: Purifier, *, seed: int = 0, image_column: str = "image"):
    """The batched function `fn(batch, indices)` to give `Dataset.map(fn, batched=True, with_indices=True)`.

    It replaces `batch[image_column]` with the purified images and leaves every other column alone.
    A method that needs the whole dataset is refused here, unless its dataset state is given.
    """
    seed = check_seed(seed)
    purifier.refuse_batch_route("a Hugging Face datasets map")

    def purify_rows(batch: dict, indices: list[int]) -> dict:
        if not len(indices):
            return batch
        source = f"rows {indices[0]}..{indices[-1]}"
        u8, restorers = stack_items(batch[image_column], source)
        purifier.check_image_shape(*u8.shape[1:], source=source)
        purifier.pin_threads()  # a `num_proc` worker starts with its own torch thread count
        out = purifier.purify_batch(u8, NoiseKey.of(seed, np.asarray(indices, dtype=np.int64))).images.cpu().numpy()
        return {**batch, image_column: [restore(row) for restore, row in zip(restorers, out)]}

    return purify_rows


def purify_hf_dataset(dataset, purifier: Purifier, *, seed: int = 0, image_column: str = "image",
                      batch_size: int = 64, **map_options):
    """`dataset` with `image_column` purified, through `dataset.map` in batches of `batch_size`.

    `map_options` go to `Dataset.map` (num_proc, cache_file_name, ...). The map's fingerprint is
    the dataset's, the purifier's config fingerprint and the column, so `datasets` caches the result
    without hashing the networks' weights itself.
    """
    from ..engine.pipeline import config_fingerprint

    fn = hf_purify_function(purifier, seed=seed, image_column=image_column)
    purifier_key = config_fingerprint(purifier, check_seed(seed), 0)[0]
    base = getattr(dataset, "_fingerprint", None)
    options = dict(batched=True, with_indices=True, batch_size=batch_size, features=dataset.features,
                   desc=f"purify ({purifier.method})")
    if base is not None and "new_fingerprint" not in map_options:
        options["new_fingerprint"] = hashlib.sha256(f"{base}|{purifier_key}|{image_column}".encode()).hexdigest()[:32]
    return dataset.map(fn, **options, **map_options)
