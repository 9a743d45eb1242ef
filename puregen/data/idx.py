"""IDX files (MNIST / Fashion-MNIST), raw or gzip-compressed.

Format: 4-byte magic ``00 00 <dtype> <ndim>``, then ``ndim`` big-endian
uint32 dimensions, then the payload.  Only dtype ``0x08`` (unsigned byte) is
supported.  Images files hold ``(N, H, W)`` (magic ``0x00000803``), labels
files ``(N,)`` (magic ``0x00000801``).  The payload length must match the
dimensions exactly (a truncated file, or trailing bytes, is an error).
Compression is detected from the content (gzip magic ``1f 8b``), not the
name.

Reading is bounded by the header: the declared dimensions are checked
against the input limit (:func:`puregen.data.validation.max_input_bytes`)
and against what the file can hold (its size; for gzip, its size times
deflate's largest expansion ratio) before the payload is read; the payload is
then read (decompressed) in bounded pieces into an array of the declared
size, and reading stops as soon as a byte more than declared arrives.

The labels of an images file are looked up beside it: the file name with
``images-idx3`` replaced by ``labels-idx1`` (or ``images.idx3`` by
``labels.idx1``), trying the same compression first and then the other one
(``.gz`` added or removed).  No such file -> labels are ``None``; a
directory or other non-regular file under that name is an error.

A directory holding ``train-images-idx3-ubyte[.gz]`` and/or
``t10k-images-idx3-ubyte[.gz]`` can be read with ``split='train'|'test'``
(default train if present).
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from puregen.data.atomic import atomic_write_file
from puregen.data.dataset import ImageDataset
from puregen.data.validation import (
    check_declared_bytes,
    open_regular_file,
    read_upto,
    validate_images_uint8,
    validate_labels,
)
from puregen.errors import InputError

__all__ = [
    "read_idx",
    "read_idx_dataset",
    "read_idx_directory",
    "find_idx_labels",
    "labels_name_for",
    "is_idx_images_name",
    "idx_images_in_dir",
    "write_idx",
    "write_idx_dataset",
]

_UBYTE = 0x08
_TYPE_NAMES = {
    0x08: "unsigned byte",
    0x09: "signed byte",
    0x0B: "int16",
    0x0C: "int32",
    0x0D: "float32",
    0x0E: "float64",
}
_NAME_PAIRS = (("images-idx3", "labels-idx1"), ("images.idx3", "labels.idx1"))


# Deflate expands at most ~1032:1; anything a gzip file of n bytes decompresses to is below this.
_GZIP_MAX_RATIO = 1032
_CHUNK = 1 << 20  # bytes decompressed per read
_TRAILING_SHOWN = 1 << 20  # trailing bytes counted (gzip) before the message says "more than"


def _read_payload(stream, out: np.ndarray) -> int:
    """Fill ``out`` (1-D uint8) from ``stream`` in bounded pieces; returns how many bytes arrived."""
    view = memoryview(out)
    got = 0
    while got < len(out):
        n = stream.readinto(view[got : got + _CHUNK])
        if not n:
            break
        got += n
    return got


def _read_idx_stream(stream, src: str, ndim: int | None, file_size: int, compressed: bool) -> np.ndarray:
    head = read_upto(stream, 4)
    if len(head) < 4:
        raise InputError(f"{src}: truncated IDX file ({len(head)} bytes, no complete header)")
    magic = int.from_bytes(head, "big")
    if head[0] != 0 or head[1] != 0 or head[3] == 0:
        want = f" (expected 0x0000080{ndim})" if ndim else ""
        raise InputError(f"{src}: bad IDX magic number 0x{magic:08x}{want}; not an IDX file")
    code, nd = head[2], head[3]
    if code != _UBYTE:
        kind = _TYPE_NAMES.get(code, "unknown")
        raise InputError(
            f"{src}: IDX dtype code 0x{code:02x} ({kind}); only 0x08 (unsigned byte) is supported"
        )
    if ndim is not None and nd != ndim:
        raise InputError(
            f"{src}: IDX file has {nd} dimensions (magic 0x{magic:08x}); expected {ndim} "
            f"(magic 0x0000080{ndim})"
        )
    header = 4 + 4 * nd
    raw_dims = read_upto(stream, 4 * nd)
    if len(raw_dims) < 4 * nd:
        raise InputError(f"{src}: truncated IDX header ({4 + len(raw_dims)} bytes, need {header})")
    dims = struct.unpack(f">{nd}I", raw_dims)
    expected = math.prod(dims)
    # What the header declares, checked before a byte of the payload is read.
    check_declared_bytes(expected, src, f"IDX dimensions {dims}")
    if compressed:
        capacity = file_size * _GZIP_MAX_RATIO
        if header + expected > capacity:
            raise InputError(
                f"{src}: truncated or forged IDX file: dimensions {dims} declare {expected} bytes, but a "
                f"gzip file of {file_size} bytes cannot hold more than {capacity}"
            )
    else:
        got = file_size - header
        if got < expected:
            raise InputError(
                f"{src}: truncated IDX file: payload has {got} bytes, dimensions {dims} need {expected}"
            )
        if got > expected:
            raise InputError(
                f"{src}: IDX payload has {got - expected} unexpected trailing bytes "
                f"(dimensions {dims} need {expected})"
            )
    out = np.empty(expected, dtype=np.uint8)
    got = _read_payload(stream, out)
    if got < expected:
        raise InputError(
            f"{src}: truncated IDX file: payload has {got} bytes, dimensions {dims} need {expected}"
        )
    extra = len(read_upto(stream, _TRAILING_SHOWN + 1)) if compressed else len(stream.read(1))
    if extra:
        count = f"more than {_TRAILING_SHOWN}" if extra > _TRAILING_SHOWN else str(extra)
        raise InputError(
            f"{src}: IDX payload has {count} unexpected trailing bytes (dimensions {dims} need {expected})"
        )
    return out.reshape(dims)


def read_idx(path: str | os.PathLike, *, ndim: int | None = None) -> np.ndarray:
    """Read an unsigned-byte IDX file into a uint8 array of its dimensions.

    ``ndim`` (if given) is the number of dimensions the file must have.  The
    header is checked before the payload is read (see the module docs).
    """
    path = Path(path)
    src = str(path)
    with open_regular_file(path, "an IDX file") as f:
        file_size = os.fstat(f.fileno()).st_size
        compressed = f.read(2) == b"\x1f\x8b"
        f.seek(0)
        if not compressed:
            return _read_idx_stream(f, src, ndim, file_size, False)
        try:
            with gzip.GzipFile(fileobj=f, mode="rb") as g:
                return _read_idx_stream(g, src, ndim, file_size, True)
        except (EOFError, OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
            raise InputError(f"{src}: truncated or corrupt gzip data ({e})") from None


def labels_name_for(images_name: str) -> str | None:
    """Labels file name for an images file name, or None if it has no images-idx3 marker."""
    for a, b in _NAME_PAIRS:
        if a in images_name:
            return images_name.replace(a, b)
    return None


def is_idx_images_name(name: str) -> bool:
    return any(a in name for a, _ in _NAME_PAIRS)


def find_idx_labels(images_path: str | os.PathLike) -> Path | None:
    """The labels file beside an images file (see module docs), or None."""
    images_path = Path(images_path)
    name = labels_name_for(images_path.name)
    if name is None:
        return None
    alt = name[:-3] if name.endswith(".gz") else name + ".gz"
    found = None
    for cand in (name, alt):
        p = images_path.with_name(cand)
        if p.is_file():
            found = found or p
        elif p.exists() or p.is_symlink():
            # Skipping it would drop the labels without a word.
            what = "a directory" if p.is_dir() else "not a regular file"
            raise InputError(f"{p}: is {what}, expected the IDX labels file of {images_path.name}")
    return found


def read_idx_dataset(
    images_path: str | os.PathLike,
    *,
    num_classes: int | None = None,
    labels_path: str | os.PathLike | None = None,
) -> ImageDataset:
    """Read an IDX images file and (if found, see module docs) its labels file."""
    images_path = Path(images_path)
    src = str(images_path)
    images = validate_images_uint8(read_idx(images_path, ndim=3), src)
    lp = Path(labels_path) if labels_path is not None else find_idx_labels(images_path)
    labels = None
    if lp is not None:
        raw = read_idx(lp, ndim=1)
        if raw.shape[0] != images.shape[0]:
            raise InputError(f"{lp}: has {raw.shape[0]} labels but {src} has {images.shape[0]} images")
        labels = validate_labels(raw, images.shape[0], str(lp), num_classes)
    files = (src,) if lp is None else (src, str(lp))
    return ImageDataset(images, labels, src, num_classes, files=files)


def _split_of(name: str) -> str | None:
    low = name.lower()
    if low.startswith("train"):
        return "train"
    if low.startswith("t10k") or "test" in low:
        return "test"
    return None


def idx_images_in_dir(directory: str | os.PathLike) -> list[Path]:
    d = Path(directory)
    return sorted(p for p in d.iterdir() if p.is_file() and is_idx_images_name(p.name))


def read_idx_directory(
    directory: str | os.PathLike, *, split: str | None = None, num_classes: int | None = None
) -> ImageDataset:
    """Read the ``split`` images file (and its labels) from a directory of IDX files."""
    d = Path(directory)
    files = idx_images_in_dir(d)
    if not files:
        raise InputError(f"{d}: no IDX images files (*images-idx3-ubyte[.gz]) found")
    by_split: dict[str | None, list[Path]] = {}
    for f in files:
        by_split.setdefault(_split_of(f.name), []).append(f)
    if split is None:
        if len(files) == 1:
            return read_idx_dataset(files[0], num_classes=num_classes)
        split = "train" if "train" in by_split else "test"
    if split not in ("train", "test"):
        raise InputError(f"{d}: unknown split {split!r}; expected 'train' or 'test'")
    chosen = by_split.get(split, [])
    if not chosen:
        raise InputError(f"{d}: no IDX images file for split {split!r} among {[f.name for f in files]}")
    if len(chosen) > 1:
        # the same file raw and gzipped is fine: prefer the raw one
        stems = {f.name[:-3] if f.name.endswith(".gz") else f.name for f in chosen}
        if len(stems) > 1:
            raise InputError(f"{d}: several IDX images files for split {split!r}: {[f.name for f in chosen]}")
        chosen = sorted(chosen, key=lambda f: f.name.endswith(".gz"))
    return read_idx_dataset(chosen[0], num_classes=num_classes)


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, _UBYTE, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + np.ascontiguousarray(arr).tobytes()


def write_idx(path: str | os.PathLike, array: Any) -> Path:
    """Atomically write a uint8 array as IDX; gzip-compressed if ``path`` ends in ``.gz``."""
    path = Path(path)
    arr = np.asarray(array)
    if arr.dtype != np.uint8:
        raise InputError(f"{path}: IDX writer takes uint8 arrays, got {arr.dtype}")
    if not 1 <= arr.ndim <= 255:
        raise InputError(f"{path}: cannot write a {arr.ndim}-D array as IDX")
    data = _idx_bytes(arr)
    if path.name.endswith(".gz"):
        data = gzip.compress(data, compresslevel=6, mtime=0)
    with atomic_write_file(path) as f:
        f.write(data)
    return path


def check_idx_dataset(shape, labels: Any, src: str) -> np.ndarray | None:
    """What IDX can hold: single-channel NHWC images of `shape` and labels that fit in a byte."""
    if shape[3] != 1:
        raise InputError(f"{src}: IDX images must be single-channel; got C={shape[3]}")
    return None if labels is None else validate_labels(labels, shape[0], src, 256)


def write_idx_dataset(
    images_path: str | os.PathLike, images: np.ndarray, labels: Any = None
) -> tuple[Path, Path | None]:
    """Write single-channel images (and labels beside them) as IDX.

    The labels file name is derived as described in the module docs, so
    ``images_path`` must contain ``images-idx3`` (or ``images.idx3``) when
    labels are given.  Labels must fit in a byte (0..255).  Returns the two
    paths (labels path None when no labels).
    """
    images_path = Path(images_path)
    src = str(images_path)
    images = validate_images_uint8(images, src)
    labels = check_idx_dataset(images.shape, labels, src)
    labels_path = None
    if labels is not None:
        name = labels_name_for(images_path.name)
        if name is None:
            raise InputError(
                f"{src}: cannot name the labels file: the images file name must contain 'images-idx3'"
            )
        labels_path = images_path.with_name(name)
    write_idx(images_path, images[..., 0])
    if labels_path is not None:
        write_idx(labels_path, labels.astype(np.uint8))
    return images_path, labels_path
