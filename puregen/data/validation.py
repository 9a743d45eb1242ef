"""Checks for images and labels at the edges of puregen.

Every function here raises :class:`puregen.errors.InputError` with one message
that starts with ``source`` (a file path, or a name such as ``"input"`` for
arrays handed to the Python API) and says what is wrong.

Conventions checked here:

* images on disk / at the API edge: ``uint8``, NHWC, ``C`` in {1, 3},
  ``N, H, W > 0``.  A 3-D array is read as NHW (single channel) and gets a
  trailing ``C = 1`` axis -- except when its last axis is 1 or 3, which is
  refused as "looks like a single HWC image" (add a batch axis instead);
* float images handed to the API: any floating dtype, finite, within [0, 1];
* labels: 1-D integer array (an ``(N, 1)`` column is accepted and flattened),
  length ``N``, non-negative, and ``< num_classes`` when that is known.
  Returned as ``int64``.
"""

from __future__ import annotations

import operator
import os
import stat
from typing import Any

import numpy as np
import torch

from puregen.errors import InputError

__all__ = [
    "check_image_shape",
    "validate_images_uint8",
    "validate_float_images",
    "validate_labels",
    "validate_num_classes",
    "MAX_INPUT_BYTES",
    "max_input_bytes",
    "check_declared_bytes",
    "check_regular_file",
    "open_regular_file",
    "read_file_bytes",
]


def _shape_str(shape) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def check_image_shape(shape, source: str, *, name: str = "images") -> tuple[int, int, int, int]:
    """Validate an image batch shape and return it as NHWC.

    ``(N, H, W, C)`` with ``C`` in {1, 3} is returned as is; ``(N, H, W)`` is
    returned as ``(N, H, W, 1)``.  Anything else raises ``InputError``.
    """
    shape = tuple(int(s) for s in shape)
    expected = "expected NHWC (N, H, W, C) with C in {1, 3}, or NHW for single-channel images"
    if len(shape) == 3:
        if shape[-1] in (1, 3):
            raise InputError(
                f"{source}: {name} have shape {_shape_str(shape)}, which looks like a single HWC image; "
                f"add a batch axis (shape (1, {shape[0]}, {shape[1]}, {shape[2]})); {expected}"
            )
        shape = shape + (1,)
    elif len(shape) != 4:
        raise InputError(f"{source}: {name} have shape {_shape_str(shape)} ({len(shape)}-D); {expected}")
    n, h, w, c = shape
    if c not in (1, 3):
        hint = ""
        if h in (1, 3):
            hint = " (this looks like NCHW; transpose to NHWC)"
        raise InputError(
            f"{source}: {name} have shape {_shape_str(shape)} with C={c} channels{hint}; {expected}"
        )
    if n == 0:
        raise InputError(f"{source}: {name} are empty (N=0, shape {_shape_str(shape)}); need at least one image")
    if h == 0 or w == 0:
        raise InputError(f"{source}: {name} have shape {_shape_str(shape)} with a zero height or width")
    return shape


def validate_images_uint8(arr: Any, source: str, *, name: str = "images") -> np.ndarray:
    """Check a numpy ``uint8`` image batch; return it as a C-contiguous NHWC array.

    3-D ``(N, H, W)`` arrays get a trailing channel axis (see module docs).
    No copy is made when the input is already contiguous NHWC.
    """
    if not isinstance(arr, np.ndarray):
        raise InputError(f"{source}: {name} must be a numpy array, got {type(arr).__name__}")
    if arr.dtype != np.uint8:
        raise InputError(f"{source}: {name} has dtype {arr.dtype}; images on disk must be uint8 NHWC")
    nhwc = check_image_shape(arr.shape, source, name=name)
    return np.ascontiguousarray(arr.reshape(nhwc))


def _fmt(v: float) -> str:
    return f"{v:.6g}"


