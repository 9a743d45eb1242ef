"""``.npz`` / ``.npy`` image files (never unpickled: object arrays are refused).

* ``.npz``: images in array ``x`` (alias ``images``), uint8 NHWC (3-D NHW is
  single-channel); optional labels in ``y`` (alias ``labels``), integers.
  Other arrays in the archive are ignored; having both a name and its alias
  is refused as ambiguous.
* ``.npy``: one uint8 image array; labels are ``None``.

Files must hold uint8 images: float arrays are refused (convert and quantize
before saving).  Truncated or corrupt files raise ``InputError``
("truncated or corrupt"), and so do bytes after an array's data.

Reading is bounded by the headers: each array's declared shape and dtype are
checked against the input limit (:func:`puregen.data.validation.max_input_bytes`)
and against the bytes its file (or zip member) holds before its data is
read; a compressed zip member may not declare more than deflate could
expand it to.  Only regular files are opened (a FIFO under a ``.npz`` name
is refused, not waited on).
"""

from __future__ import annotations

import io
import math
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib import format as npy_format

from puregen.data.atomic import atomic_write_file, write_npz_atomic
from puregen.data.dataset import ImageDataset
from puregen.data.validation import check_declared_bytes, open_regular_file, read_upto, validate_images_uint8, validate_labels
from puregen.errors import InputError

__all__ = ["IMAGE_KEYS", "LABEL_KEYS", "read_npz", "read_npy", "write_npz", "write_npy"]

IMAGE_KEYS = ("x", "images")
LABEL_KEYS = ("y", "labels")


_MAX_HEADER = 10000  # bytes of .npy header text (numpy's own default limit)
_DEFLATE_MAX_RATIO = 1032  # the most deflate expands (a member never yields more than its declared size)
_CHUNK = 1 << 20
_PICKLED = "holds pickled (object) data, which is refused; arrays must be plain uint8/int"


def _corrupt(src: str, e: BaseException | str) -> InputError:
    why = e if isinstance(e, str) else f"{type(e).__name__}: {e}"
    return InputError(f"{src}: truncated or corrupt file ({why})")


