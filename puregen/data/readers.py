"""Read a dataset from any supported format: :func:`read_dataset`.

Formats (``format=`` names): ``"npz"``, ``"npy"``, ``"idx"``, ``"cifar"``,
``"folder"``.  Without ``format`` the format is detected:

Files, by name first:
  ``.npz`` -> npz; ``.npy`` -> npy; a name containing ``idx`` and ``ubyte``
  (e.g. ``t10k-images-idx3-ubyte.gz``) or ending ``.idx`` -> idx;
  ``data_batch_<k>``, ``test_batch``, ``.pkl``/``.pickle``, or
  ``train``/``test`` inside ``cifar-100-python/`` -> cifar.
Files, else by content (after un-gzipping the first bytes):
  zip (``PK``) -> npz; ``\\x93NUMPY`` -> npy; ``00 00 08 <1..4>`` -> idx;
  pickle protocol 2..5 header -> cifar.
Sharded (see :mod:`puregen.data.shards`): ``.parquet`` files, folders of
  them or globs -> parquet; ``.tar`` files, folders of them or globs ->
  webdataset (``"parquet"``, ``"webdataset"``).
Directories:
  a CIFAR python layout -> cifar; ``*images-idx3-ubyte*`` files -> idx
  (``split`` picks train/test); anything else -> folder.

A missing path or an undetectable format raises ``InputError``.  ``split``
('train' / 'test') applies only to CIFAR and IDX directories.
"""

from __future__ import annotations

import gzip
import os
import re
import zlib
from pathlib import Path

from puregen.data import cifar, folder, idx, npz_io
from puregen.data.shards import is_glob, sharded_format_of
from puregen.data.dataset import ImageDataset
from puregen.data.validation import open_regular_file
from puregen.errors import InputError

__all__ = ["FORMATS", "detect_format", "read_dataset"]

FORMATS = ("npz", "npy", "idx", "cifar", "folder", "parquet", "webdataset")


def _sniff(path: Path) -> bytes:
    # Opened non-blocking and checked to be a regular file first: a FIFO would hang a plain open().
    try:
        with open_regular_file(path, "a dataset file") as f:
            head = f.read(16)
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    if head[:2] == b"\x1f\x8b":
        try:
            with gzip.open(path, "rb") as g:
                head = g.read(16)
        except (EOFError, OSError, zlib.error):
            raise InputError(f"{path}: truncated or corrupt gzip data") from None
    return head


def detect_format(path: str | os.PathLike) -> str:
    """Return the format name for ``path`` (see module docs) or raise ``InputError``."""
    p = Path(path)
    sharded = sharded_format_of(p) if p.exists() or is_glob(path) else None
    if sharded is not None:
        return sharded
    if not p.exists():
        raise InputError(f"{p}: no such file or directory" + (" (the pattern matches no files)" if is_glob(path) else ""))
    if p.is_dir():
        if p.suffix.lower() in (".npz", ".npy"):
            raise InputError(f"{p}: is a directory, expected a {p.suffix.lower()} file")
        if cifar.is_cifar_dir(p):
            return "cifar"
        if idx.idx_images_in_dir(p):
            return "idx"
        return "folder"
    name = p.name.lower()
    suffix = p.suffix.lower()
    if suffix == ".npz":
        return "npz"
    if suffix == ".npy":
        return "npy"
    if ("idx" in name and "ubyte" in name) or suffix == ".idx" or name.endswith(".idx.gz"):
        return "idx"
    if re.fullmatch(r"data_batch_\d+|test_batch", p.name) or suffix in (".pkl", ".pickle"):
        return "cifar"
    if p.parent.name == "cifar-100-python" and p.name in ("train", "test"):
        return "cifar"
    head = _sniff(p)
    if head[:4] == b"PAR1":
        return "parquet"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "npz"
    if head[:6] == b"\x93NUMPY":
        return "npy"
    if len(head) >= 4 and head[:3] == b"\x00\x00\x08" and 1 <= head[3] <= 4:
        return "idx"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "cifar"
    raise InputError(
        f"{p}: unknown dataset format; expected .npz, .npy, IDX (*-images-idx3-ubyte[.gz]), "
        f"a CIFAR python batch, or an image folder (root/<class>/*.png)"
    )


def read_dataset(
    path: str | os.PathLike,
    *,
    format: str | None = None,
    num_classes: int | None = None,
    split: str | None = None,
) -> ImageDataset:
    """Read images (uint8 NHWC) and labels from ``path``; see the module docs for formats.

    ``num_classes`` (if given) is checked against the labels and stored on
    the result.  Every problem with the input raises ``InputError`` naming
    the offending file.
    """
    p = Path(path)
    if not p.exists() and not (is_glob(path) and format in (None, "parquet", "webdataset")):
        raise InputError(f"{p}: no such file or directory")
    if format is None:
        format = detect_format(p)
    elif format not in FORMATS:
        raise InputError(f"{p}: unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    is_dir = p.is_dir()
    if split is not None and not (is_dir and format in ("cifar", "idx")):
        raise InputError(f"{p}: split={split!r} only applies to a directory of CIFAR batches or IDX files")
    if format in ("npz", "npy") and is_dir:
        raise InputError(f"{p}: is a directory, expected a .{format} file")
    if format == "npz":
        ds = npz_io.read_npz(p, num_classes=num_classes)
    elif format == "npy":
        ds = npz_io.read_npy(p, num_classes=num_classes)
    elif format == "idx":
        if is_dir:
            ds = idx.read_idx_directory(p, split=split, num_classes=num_classes)
        else:
            ds = idx.read_idx_dataset(p, num_classes=num_classes)
    elif format == "parquet":
        from puregen.data.parquet_io import read_parquet

        ds = read_parquet(path, num_classes=num_classes)
    elif format == "webdataset":
        from puregen.data.webdataset_io import read_webdataset

        ds = read_webdataset(path, num_classes=num_classes)
    elif format == "cifar":
        ds = cifar.read_cifar(p, split=split, num_classes=num_classes)
    else:
        ds = folder.read_image_folder(p, num_classes=num_classes)
    if ds.files is None and not is_dir:
        ds.files = (str(p),)
    return ds
