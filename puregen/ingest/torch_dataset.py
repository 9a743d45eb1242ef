"""`PurifiedDataset`: a torch `Dataset` that purifies its wrapped dataset lazily, a block at a time.

A lone image would cost a whole micro-batch, so a cache miss for index i purifies the aligned
block [b * block_size, (b + 1) * block_size) that holds i in one `purify_batch` call. Sample j's
noise is keyed by (seed, j) alone, so the bytes are those of `Purifier.purify` on the whole
dataset (given the same thread count and micro-batch), whatever order a shuffling loader asks in.

With `cache=DIR` each block is one .npz under DIR/<key>/, where <key> names the purifier's config
fingerprint (which covers the seed), so another purifier or seed never reads it. A block is written
atomically while its lock file is held (fcntl.flock), so two `DataLoader` workers never purify the
same block: the second waits for the first and reads its file, and a second epoch reads only files.
The cache holds one source dataset: each block records a digest of each source image, checked
on every read, so a folder reused for another dataset is an error rather than its pixels.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..data.atomic import write_json_atomic, write_npz_atomic
from ..engine.noise_key import NoiseKey, check_seed
from ..engine.purifiers import Purifier
from ..errors import InputError
from .item_images import stack_items

DEFAULT_BLOCK_SIZE = 64


def _digest(u8: np.ndarray) -> np.ndarray:
    """Per-row sha1 of uint8 images, as (n, 20) uint8: cheap enough to check on every cache hit."""
    return np.stack([np.frombuffer(hashlib.sha1(np.ascontiguousarray(row).tobytes()).digest(), np.uint8)
                     for row in u8])


class PurifiedDataset(torch.utils.data.Dataset):
    """`dataset` with each item's image purified by `purifier` under `seed`.

    `dataset` is map-style (`__len__`, `__getitem__`); an item is an image, a tuple or list whose
    first element is the image (image, label, ...), or a mapping holding the image at `image_key`.
    `purifier` is a `Purifier`, or a zero-argument function that builds one: a `DataLoader` worker
    started by fork inherits a built purifier, one started by spawn unpickles it, or, given a
    function, builds its own (the function must be picklable then, e.g. a module-level function).
    `cache` is a folder for purified blocks (shared by workers and epochs); without it each process
    keeps its last block in memory only.
    """

    def __init__(self, dataset, purifier: Purifier | Callable[[], Purifier], *, seed: int = 0,
                 cache: str | os.PathLike | None = None, block_size: int = DEFAULT_BLOCK_SIZE,
                 image_key: str = "image"):
        self.dataset = dataset
        self.seed = check_seed(seed)
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise InputError(f"block_size must be a positive integer, got {block_size!r}")
        self.block_size = block_size
        self.image_key = image_key
        self._factory = None if isinstance(purifier, Purifier) else purifier
        self._purifier = purifier if self._factory is None else self._factory()
        if not isinstance(self._purifier, Purifier):
            raise TypeError(f"purifier must be a Purifier or a function returning one, got {type(purifier).__name__}")
        # A prepass or fit needs every image first; a loader sees a block at a time.
        self._purifier.refuse_batch_route("a PurifiedDataset")
        from ..engine.pipeline import config_fingerprint

        fingerprint, config = config_fingerprint(self._purifier, self.seed, 0)
        self.fingerprint = fingerprint
        self.cache_dir = None if cache is None else Path(cache) / f"{self._purifier.method}-{fingerprint[:20]}"
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            if not (self.cache_dir / "config.json").exists():  # for people: what made these blocks
                write_json_atomic(self.cache_dir / "config.json", {"fingerprint": fingerprint, **config})
        self._block: tuple[int, tuple[np.ndarray, np.ndarray]] | None = None  # this process's last block

    def __getstate__(self):
        state = dict(self.__dict__, _block=None)
        if self._factory is not None:  # a spawned worker builds its own from the function
            state["_purifier"] = None
        return state

    @property
    def purifier(self) -> Purifier:
        if self._purifier is None:
            self._purifier = self._factory()
        return self._purifier

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        n = len(self)
        if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"PurifiedDataset indices are integers, got {type(index).__name__}")
        index = int(index) + n if index < 0 else int(index)
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} items")
        item = self.dataset[index]
        image = self._image_of(item, index)
        block = index // self.block_size
        images, digests = self._block_images(block)
        row = index - block * self.block_size
        source, (restore,) = stack_items([image], f"item {index}")
        if not np.array_equal(_digest(source.numpy())[0], digests[row]):
            raise InputError(f"item {index}: the cached block was purified from another image at this index; "
                             f"the cache folder belongs to another dataset (use another folder)")
        return self._with_image(item, restore(images[row]))

    # -- items ---------------------------------------------------------------------------------

    def _image_of(self, item, index: int):
        if isinstance(item, (tuple, list)):
            if not item:
                raise InputError(f"item {index} is an empty {type(item).__name__}")
            return item[0]
        if isinstance(item, Mapping):
            if self.image_key not in item:
                raise InputError(f"item {index} has no {self.image_key!r} entry (set image_key)")
            return item[self.image_key]
        return item

    def _with_image(self, item, image):
        if isinstance(item, (tuple, list)):
            return type(item)([image, *item[1:]]) if isinstance(item, list) else (image, *item[1:])
        if isinstance(item, Mapping):
            return {**item, self.image_key: image}
        return image

    # -- blocks --------------------------------------------------------------------------------

    def _rows(self, block: int) -> range:
        return range(block * self.block_size, min((block + 1) * self.block_size, len(self)))

    def _block_images(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """The block's purified images and the digests of the source images they came from."""
        if self._block is not None and self._block[0] == block:
            return self._block[1]
        if self.cache_dir is None:
            found = self._purify_block(block)
        else:
            path = self.cache_dir / f"block-{self.block_size}-{block:09d}.npz"
            with self._locked(block):
                if path.exists():
                    found = self._read_block(path, block)
                else:
                    found = self._purify_block(block)
                    write_npz_atomic(path, images=found[0], source_sha1=found[1])
        self._block = (block, found)
        return found

    @contextmanager
    def _locked(self, block: int):
        """Hold block's lock file: the first worker to ask purifies it, the others wait and read."""
        fd = os.open(self.cache_dir / f"block-{self.block_size}-{block:09d}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _source_batch(self, block: int) -> torch.Tensor:
        images = [self._image_of(self.dataset[j], j) for j in self._rows(block)]
        return stack_items(images, f"block {block} (items {self._rows(block).start}..{self._rows(block).stop - 1})")[0]

    def _purify_block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        p = self.purifier
        u8 = self._source_batch(block)
        p.check_image_shape(*u8.shape[1:], source=f"block {block}")
        p.pin_threads()  # a DataLoader worker starts with one torch thread
        rows = self._rows(block)
        out = p.purify_batch(u8, NoiseKey.of(self.seed, np.arange(rows.start, rows.stop))).images
        return out.cpu().numpy(), _digest(u8.numpy())

    def _read_block(self, path: Path, block: int) -> tuple[np.ndarray, np.ndarray]:
        with np.load(path, allow_pickle=False) as f:
            images, digests = f["images"], f["source_sha1"]
        rows = self._rows(block)
        if images.shape[0] != len(rows):
            raise InputError(f"{path}: holds {images.shape[0]} images for {len(rows)} rows; the cache folder "
                             f"belongs to another dataset (use another folder)")
        return images, digests  # each hit checks its own row's digest