def _read_npy(f: Any, size: int, src: str, what: str) -> np.ndarray:
    """The array of a .npy payload read from ``f``, which holds exactly ``size`` bytes from where it is.

    The header is parsed first; its shape and dtype are checked against the
    input limit and against ``size`` before any data is read.  Bytes after
    the data are an error.
    """
    # The header's length is read and checked here, before numpy reads (and allocates) that many bytes.
    try:
        prefix = read_upto(f, 10)
    except Exception as e:
        raise _corrupt(src, f"{what}: {type(e).__name__}: {e}") from None
    if len(prefix) < 10 or prefix[:6] != b"\x93NUMPY":
        raise _corrupt(src, f"{what}: no complete .npy header ({len(prefix)} bytes)")
    version = (prefix[6], prefix[7])
    if version not in ((1, 0), (2, 0)):
        raise InputError(f"{src}: {what} is in .npy format version {version}; puregen reads 1.0 and 2.0")
    try:
        if version == (1, 0):
            length_field, hlen = prefix[8:10], int.from_bytes(prefix[8:10], "little")
        else:
            length_field = prefix[8:10] + read_upto(f, 2)
            hlen = int.from_bytes(length_field, "little")
        if hlen > _MAX_HEADER:
            raise _corrupt(src, f"{what}: .npy header of {hlen} bytes (at most {_MAX_HEADER})")
        text = read_upto(f, hlen)
    except InputError:
        raise
    except Exception as e:  # zip and zlib errors, EOFError
        raise _corrupt(src, f"{what}: {type(e).__name__}: {e}") from None
    if len(text) < hlen:
        raise _corrupt(src, f"{what}: .npy header cut short ({len(text)} of {hlen} bytes)")
    header_size = 6 + 2 + len(length_field) + hlen
    try:
        raw_header = io.BytesIO(prefix[:8] + length_field + text)
        npy_format.read_magic(raw_header)
        read_header = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
        shape, fortran, dtype = read_header(raw_header, max_header_size=_MAX_HEADER)
    except Exception as e:  # ValueError, SyntaxError (a bad header literal), ...
        raise _corrupt(src, f"{what}: bad .npy header: {type(e).__name__}: {e}") from None
    if any(d < 0 for d in shape):
        raise _corrupt(src, f"{what}: bad .npy header: negative dimension in shape {tuple(shape)}")
    if dtype.hasobject:
        raise InputError(f"{src}: {_PICKLED}")
    if dtype.itemsize == 0:
        raise InputError(f"{src}: {what} has dtype {dtype} of size 0; arrays must be plain uint8/int")
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    check_declared_bytes(nbytes, src, f"{what} of shape {tuple(shape)} and dtype {dtype}")
    available = size - header_size
    if available < nbytes:
        raise _corrupt(
            src, f"{what}: shape {tuple(shape)} ({dtype}) needs {nbytes} data bytes, the file holds {available}"
        )
    if available > nbytes:
        raise InputError(
            f"{src}: {available - nbytes} unexpected trailing bytes after the data of {what} "
            f"(shape {tuple(shape)}, {dtype}: {nbytes} bytes)"
        )
    arr = np.empty(count, dtype=dtype)
    view = memoryview(arr.view(np.uint8)) if count else memoryview(b"")
    got = 0
    try:
        while got < nbytes:
            n = f.readinto(view[got : got + _CHUNK])
            if not n:
                break
            got += n
        extra = f.read(1)
    except Exception as e:  # zipfile.BadZipFile (CRC), zlib.error, EOFError, OSError
        raise _corrupt(src, f"{what}: {type(e).__name__}: {e}") from None
    if got < nbytes:
        raise _corrupt(src, f"{what}: {got} of {nbytes} data bytes")
    if extra:
        raise InputError(f"{src}: unexpected trailing bytes after the data of {what}")
    if fortran:
        return arr.reshape(shape[::-1]).transpose()
    return arr.reshape(shape)


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, src: str) -> np.ndarray:
    what = f"array {info.filename!r}"
    if info.compress_type == zipfile.ZIP_DEFLATED and info.file_size > info.compress_size * _DEFLATE_MAX_RATIO + 1024:
        raise _corrupt(
            src, f"{what}: zip member declares {info.file_size} bytes but holds {info.compress_size} compressed"
        )
    if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
        raise _corrupt(src, f"{what}: stored zip member declares {info.file_size} bytes, holds {info.compress_size}")
    try:
        member = zf.open(info)
    except Exception as e:  # BadZipFile, NotImplementedError (compression), RuntimeError (encrypted)
        raise _corrupt(src, e) from None
    with member:
        return _read_npy(member, info.file_size, src, what)


def _open_checked(path: Path, src: str, what: str) -> tuple[Any, int, bool]:
    """(open file, size, is_zip); anything neither zip nor .npy is refused before it is parsed."""
    f = open_regular_file(path, what)
    try:
        size = os.fstat(f.fileno()).st_size
        head = f.read(6)
        f.seek(0)
    except OSError as e:
        f.close()
        raise InputError(f"{src}: cannot read: {e.strerror or e}") from None
    if not (head.startswith(b"PK") or head == b"\x93NUMPY"):
        f.close()
        raise InputError(f"{src}: truncated or corrupt file (not {what}: no zip or .npy header)")
    return f, size, head.startswith(b"PK")


def _pick_key(keys: list[str], names: tuple[str, str], src: str, required: bool) -> str | None:
    present = [k for k in names if k in keys]
    if len(present) > 1:
        raise InputError(f"{src}: has both arrays {names[0]!r} and {names[1]!r}; keep only one")
    if present:
        return present[0]
    if required:
        found = ", ".join(repr(k) for k in keys) or "none"
        raise InputError(
            f"{src}: no image array; expected {names[0]!r} (or {names[1]!r}), found arrays: {found}"
        )
    return None


