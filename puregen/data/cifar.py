"""CIFAR-10 / CIFAR-100 "python version" batches, read without trusting pickle.

Each batch file is a pickled dict (written by Python 2's cPickle, protocol 2)::

    {b'batch_label': b'training batch 1 of 5',
     b'labels': [6, 9, ...],            # CIFAR-100: b'fine_labels' (+ b'coarse_labels')
     b'data': uint8 ndarray (N, 3072),  # per row: R plane, G plane, B plane, each 32x32 row-major
     b'filenames': [b'leptodactylus_pumilio_s_000004.png', ...]}

Loading uses :class:`RestrictedUnpickler` (``encoding='bytes'``) whose
``find_class`` resolves only the globals in :data:`ALLOWED_GLOBALS`:

* ``numpy.core.multiarray._reconstruct`` and ``numpy._core.multiarray._reconstruct``
  (ndarray reconstruction; the first name is what the original files hold,
  the second what numpy >= 2 writes),
* ``numpy.ndarray`` and ``numpy.dtype``,
* ``_codecs.encode`` -- what Python 3 writes for ``bytes`` objects at
  protocol 2; replaced by a wrapper that only does ``str.encode('latin-1')``.

The names are mapped straight to those objects: no module is imported on a
pickle's behalf.  Any other global (``os.system``, ``builtins.eval``,
``numpy.core.multiarray.scalar``, protocol-5 ``_frombuffer`` ...) raises
:class:`~puregen.errors.InputError` ("pickle references a forbidden global")
before anything is called.

A directory is read as follows (``split`` picks the part):

* ``cifar-10-batches-py/`` layout (the directory itself or that sub-folder):
  ``split='train'`` -> ``data_batch_1..N`` concatenated in numeric order;
  ``split='test'`` -> ``test_batch``.  Default: train if present, else test.
* ``cifar-100-python/`` layout (files ``train`` / ``test``): same rule.

Images are returned NHWC ``(N, 32, 32, 3)``; labels as int64 (``b'labels'``,
else ``b'fine_labels'``; ``None`` if neither is present).  ``num_classes`` is
left ``None`` unless the caller gives it.
"""

from __future__ import annotations

import math
import os
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np

from puregen.data.atomic import atomic_write_file
from puregen.data.dataset import ImageDataset
from puregen.data.validation import validate_images_uint8, validate_labels
from puregen.errors import InputError

__all__ = [
    "ALLOWED_GLOBALS",
    "RestrictedUnpickler",
    "load_cifar_batch",
    "read_cifar",
    "find_cifar_batches",
    "is_cifar_dir",
    "write_cifar_batch",
]

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct


def _latin1_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """Stand-in for ``_codecs.encode`` limited to what pickle uses it for."""
    if not isinstance(obj, str) or encoding.replace("_", "-").lower() not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is only allowed as str.encode('latin-1')")
    return obj.encode("latin-1", "strict")