def validate_float_images(arr: Any, source: str, *, name: str = "images"):
    """Check float images (numpy array or torch tensor) for the API.

    Checks the shape (NHWC, or NHW -> C=1), that every value is finite (the
    error counts the NaN and Inf values) and that all values lie in [0, 1]
    (the error reports the min and max found).  Returns the input reshaped to
    NHWC (a view, same kind and device; nothing is copied).

    For torch tensors the reductions run on the tensor's own device; only a
    few scalars are read back.
    """
    if isinstance(arr, torch.Tensor):
        if not arr.is_floating_point():
            raise InputError(f"{source}: {name} has dtype {arr.dtype}; expected a floating dtype")
        nhwc = check_image_shape(arr.shape, source, name=name)
        t = arr.detach()
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            n_nan = int(torch.isnan(t).sum().item())
            n_bad = int((~finite).sum().item())
            _raise_nonfinite(source, name, n_nan, n_bad - n_nan, t.numel())
        mn, mx = torch.aminmax(t.float()) if t.dtype in (torch.float16, torch.bfloat16) else torch.aminmax(t)
        mn, mx = float(mn.item()), float(mx.item())
        _check_range(source, name, mn, mx)
        return arr.reshape(nhwc)
    if isinstance(arr, np.ndarray):
        if arr.dtype.kind != "f":
            raise InputError(f"{source}: {name} has dtype {arr.dtype}; expected a floating dtype")
        nhwc = check_image_shape(arr.shape, source, name=name)
        finite = np.isfinite(arr)
        if not finite.all():
            n_nan = int(np.count_nonzero(np.isnan(arr)))
            n_bad = int(arr.size - np.count_nonzero(finite))
            _raise_nonfinite(source, name, n_nan, n_bad - n_nan, arr.size)
        _check_range(source, name, float(arr.min()), float(arr.max()))
        return arr.reshape(nhwc)
    raise InputError(f"{source}: {name} must be a numpy array or torch tensor, got {type(arr).__name__}")


def _raise_nonfinite(source: str, name: str, n_nan: int, n_inf: int, total: int) -> None:
    parts = []
    if n_nan:
        parts.append(f"{n_nan} NaN")
    if n_inf:
        parts.append(f"{n_inf} Inf")
    raise InputError(
        f"{source}: float {name} contain {n_nan + n_inf} non-finite values ({' and '.join(parts)}) "
        f"out of {total}; float images must be finite and in [0, 1]"
    )


def _check_range(source: str, name: str, mn: float, mx: float) -> None:
    if mn < 0.0 or mx > 1.0:
        hint = ""
        if mx > 1.0 and mx <= 255.0 and mn >= 0.0:
            hint = " (images in 0..255 must be given as uint8)"
        raise InputError(
            f"{source}: float {name} must lie in [0, 1]; found min {_fmt(mn)}, max {_fmt(mx)}{hint}"
        )


def validate_num_classes(num_classes: Any, source: str) -> int | None:
    """``None`` or an integer >= 1 (numpy integers accepted; bools refused)."""
    if num_classes is None:
        return None
    if isinstance(num_classes, (bool, np.bool_)):
        raise InputError(f"{source}: num_classes must be a positive integer, got {num_classes!r}")
    try:
        k = operator.index(num_classes)
    except TypeError:
        raise InputError(f"{source}: num_classes must be a positive integer, got {num_classes!r}") from None
    if k < 1:
        raise InputError(f"{source}: num_classes must be a positive integer, got {k}")
    return int(k)


def validate_labels(
    labels: Any,
    n: int,
    source: str,
    num_classes: int | None = None,
    *,
    name: str = "labels",
) -> np.ndarray:
    """Check labels and return them as a 1-D ``int64`` numpy array.

    Accepts numpy arrays, torch tensors (copied to the CPU) and sequences of
    ints.  An ``(n, 1)`` column is flattened.  Checks: integer dtype (bool and
    float are refused), length ``n``, values ``>= 0`` and, when
    ``num_classes`` is given, ``< num_classes``.
    """
    num_classes = validate_num_classes(num_classes, source)
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    elif not isinstance(labels, np.ndarray):
        try:
            labels = np.asarray(labels)
        except Exception as e:  # ragged lists and the like
            raise InputError(f"{source}: {name} cannot be read as an integer array ({e})") from None
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise InputError(f"{source}: {name} have shape {_shape_str(labels.shape)}; expected 1-D (N,)")
    if labels.shape[0] != n:
        raise InputError(f"{source}: {name} has length {labels.shape[0]} but there are {n} images")
    if labels.dtype.kind not in "iu":
        raise InputError(f"{source}: {name} has dtype {labels.dtype}; labels must be integers")
    if labels.size == 0:
        return labels.astype(np.int64)
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0:
        count = int(np.count_nonzero(labels < 0))
        raise InputError(f"{source}: {name} must be non-negative; found {count} negative values (min {lo})")
    if num_classes is not None and hi >= num_classes:
        count = int(np.count_nonzero(labels >= num_classes))
        raise InputError(
            f"{source}: {name} must be in [0, {num_classes}) (num_classes={num_classes}); "
            f"found {count} values out of range (max {hi})"
        )
    if hi > np.iinfo(np.int64).max:
        raise InputError(f"{source}: {name} has values too large for int64 (max {hi})")
    return np.ascontiguousarray(labels, dtype=np.int64)


