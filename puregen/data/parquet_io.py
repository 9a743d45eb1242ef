"""Parquet shards (`pyarrow`): read one ``.parquet`` file, a folder of them or a glob as one dataset; write it back.

The layout of a file:

* ``image``: either encoded images (``binary``: PNG, JPEG, or any format PIL
  reads, decoded by the image-folder rules of :mod:`puregen.data.folder`),
  or raw pixels: a ``list<uint8>`` or ``fixed_size_list<uint8>`` (or a
  ``binary``) of ``H*W*C`` bytes in HWC order per row, with the shape stored
  in the file's schema metadata as ``puregen.image_shape`` = ``"H,W,C"``
  (JSON ``[H, W, C]`` is also read).  The metadata key is what tells raw
  bytes from encoded ones.
* ``label`` (optional): integer class labels.
* every other column: carried through to the output unchanged.

Writing keeps the sharding: one output file per input file, under the same
name inside the output folder, with the same rows in the same order, the
same schema (metadata included) and every column but ``image`` untouched.
Purified images are stored as the input stored them: raw stays raw, and an
encoded image becomes a lossless PNG (a JPEG too, as in an image folder,
since encoding purified pixels as JPEG again would change them).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from puregen.data.atomic import atomic_directory
from puregen.data.dataset import ImageDataset
from puregen.data.folder import decode_image_bytes
from puregen.data.shards import Shard, ShardLayout, shard_files
from puregen.errors import InputError

__all__ = ["IMAGE_COLUMN", "LABEL_COLUMN", "SHAPE_KEY", "read_parquet", "write_parquet_shards"]

IMAGE_COLUMN = "image"
LABEL_COLUMN = "label"
SHAPE_KEY = b"puregen.image_shape"


def _read_table(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path}: cannot read as Parquet (corrupt or truncated file: {e})") from None


def _raw_shape(schema, path: Path) -> tuple[int, int, int] | None:
    meta = schema.metadata or {}
    if SHAPE_KEY not in meta:
        return None
    text = meta[SHAPE_KEY].decode("utf-8", "replace").strip()
    try:
        dims = json.loads(text) if text.startswith("[") else [int(d) for d in text.split(",")]
        h, w, c = (int(d) for d in dims)
    except (ValueError, TypeError):
        raise InputError(f"{path}: schema metadata {SHAPE_KEY.decode()} = {text!r} is not 'H,W,C'") from None
    if min(h, w) < 1 or c not in (1, 3):
        raise InputError(f"{path}: raw image shape {h}x{w}x{c} is not HxWx1 or HxWx3")
    return h, w, c


def _decode_images(column, path: Path, shape) -> np.ndarray:
    """The column's images as uint8 NHWC; ``shape`` (raw pixels) or None (encoded images)."""
    import pyarrow as pa

    values = column.to_pylist()
    if not values:
        raise InputError(f"{path}: the shard holds no rows (an empty shard cannot be kept)")
    if shape is None:
        if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
            raise InputError(
                f"{path}: column {IMAGE_COLUMN!r} has type {column.type}; expected encoded image bytes (binary), "
                f"or raw uint8 pixels with the shape in the schema metadata {SHAPE_KEY.decode()}"
            )
        out = []
        for i, v in enumerate(values):
            if v is None:
                raise InputError(f"{path}: row {i}: the image is null")
            arr = decode_image_bytes(v, f"{path}: row {i}")
            out.append(arr if arr.ndim == 3 else arr[:, :, None])
            if out[-1].shape != out[0].shape:
                raise InputError(f"{path}: row {i}: image is {out[-1].shape} but row 0 is {out[0].shape}")
        return np.stack(out)
    size = shape[0] * shape[1] * shape[2]
    out = np.empty((len(values),) + shape, np.uint8)
    for i, v in enumerate(values):
        if v is None:
            raise InputError(f"{path}: row {i}: the image is null")
        arr = np.frombuffer(v, np.uint8) if isinstance(v, bytes) else np.asarray(v)
        if arr.size != size or (arr.size and (arr.min() < 0 or arr.max() > 255)):
            raise InputError(f"{path}: row {i}: raw image has {arr.size} values, expected {size} uint8 for {shape}")
        out[i] = arr.astype(np.uint8).reshape(shape)
    return out


