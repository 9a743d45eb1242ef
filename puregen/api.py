"""The Python API: load a purifier, purify arrays, streams and dataset files."""

from __future__ import annotations

import os

from .engine.factory import load_purifier
from .data.output_target import output_format
from .engine.noise_key import check_seed
from .engine.pipeline import run_job
from .engine.purifiers import Purifier

__all__ = ["load_purifier", "purify", "purify_dataset"]

# Options of the job itself; every other keyword goes to `load_purifier`.
JOB_OPTIONS = ("batch_size", "chunk_size", "resume", "overwrite", "limit", "input_format", "split", "progress", "log",
               "on_chunk", "chunk_runner")


def purify(images, method: str = "ebm", *, seed: int = 0, indices=None, offset: int = 0, **load_options):
    """One-call purification of an array or tensor; returns the same kind it was given."""
    return load_purifier(method, **load_options).purify(images, seed=seed, indices=indices, offset=offset)


def purify_dataset(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    method: str = "ebm",
    *,
    seed: int = 0,
    purifier: Purifier | None = None,
    **options,
) -> dict:
    """Purify a dataset file or folder into `output_path`; returns the final manifest.

    Job options (see `run_job`): batch_size, chunk_size, resume, overwrite,
    limit, input_format, split, progress, log, on_chunk, chunk_runner. The rest load the purifier
    (see `load_purifier`) unless a ready `purifier` is given.
    """
    job = {key: options.pop(key) for key in JOB_OPTIONS if key in options}
    check_seed(seed)  # cheap checks before the checkpoints load
    output_format(output_path)
    if purifier is None:
        purifier = load_purifier(method, **options)
    elif options:
        raise TypeError(f"options {sorted(options)} load a purifier, but a ready purifier was given")
    return run_job(input_path, output_path, purifier, seed=seed, **job)