#: (module, name) -> object: the only globals a CIFAR batch pickle may use.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only :data:`ALLOWED_GLOBALS`.

    ``source`` names the file in the error message.  Persistent ids are
    refused too (the base class already raises for them).
    """

    def __init__(self, file, *, source: str, **kwargs):
        super().__init__(file, **kwargs)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        obj = ALLOWED_GLOBALS.get((module, name))
        if obj is None:
            raise InputError(
                f"{self._source}: pickle references a forbidden global '{module}.{name}'; "
                f"CIFAR batches may only contain numpy arrays, lists, ints and bytes"
            )
        return obj


def _restricted_load(path: Path) -> Any:
    src = str(path)
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, source=src, encoding="bytes").load()
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"{src}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{src}: is a directory, expected a CIFAR batch file") from None
    except PermissionError:
        raise InputError(f"{src}: permission denied") from None
    except MemoryError:
        raise InputError(f"{src}: pickle is truncated or corrupt (ran out of memory while reading it)") from None
    except Exception as e:  # UnpicklingError, EOFError, ValueError, TypeError, ...
        raise InputError(f"{src}: truncated or corrupt CIFAR pickle ({type(e).__name__}: {e})") from None


def _get(d: dict, key: str) -> Any:
    """Look a key up as bytes (original files) or str (pickles written from Python 3 with str keys)."""
    if key.encode() in d:
        return d[key.encode()]
    return d.get(key)


def load_cifar_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """Load one batch file: ``(images uint8 NHWC, labels int64 or None)``."""
    path = Path(path)
    src = str(path)
    obj = _restricted_load(path)
    if not isinstance(obj, dict):
        raise InputError(f"{src}: pickle holds a {type(obj).__name__}, not a CIFAR batch dict")
    data = _get(obj, "data")
    if data is None:
        keys = ", ".join(repr(k) for k in obj)
        raise InputError(f"{src}: CIFAR batch has no b'data' entry (keys: {keys})")
    if not isinstance(data, np.ndarray):
        raise InputError(f"{src}: CIFAR b'data' is a {type(data).__name__}, expected a uint8 array")
    if data.dtype != np.uint8:
        raise InputError(f"{src}: CIFAR b'data' has dtype {data.dtype}; images on disk must be uint8")
    if data.ndim == 4 and data.shape[1] == 3:  # already (N, 3, H, W)
        n, _, h, w = data.shape
    elif data.ndim == 2:
        n, d = data.shape
        side = math.isqrt(d // 3) if d % 3 == 0 else 0
        if side == 0 or 3 * side * side != d:
            raise InputError(
                f"{src}: CIFAR b'data' has {d} values per row; expected 3*S*S (3072 for 32x32 RGB)"
            )
        h = w = side
    else:
        raise InputError(f"{src}: CIFAR b'data' has shape {data.shape}; expected (N, 3072)")
    images = np.ascontiguousarray(data.reshape(n, 3, h, w).transpose(0, 2, 3, 1))
    images = validate_images_uint8(images, src)

    raw_labels = _get(obj, "labels")
    if raw_labels is None:
        raw_labels = _get(obj, "fine_labels")
    labels = None
    if raw_labels is not None:
        if isinstance(raw_labels, (list, tuple)) and not all(
            isinstance(v, int) and not isinstance(v, bool) for v in raw_labels
        ):
            raise InputError(f"{src}: CIFAR labels must be a list of ints")
        try:
            arr = np.asarray(raw_labels)
        except Exception:
            raise InputError(f"{src}: CIFAR labels cannot be read as integers") from None
        labels = validate_labels(arr, n, src)
    return images, labels


_BATCH_RE = re.compile(r"^data_batch_(\d+)$")


def _cifar_layout(d: Path) -> Path | None:
    """The directory (``d`` or a known sub-folder) holding batch files, or None."""
    for cand in (d, d / "cifar-10-batches-py", d / "cifar-100-python"):
        if not cand.is_dir():
            continue
        names = {p.name for p in cand.iterdir() if p.is_file()}
        if "test_batch" in names or any(_BATCH_RE.match(n) for n in names):
            return cand
        if cand.name == "cifar-100-python" and ({"train", "test"} & names):
            return cand
    return None


def is_cifar_dir(path: str | os.PathLike) -> bool:
    """True if ``path`` is a directory in a CIFAR python layout."""
    p = Path(path)
    return p.is_dir() and _cifar_layout(p) is not None


def find_cifar_batches(directory: str | os.PathLike, split: str | None = None) -> list[Path]:
    """Batch files of ``split`` ('train' / 'test', default train if present) in a CIFAR directory."""
    d = Path(directory)
    base = _cifar_layout(d)
    if base is None:
        raise InputError(f"{d}: no CIFAR batch files (data_batch_*, test_batch, or cifar-100-python/train|test)")
    files = {p.name: p for p in base.iterdir() if p.is_file()}
    train = sorted(
        (p for n, p in files.items() if _BATCH_RE.match(n)), key=lambda p: int(_BATCH_RE.match(p.name).group(1))
    )
    if not train and "train" in files and base.name == "cifar-100-python":
        train = [files["train"]]
    test = [files[n] for n in ("test_batch", "test") if n in files and (n == "test_batch" or base.name == "cifar-100-python")]
    if split is None:
        split = "train" if train else "test"
    if split not in ("train", "test"):
        raise InputError(f"{d}: unknown split {split!r}; expected 'train' or 'test'")
    chosen = train if split == "train" else test
    if not chosen:
        raise InputError(f"{d}: no CIFAR {split} batch files found in {base}")
    return chosen


def read_cifar(
    path: str | os.PathLike, *, split: str | None = None, num_classes: int | None = None
) -> ImageDataset:
    """Read a CIFAR batch file, or a CIFAR directory (see module docs), as an :class:`ImageDataset`."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or directory")
    if p.is_dir():
        files = find_cifar_batches(p, split)
    else:
        if split is not None:
            raise InputError(f"{p}: split={split!r} only applies to a CIFAR directory, not a single batch file")
        files = [p]
    parts = [load_cifar_batch(f) for f in files]
    shapes = {im.shape[1:] for im, _ in parts}
    if len(shapes) > 1:
        raise InputError(f"{p}: CIFAR batches have different image shapes {sorted(shapes)}")
    has_labels = {lab is not None for _, lab in parts}
    if len(has_labels) > 1:
        raise InputError(f"{p}: some CIFAR batches have labels and some do not")
    images = parts[0][0] if len(parts) == 1 else np.concatenate([im for im, _ in parts])
    labels = None
    if parts[0][1] is not None:
        labels = parts[0][1] if len(parts) == 1 else np.concatenate([lab for _, lab in parts])
    return ImageDataset(images, labels, str(p), num_classes)


def write_cifar_batch(
    path: str | os.PathLike,
    images: np.ndarray,
    labels: Any,
    *,
    label_key: bytes = b"labels",
    batch_label: bytes = b"puregen batch",
    protocol: int = 2,
) -> Path:
    """Write a CIFAR-format batch (a plain ``pickle.dump`` of the dict), atomically.

    ``images``: uint8 NHWC with C=3 and square H=W; ``labels``: ints.  Use
    ``label_key=b'fine_labels'`` for a CIFAR-100 style batch.  Used by tests.
    """
    path = Path(path)
    src = str(path)
    images = validate_images_uint8(images, src)
    n, h, w, c = images.shape
    if c != 3 or h != w:
        raise InputError(f"{src}: CIFAR batches hold square RGB images; got shape {images.shape}")
    labels = validate_labels(labels, n, src)
    data = np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(n, 3 * h * w))
    obj = {
        b"batch_label": bytes(batch_label),
        label_key: [int(v) for v in labels],
        b"data": data,
        b"filenames": [f"image_{i:06d}.png".encode() for i in range(n)],
    }
    with atomic_write_file(path) as f:
        pickle.dump(obj, f, protocol=protocol)
    return path
