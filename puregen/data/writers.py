"""Write a dataset: :func:`write_dataset` (atomic; single arrays: `puregen.data.atomic.write_npz_atomic`).

The target format comes from the path:

* a name containing ``images-idx3`` (e.g. ``train-images-idx3-ubyte.gz``)
  -> IDX images file (+ labels file beside it; single-channel only);
* a path ending in ``/``, a path with no suffix, or an existing directory
  -> image folder of PNGs (see :mod:`puregen.data.folder`);
* ``*.npz`` -> arrays ``x`` (uint8 NHWC) and ``y`` (int64; omitted without labels);
* ``*.npy`` -> ``x`` only (giving labels is an error: they would be lost);
* ``*.parquet`` / ``*.wds`` -> a folder of Parquet / WebDataset tar shards,
  one per input shard: only for a dataset read from shards of that format
  (an :class:`ImageDataset` carrying its ``shards``), see
  :mod:`puregen.data.parquet_io` and :mod:`puregen.data.webdataset_io`.

Every output is written to a temporary sibling and moved into place with
``os.replace``: a crash never leaves a half-written output, and an existing
output is only replaced once the new one is complete.  Directories are only
replaced when they look like an image folder (nothing but images and class
folders of images).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from puregen.data import folder, idx, npz_io
from puregen.data.dataset import ImageDataset
from puregen.data.output_target import output_format
from puregen.data.validation import validate_images_uint8
from puregen.errors import InputError

__all__ = ["write_dataset"]


def write_dataset(
    path: str | os.PathLike,
    images: Any,
    labels: Any = None,
    *,
    class_names: Sequence[str] | None = None,
    names: Sequence[str] | None = None,
    label_dtype: Any = None,
    overwrite: bool = True,
) -> Path:
    """Write uint8 NHWC images (and optional labels) to ``path``; return the path written.

    ``images`` may be a numpy uint8 array, a torch uint8 tensor (copied to
    the CPU) or an :class:`ImageDataset` (its labels / class names are used
    unless given).  Float images are refused: quantize them first.  With
    ``overwrite=False`` an existing target is an error.  ``names`` (an image
    folder's per-image relative paths, as its reader gives them) keep the
    sources' class folders and file names; ``label_dtype`` is the integer
    dtype the labels of a ``.npz`` are stored as (default int64).
    """
    p = Path(path)
    src = str(p)
    num_classes = None
    shards = None
    if isinstance(images, ImageDataset):
        shards = images.shards
        ds = images
        images = ds.images
        if labels is None:
            labels = ds.labels
            num_classes = ds.num_classes
            if class_names is None and ds.class_names is not None and labels is not None:
                class_names = list(ds.class_names)
            if label_dtype is None:
                label_dtype = ds.label_dtype
        if names is None:
            names = ds.names
    if isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8:
            raise InputError(f"{src}: images tensor has dtype {images.dtype}; images on disk must be uint8 NHWC")
        images = images.detach().cpu().numpy()
    if p.exists() and not overwrite and not (p.is_dir() and not any(p.iterdir())):
        raise InputError(f"{src}: already exists (overwrite=False)")
    fmt = output_format(path)
    if fmt != "folder" and class_names is not None:
        raise InputError(f"{src}: class_names can only be stored in an image folder")
    if fmt in ("parquet", "webdataset"):
        return _write_shards(p, fmt, images, labels, shards)
    if fmt == "idx":
        return idx.write_idx_dataset(p, images, labels)[0]
    if fmt == "folder":
        return folder.write_image_folder(
            p, images, labels, class_names, num_classes=num_classes, overwrite=overwrite, names=names
        )
    if fmt == "npz":
        return npz_io.write_npz(p, images, labels, label_dtype=label_dtype)
    if labels is not None:
        raise InputError(f"{src}: a .npy file cannot hold labels; write a .npz to keep them")
    return npz_io.write_npy(p, images)



def check_shards_writable(path, fmt: str, shards) -> None:
    """A sharded output rebuilds the shards of an input of its own format (their labels and extras kept)."""
    if shards is None or shards.format != fmt:
        got = "an unsharded dataset" if shards is None else f"{shards.format} shards"
        raise InputError(f"{path}: a {fmt} output rebuilds the shards of a {fmt} input, and the data is {got}; "
                         f"write .npz or an image folder instead")


def _write_shards(p: Path, fmt: str, images, labels, shards) -> Path:
    from puregen.data import parquet_io, webdataset_io

    images = validate_images_uint8(images, str(p))
    check_shards_writable(p, fmt, shards)  # labels travel in the shards' own column / cls member, unchanged
    if shards.shards[-1].stop != len(images):
        raise InputError(f"{p}: {len(images)} images for shards of {shards.shards[-1].stop} rows")
    if fmt == "parquet":
        return parquet_io.write_parquet_shards(p, images, shards)
    return webdataset_io.write_webdataset_shards(p, images, shards)