#: The most bytes one array read from a file may hold (images, labels, a CIFAR batch file).  Every
#: reader checks the sizes a file declares against this (and against what the file can hold)
#: before it allocates anything.  Tests lower it; ``PUREGEN_MAX_INPUT_BYTES`` overrides it.
MAX_INPUT_BYTES = 8 << 30


def max_input_bytes() -> int:
    """The limit in force: ``$PUREGEN_MAX_INPUT_BYTES`` if set (a positive integer), else MAX_INPUT_BYTES."""
    env = os.environ.get("PUREGEN_MAX_INPUT_BYTES")
    if env:
        try:
            value = int(env)
        except ValueError:
            raise InputError(f"PUREGEN_MAX_INPUT_BYTES must be a positive integer, got {env!r}") from None
        if value < 1:
            raise InputError(f"PUREGEN_MAX_INPUT_BYTES must be a positive integer, got {env!r}")
        return value
    return MAX_INPUT_BYTES


def check_declared_bytes(nbytes: int, source: str, what: str) -> int:
    """Refuse a declared size beyond :func:`max_input_bytes` (before anything is allocated)."""
    limit = max_input_bytes()
    if nbytes > limit:
        raise InputError(
            f"{source}: {what} would take {nbytes} bytes, more than the {limit} bytes puregen reads from "
            f"one file (set PUREGEN_MAX_INPUT_BYTES to raise the limit); a forged or corrupt header?"
        )
    return nbytes


def _kind_of(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def _not_regular(src: str, mode: int, expected: str) -> InputError:
    kind = _kind_of(mode)
    if kind == "a directory":
        return InputError(f"{src}: is a directory, expected {expected}")
    return InputError(f"{src}: is {kind}, not a regular file; expected {expected}")


def _os_error(src: str, e: OSError, expected: str) -> InputError:
    if isinstance(e, FileNotFoundError):
        return InputError(f"{src}: no such file (or a broken symbolic link)")
    if isinstance(e, IsADirectoryError):
        return InputError(f"{src}: is a directory, expected {expected}")
    if isinstance(e, PermissionError):
        return InputError(f"{src}: permission denied")
    return InputError(f"{src}: cannot open: {e.strerror or e}")


def check_regular_file(path, expected: str) -> None:
    """``path`` must be (or link to) a regular file; FIFOs, devices, sockets, directories are refused.

    Never opens the file, so a FIFO cannot block.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise _os_error(str(path), e, expected) from None
    if not stat.S_ISREG(mode):
        raise _not_regular(str(path), mode, expected)


def open_regular_file(path, expected: str):
    """Open ``path`` for binary reading, refusing anything but a regular file.

    The file is opened non-blocking and checked with ``fstat`` before a byte
    is read, so a FIFO (or device) under a file's name raises ``InputError``
    instead of hanging.  A missing, unreadable or directory path is an
    ``InputError`` too.  Returns a binary file object (close it).
    """
    src = str(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise _os_error(src, e, expected) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(src, mode, expected)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_file_bytes(path, expected: str, max_bytes: int | None = None) -> bytes:
    """The whole file at `path`; a missing, unreadable, directory or non-regular path is an InputError.

    `expected` names what the file should be (e.g. "an IDX file"), for the message.  The file's
    size is checked against `max_bytes` (default :func:`max_input_bytes`) before it is read.
    """
    src = str(path)
    limit = max_input_bytes() if max_bytes is None else max_bytes
    with open_regular_file(path, expected) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise InputError(
                f"{src}: is {size} bytes, more than the {limit} bytes puregen reads as {expected} "
                f"(set PUREGEN_MAX_INPUT_BYTES to raise the limit)"
            )
        try:
            # read(n) allocates n bytes up front: ask for what fstat said (plus one, to see growth)
            data = f.read(size + 1)
        except OSError as e:
            raise InputError(f"{src}: cannot read: {e.strerror or e}") from None
    if len(data) > size:  # grew while being read
        raise InputError(f"{src}: changed size while being read")
    return data


def read_upto(stream, n: int) -> bytes:
    """Up to ``n`` bytes of ``stream`` (fewer only at its end), read in the pieces it gives."""
    parts, left = [], n
    while left > 0:
        block = stream.read(left)
        if not block:
            break
        parts.append(block)
        left -= len(block)
    return b"".join(parts)