def _zip_arrays(f: Any, src: str, wanted: tuple[tuple[str, str], ...]) -> list[np.ndarray | None]:
    """The arrays named by ``wanted`` ((image names), (label names)) in an .npz archive."""
    try:
        zf = zipfile.ZipFile(f)
    except Exception as e:  # BadZipFile, OSError, ValueError, ...
        raise _corrupt(src, e) from None
    with zf:
        infos = {}
        for info in zf.infolist():
            key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            infos[key] = info  # like np.load: the last member of a name wins
        keys = list(infos)
        out = []
        for i, names in enumerate(wanted):
            k = _pick_key(keys, names, src, required=i == 0)
            if k is None:
                out.append(None)
                continue
            info = infos[k]
            if not info.filename.endswith(".npy"):
                raise InputError(f"{src}: member {info.filename!r} is not a .npy array")
            out.append((k, _read_member(zf, info, src)))
        return out


def read_npz(path: str | os.PathLike, *, num_classes: int | None = None) -> ImageDataset:
    """Read an ``.npz`` with ``x``/``images`` and optional ``y``/``labels``."""
    path = Path(path)
    src = str(path)
    f, size, is_zip = _open_checked(path, src, "an .npz archive")
    with f:
        if not is_zip:  # a .npy payload under an .npz name
            images = validate_images_uint8(_read_npy(f, size, src, "the array"), src, name="array")
            return ImageDataset(images, None, src, num_classes)
        (ik, images), lab = _zip_arrays(f, src, (IMAGE_KEYS, LABEL_KEYS))
    lk, labels = lab if lab is not None else (None, None)
    images = validate_images_uint8(images, src, name=f"array {ik!r}")
    label_dtype = None
    if labels is not None:
        label_dtype = labels.dtype.name if labels.dtype.kind in "iu" else None  # kept when written back
        labels = validate_labels(labels, images.shape[0], src, num_classes, name=f"array {lk!r}")
    return ImageDataset(images, labels, src, num_classes, label_dtype=label_dtype)


def read_npy(path: str | os.PathLike, *, num_classes: int | None = None) -> ImageDataset:
    """Read a ``.npy`` holding uint8 images (no labels)."""
    path = Path(path)
    src = str(path)
    f, size, is_zip = _open_checked(path, src, "a .npy array")
    with f:
        if is_zip:
            raise InputError(f"{src}: is an .npz archive, not a .npy array; name it .npz")
        arr = _read_npy(f, size, src, "the array")
    images = validate_images_uint8(arr, src, name="array")
    return ImageDataset(images, None, src, num_classes)


def write_npz(path: str | os.PathLike, images: np.ndarray, labels: Any = None, *, label_dtype: Any = None) -> Path:
    """Atomically write images (``x``) and, if given, labels (``y``) to ``path``.

    Labels are stored as ``label_dtype`` (default int64; a reader's
    ``ImageDataset.label_dtype`` keeps what the input had), which must be an
    integer dtype that holds every label.
    """
    src = str(path)
    images = validate_images_uint8(images, src)
    arrays = {"x": images}
    if labels is not None:
        labels = validate_labels(labels, images.shape[0], src)
        arrays["y"] = labels.astype(stored_label_dtype(labels, label_dtype, src))
    return write_npz_atomic(path, **arrays)


def stored_label_dtype(labels: np.ndarray, label_dtype: Any, src: str) -> np.dtype:
    """The integer dtype `write_npz` stores int64 `labels` as (default int64); an error if they do not fit."""
    dtype = np.dtype(np.int64 if label_dtype is None else label_dtype)
    if dtype.kind not in "iu":
        raise InputError(f"{src}: labels can only be stored as integers, not {dtype}")
    info = np.iinfo(dtype)
    if len(labels) and (labels.min() < info.min or labels.max() > info.max):
        raise InputError(f"{src}: labels {labels.min()}..{labels.max()} do not fit in {dtype}")
    return dtype


def write_npy(path: str | os.PathLike, images: np.ndarray) -> Path:
    """Atomically write uint8 images to a ``.npy`` file."""
    path = Path(path)
    images = validate_images_uint8(images, str(path))
    with atomic_write_file(path) as f:
        np.save(f, images, allow_pickle=False)
    return path

