"""puregen inside a Ray Data pipeline: one purifier per actor, batches keyed by sample index.

    import ray
    from puregen.distributed.ray_data import RayPurifier, purify_ray_dataset

    ds = ray.data.read_parquet(...)            # rows with an "image" (uint8 HWC) and an "index" column
    out = purify_ray_dataset(ds, "ddpm", ddpm="runs/ddpm", concurrency=4, num_cpus=1, batch_size=64)

or, in a pipeline of your own, the callable class directly:

    ds.map_batches(RayPurifier, fn_constructor_kwargs={"method": "ddpm", "ddpm": "runs/ddpm"},
                   concurrency=4, num_cpus=1, batch_size=64, batch_format="numpy")

Each actor loads its purifier once and pins its thread count and micro-batch. The noise of a row is
keyed by its `index` column (its global row number), never by the block it arrives in, so the output
equals the single-process result at the same thread count and micro-batch byte for byte, whatever
the blocks and their order. A method that needs the whole dataset first (`filt`'s quantile, a method
that fits on its input) is refused unless its state is given (`filt --energy-threshold`).
"""

from __future__ import annotations

import numpy as np
import torch

from ..engine.factory import load_purifier
from ..engine.noise_key import NoiseKey, check_seed
from ..errors import InputError

ROUTE = "a Ray Data pipeline"


class RayPurifier:
    """A callable class for `Dataset.map_batches(..., batch_format="numpy")`.

    `method` and `load_options` go to `load_purifier` in each actor (checkpoint folders, preset,
    options, micro_batch, precision, backend); `threads` is each actor's pinned thread count (match
    it to the actor's `num_cpus`). Or `purifier`, one built in the driver (sent to each actor). A batch is a dict of numpy arrays: `image_column` (uint8 NHWC,
    or NHW for one channel) and `index_column` (the rows' global indices); every other column is
    carried through, and the per-sample audit is added as `audit_<name>` columns.
    """

    def __init__(self, method: str | None = None, *, seed: int = 0, threads: int = 1, image_column: str = "image",
                 index_column: str = "index", purifier=None, **load_options):
        self.seed = check_seed(seed)
        self.image_column, self.index_column = image_column, index_column
        if purifier is None:
            self.purifier = load_purifier(method, threads=threads, **load_options)
        else:
            # A purifier built in the driver (a pipeline job's): its recorded thread count is pinned here,
            # as its job's fingerprint says.
            purifier.pin_threads()
            self.purifier = purifier
        self.purifier.refuse_batch_route(ROUTE)

    def __call__(self, batch: dict) -> dict:
        for column in (self.image_column, self.index_column):
            if column not in batch:
                raise InputError(f"a Ray Data batch has no {column!r} column (it has {sorted(batch)})")
        images = np.asarray(batch[self.image_column])
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise InputError(f"column {self.image_column!r} must hold uint8 images (N, H, W[, C]), "
                             f"got {images.dtype} {images.shape}")
        nhwc = images[..., None] if images.ndim == 3 else images
        self.purifier.check_image_shape(*nhwc.shape[1:], source=f"column {self.image_column!r}")
        key = NoiseKey.of(self.seed, np.asarray(batch[self.index_column]))
        result = self.purifier.purify_batch(torch.from_numpy(np.ascontiguousarray(nhwc)), key)
        purified = result.images.cpu().numpy()
        out = dict(batch)
        out[self.image_column] = purified.reshape(images.shape)
        for name, values in result.audit.items():
            out[f"audit_{name}"] = np.asarray(values)
        return out


def purify_ray_dataset(dataset, method: str, *, seed: int = 0, concurrency: int = 2, num_cpus: float = 1.0,
                       num_gpus: float = 0.0, threads: int | None = None, batch_size: int = 64,
                       image_column: str = "image", index_column: str = "index", **load_options):
    """`dataset` (a `ray.data.Dataset`) with its images purified by `concurrency` actors.

    The options are checked here, in the driver, before any actor starts: a bad option, checkpoint
    or a method this route cannot run fails at once with the usual clear error. An actor that dies
    (killed, out of memory, its node lost) is restarted and its batch run again, as Ray Data does for
    its actor pools by default (unlimited `max_restarts` and `max_task_retries`): the redone batch has
    the same noise keys, so it gives the same bytes, and each batch's output is handed on once. `threads` defaults to
    the actor's whole CPUs (at least 1). On a machine whose CPUs the actors would take entirely, give
    a fractional `num_cpus` (Ray Data's own tasks need a share to make progress).
    """
    try:
        import ray  # noqa: F401
    except ImportError:
        raise InputError("the Ray path needs Ray Data: pip install 'puregen[ray]'") from None
    if concurrency < 1 or batch_size < 1:
        raise InputError(f"concurrency and batch size must be >= 1, got {concurrency} and {batch_size}")
    threads = max(1, int(num_cpus)) if threads is None else threads
    from ..engine.workers import keep_thread_count

    with keep_thread_count():
        load_purifier(method, threads=threads, **load_options).refuse_batch_route(ROUTE)
    return dataset.map_batches(
        RayPurifier,
        fn_constructor_kwargs={"method": method, "seed": seed, "threads": threads, "image_column": image_column,
                               "index_column": index_column, **load_options},
        concurrency=concurrency, num_cpus=num_cpus, num_gpus=num_gpus, batch_size=batch_size,
        batch_format="numpy",
    )