def read_parquet(path: str | os.PathLike, *, num_classes: int | None = None) -> ImageDataset:
    """Read Parquet shards (see the module docs) as one :class:`ImageDataset` with its `ShardLayout`."""
    root, files = shard_files(path, ".parquet")
    parts, labels, shards, encodings, first = [], [], [], set(), None
    start = 0
    for f, name in files:
        table = _read_table(f)
        if IMAGE_COLUMN not in table.column_names:
            raise InputError(f"{f}: no {IMAGE_COLUMN!r} column (columns: {', '.join(table.column_names)})")
        shape = _raw_shape(table.schema, f)
        images = _decode_images(table.column(IMAGE_COLUMN), f, shape)
        if first is not None and images.shape[1:] != first[1].shape[1:]:
            raise InputError(
                f"{f}: images are {images.shape[1:]} but {first[0].name} holds {first[1].shape[1:]}; "
                f"every shard must hold images of one shape"
            )
        first = first or (f, images)
        has_label = LABEL_COLUMN in table.column_names
        if parts and has_label != bool(labels):
            raise InputError(f"{f}: some shards have a {LABEL_COLUMN!r} column and others do not")
        if has_label:
            lab = table.column(LABEL_COLUMN).to_pylist()
            if any(v is None or isinstance(v, bool) or not isinstance(v, int) for v in lab):
                raise InputError(f"{f}: column {LABEL_COLUMN!r} must hold integer labels (no nulls)")
            labels.append(np.asarray(lab, np.int64))
        encodings.add("raw" if shape is not None else "encoded")
        parts.append(images)
        shards.append(Shard(name, start, start + len(images), table))
        start += len(images)
    if len(encodings) > 1:
        raise InputError(f"{path}: some shards hold raw pixels and others encoded images; use one kind")
    if start == 0:
        raise InputError(f"{path}: the shards hold no rows")
    layout = ShardLayout("parquet", tuple(shards), encodings.pop())
    return ImageDataset(
        np.concatenate(parts), np.concatenate(labels) if labels else None, str(path), num_classes,
        files=tuple(str(f) for f, _ in files), shards=layout,
    )


def _encode(images: np.ndarray, encoding: str):
    import pyarrow as pa

    if encoding == "raw":
        flat = images.reshape(len(images), -1)
        return pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel(), pa.uint8()), flat.shape[1])
    out = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img).save(buf, format="PNG", compress_level=1)
        out.append(buf.getvalue())
    return pa.array(out, pa.binary())


def write_parquet_shards(root: str | os.PathLike, images: np.ndarray, layout: ShardLayout) -> Path:
    """Write ``images`` as the shards of ``layout`` under the folder ``root`` (atomically); return ``root``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(root)
    with atomic_directory(root) as tmp:
        for s in layout.shards:
            table = s.extra
            i = table.column_names.index(IMAGE_COLUMN)
            column = _encode(images[s.start : s.stop], layout.encoding)
            old_type = table.schema.field(IMAGE_COLUMN).type
            if layout.encoding == "raw" and not pa.types.is_fixed_size_list(old_type):
                column = column.cast(old_type) if not pa.types.is_binary(old_type) else pa.array(
                    [bytes(r) for r in images[s.start : s.stop].reshape(s.stop - s.start, -1)], pa.binary())
            table = table.set_column(i, pa.field(IMAGE_COLUMN, column.type), column)
            table = table.replace_schema_metadata(s.extra.schema.metadata)
            pq.write_table(table, tmp / s.name)
    return root


def head_rows(table, k: int):
    """A table's first ``k`` rows (for `ShardLayout.head`)."""
    return table.slice(0, k)
