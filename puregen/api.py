"""The Python API: load a purifier, purify arrays, streams and dataset files."""

from __future__ import annotations

import os

from .engine.evaluator import DEFAULT_MICRO_BATCH
from .engine.factory import build_purifier
from .engine.pipeline import DEFAULT_CHUNK_SIZE, run_job
from .engine.purifiers import Purifier


def load_purifier(
    method: str,
    checkpoint=None,
    *,
    ebm=None,
    ddpm=None,
    preset: str = "paper",
    device: str = "cpu",
    precision: str = "fp32",
    backend: str = "torch",
    micro_batch: int = DEFAULT_MICRO_BATCH,
    threads: int | None = None,
    **overrides,
) -> Purifier:
    """A ready purifier. `checkpoint` is the one network of `ebm` or `ddpm` methods.

    `overrides`: steps, t_star, reps, filter_frac, energy_threshold, jpeg_quality.
    """
    if checkpoint is not None:
        if method == "ebm":
            ebm = checkpoint
        elif method == "ddpm":
            ddpm = checkpoint
        else:
            raise TypeError(f"method {method!r} takes ebm= and ddpm= checkpoints, not one checkpoint")
    return build_purifier(
        method, ebm=ebm, ddpm=ddpm, preset=preset, device=device, precision=precision, backend=backend,
        micro_batch=micro_batch, threads=threads, **overrides,
    )


def purify(images, method: str = "ebm", *, seed: int = 0, indices=None, offset: int = 0, **load_kwargs):
    """One-call purification of an array or tensor; returns the same kind it was given."""
    return load_purifier(method, **load_kwargs).purify(images, seed=seed, indices=indices, offset=offset)


def purify_dataset(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    method: str = "ebm",
    *,
    seed: int = 0,
    batch_size: int = 64,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    resume: bool = False,
    overwrite: bool = False,
    limit: int | None = None,
    input_format: str | None = None,
    progress: bool = True,
    purifier: Purifier | None = None,
    **load_kwargs,
) -> dict:
    """Purify a dataset file or folder into `output_path`; returns the manifest."""
    if purifier is None:
        purifier = load_purifier(method, **load_kwargs)
    return run_job(
        input_path, output_path, purifier, seed=seed, batch_size=batch_size, chunk_size=chunk_size,
        resume=resume, overwrite=overwrite, limit=limit, input_format=input_format, progress=progress,
    )
