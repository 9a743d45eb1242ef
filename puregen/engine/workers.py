"""Purify in several local worker processes, each with its own pinned thread count.

On a small CPU one process with two threads leaves much of the second core
idle: the networks' many small element-wise ops (SiLU, GroupNorm, adds) scale
poorly across threads. Two processes of one thread each keep both cores busy.

Results are unchanged by the split: every sample's noise is keyed by its
global index and the networks run on micro-batches of one fixed shape, so the
output equals one process purifying everything with the same per-process
thread count (tested byte for byte). Work is handed out in batches, so a slow
worker does not hold the others up.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager

import numpy as np
import torch

from ..errors import InputError
from .factory import load_purifier
from .progress import image_progress_bar

_worker_purifier = None  # set in each worker process by _init_worker


@contextmanager
def keep_thread_count():
    """Loading a purifier pins torch's thread count; this puts the caller's count back afterwards."""
    saved = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _init_worker(method: str, load_options: dict) -> None:
    global _worker_purifier
    _worker_purifier = load_purifier(method, **load_options)


def _purify_rows(start: int, images_u8: np.ndarray, seed: int) -> tuple[int, np.ndarray]:
    return start, _worker_purifier.purify(images_u8, seed=seed, offset=start, batch_size=len(images_u8))


def purify_in_workers(method: str, images_u8: np.ndarray, *, seed: int = 0, workers: int = 2,
                      threads_per_worker: int = 1, batch_size: int = 64, offset: int = 0,
                      progress: bool = True, desc: str = "purify", **load_options) -> np.ndarray:
    """Purify uint8 NHWC images (row i has global index offset + i) in `workers` processes.

    `load_options` go to `load_purifier` in each worker (checkpoint folders, micro_batch, steps, ...);
    the thread count of each worker is `threads_per_worker`.
    """
    if workers < 1 or threads_per_worker < 1:
        raise InputError(f"workers and threads per worker must be >= 1, got {workers} and {threads_per_worker}")
    if "threads" in load_options:
        raise TypeError("pass threads_per_worker, not threads: each worker pins its own thread count")
    if not isinstance(images_u8, np.ndarray) or images_u8.dtype != np.uint8 or images_u8.ndim != 4:
        raise InputError("purify_in_workers takes uint8 NHWC numpy images")
    options = {**load_options, "threads": threads_per_worker}
    # Load once here: bad options or checkpoints fail in this process with the usual clear error, and
    # a method that needs the whole dataset first (a prepass or a fit), which a split job cannot do, is refused
    # before any worker starts.
    with keep_thread_count():
        probe = load_purifier(method, **options)
    probe.refuse_batch_route("purification in worker processes")
    out = np.empty_like(images_u8)
    bar = image_progress_bar(len(images_u8), desc, progress)
    # spawn, not fork: a forked child inherits the parent's OpenMP thread pool in an undefined state.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(method, options)) as pool:
        futures = [pool.submit(_purify_rows, offset + s, images_u8[s : s + batch_size], seed)
                   for s in range(0, len(images_u8), batch_size)]
        for future in as_completed(futures):
            try:
                start, part = future.result()
            except BrokenProcessPool:
                raise RuntimeError(f"a purification worker process died (killed, or out of memory?) while {workers} "
                                   f"workers purified {len(images_u8)} images with {method}") from None
            out[start - offset : start - offset + len(part)] = part
            if bar is not None:
                bar.update(len(part))
    if bar is not None:
        bar.close()
    return out
