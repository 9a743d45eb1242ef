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
  protocol 2; only ``str.encode('latin-1')`` is performed,
* ``__builtin__.bytes`` / ``builtins.bytes`` -- what Python 3 writes for an
  *empty* ``bytes`` object at protocol 2 (also the payload of a zero-image
  array); only ``bytes()`` with no argument is performed.

Any other global (``os.system``, ``builtins.eval``,
``numpy.core.multiarray.scalar``, protocol-5 ``numpy._core.numeric._frombuffer``
...) raises :class:`~puregen.errors.InputError` ("pickle references a
forbidden global") before anything is called.  No module is imported on a
pickle's behalf.

Defence in depth: the allowed names do **not** resolve to the real numpy
callables.  numpy's ``ndarray.__setstate__`` / ``dtype.__setstate__`` are C
code that trusts their state (e.g. dtype flags), so they never see data from
the file.  Instead the names resolve to small stand-ins that record the
pickled arguments and state, check them (plain numeric dtypes only: bool,
(u)int8..64, float16/32/64; shape and payload length must agree), and build
the array with ``np.frombuffer(...).reshape(...)``; the stand-ins are
replaced by the real arrays after loading.  Before unpickling, the opcodes
are walked with :mod:`pickletools` (nothing executed): forged length fields
fail there instead of making the unpickler allocate huge buffers, and the
opcodes for out-of-band buffers / bytearrays / persistent ids are refused.

Bounds (a small file must not take long or much memory):

* the file's size is checked against the input limit before it is read;
* memo indices are bounded (by :data:`MAX_MEMO_ENTRIES` and by the number of
  opcodes before them), so ``LONG_BINPUT 0x7fffffff`` cannot make the
  unpickler allocate a memo table of gigabytes;
* bytes built by the stand-ins (``_codecs.encode`` results, array copies)
  are charged to a budget proportional to the file's size, so memoised data
  referenced many times cannot be copied many times;
* swapping the stand-ins for arrays visits every shared object once
  (memoised by ``id``) and refuses structures deeper than 20 levels or with
  more than :data:`MAX_NODES` containers and items.

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

import io
import math
import os
import pickle
import pickletools
import re
from pathlib import Path
from typing import Any

import numpy as np

from puregen.data.atomic import atomic_write_file
from puregen.data.dataset import ImageDataset
from puregen.data.validation import read_file_bytes, validate_images_uint8, validate_labels
from puregen.errors import InputError

__all__ = [
    "ALLOWED_GLOBALS",
    "RestrictedUnpickler",
    "restricted_load",
    "load_cifar_batch",
    "read_cifar",
    "find_cifar_batches",
    "is_cifar_dir",
    "write_cifar_batch",
]


class _Refused(Exception):
    """Raised by the stand-ins below; turned into an InputError naming the file."""


# dtype codes a batch may hold (as numpy pickles them: np.dtype(code, False, True)).
_SAFE_DTYPE_CODES = frozenset({"b1", "u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "f2", "f4", "f8"})


def _as_text(v: Any) -> str | None:
    if isinstance(v, bytes):
        try:
            return v.decode("ascii")
        except UnicodeDecodeError:
            return None
    return v if isinstance(v, str) else None


class _DTypeStub:
    """Stands for ``numpy.dtype(code, align, copy)`` plus its pickled state."""

    def __init__(self, code: Any = None, align: Any = False, copy: Any = True):
        text = _as_text(code)
        if text not in _SAFE_DTYPE_CODES:
            raise _Refused(f"pickle holds an array of dtype {code!r}; only plain numeric dtypes are allowed")
        self.dtype = np.dtype(text)

    def __setstate__(self, state: Any) -> None:
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags[, metadata])
        if not isinstance(state, tuple) or len(state) < 2:
            raise _Refused("pickle holds a malformed dtype state")
        order = _as_text(state[1])
        if order not in ("|", "<", ">", "="):
            raise _Refused(f"pickle holds a dtype with byte order {state[1]!r}")
        if any(v is not None for v in state[2:5]):
            raise _Refused("pickle holds a structured or sub-array dtype; only plain numeric dtypes are allowed")
        if order in ("<", ">") and self.dtype.itemsize > 1:
            self.dtype = self.dtype.newbyteorder(order)
        # elsize / alignment / flags / metadata are ignored: they are implied by the code.


class _NdarrayToken:
    """Stands for ``numpy.ndarray`` (only used as _reconstruct's first argument)."""

    def __repr__(self) -> str:
        return "numpy.ndarray"


_NDARRAY = _NdarrayToken()


class _ArrayStub:
    """Result of ``_reconstruct(ndarray, (0,), b'b')``; BUILD fills it from the pickled state."""

    def __init__(self) -> None:
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 5:
            _version, shape, dt, fortran, raw = state
        elif isinstance(state, tuple) and len(state) == 4:  # very old numpy: no version field
            shape, dt, fortran, raw = state
        else:
            raise _Refused("pickle holds a malformed array state")
        if not isinstance(dt, _DTypeStub):
            raise _Refused("pickle holds an array without a plain numeric dtype")
        if not isinstance(shape, tuple) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise _Refused(f"pickle holds an array with a bad shape {shape!r}")
        if isinstance(raw, str):
            raw = raw.encode("latin-1")
        if not isinstance(raw, (bytes, bytearray)):
            raise _Refused(f"pickle holds array data of type {type(raw).__name__}, expected bytes")
        count = math.prod(shape)
        if len(raw) != count * dt.dtype.itemsize:
            raise _Refused(
                f"pickle holds an array of shape {shape} ({dt.dtype}) with {len(raw)} data bytes, "
                f"expected {count * dt.dtype.itemsize}"
            )
        arr = np.frombuffer(raw, dtype=dt.dtype, count=count).reshape(shape, order="F" if fortran else "C")
        self.array = np.array(arr, dtype=dt.dtype.newbyteorder("="), order="C")


def _reconstruct_stub(cls: Any = None, shape: Any = None, typecode: Any = None) -> _ArrayStub:
    if cls is not _NDARRAY:
        raise _Refused(f"pickle reconstructs an array of class {cls!r}; only numpy.ndarray is allowed")
    return _ArrayStub()


def _bytes_stub(*args: Any) -> bytes:
    """``bytes()``: Python 3's protocol-2 pickle of ``b''`` (an empty value, or a zero-image array's data)."""
    if args:
        raise _Refused(
            f"pickle calls bytes() with {len(args)} argument(s); only bytes() with none (an empty bytes "
            f"value) is allowed"
        )
    return b""


def _codecs_encode_stub(obj: Any = None, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    if (
        not isinstance(obj, str)
        or not isinstance(encoding, str)
        or encoding.replace("_", "-").lower() not in ("latin1", "latin-1")
    ):
        raise _Refused(
            f"pickle calls _codecs.encode({type(obj).__name__}, {encoding!r}); only "
            f"str.encode('latin-1') (how Python 3 pickles bytes) is allowed"
        )
    return obj.encode("latin-1")


#: (module, name) -> stand-in: the only globals a CIFAR batch pickle may use.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct_stub,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct_stub,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DTypeStub,
    ("_codecs", "encode"): _codecs_encode_stub,
    ("__builtin__", "bytes"): _bytes_stub,
    ("builtins", "bytes"): _bytes_stub,
}

#: The most memo entries a batch pickle may use (a CIFAR-100 train batch memoises ~50,000 names).
MAX_MEMO_ENTRIES = 1 << 20
#: The most containers and items :func:`_materialize` visits (each shared object once).
MAX_NODES = 1 << 22
_MAX_DEPTH = 20


class _Budget:
    """Bytes the stand-ins may build while one file is unpickled (a multiple of the file's size)."""

    def __init__(self, limit: int):
        self.left = limit

    def charge(self, nbytes: int) -> None:
        self.left -= nbytes
        if self.left < 0:
            raise _Refused(
                "pickle builds more data than the file holds (the same data referenced over and over); "
                "not a CIFAR batch"
            )


def _charged(fn: Any, budget: _Budget) -> Any:
    def call(*args: Any) -> Any:
        out = fn(*args)
        budget.charge(len(out))
        return out

    return call


class _ChargedArrayStub(_ArrayStub):
    def __init__(self, budget: _Budget) -> None:
        super().__init__()
        self._budget = budget

    def __setstate__(self, state: Any) -> None:
        super().__setstate__(state)
        self._budget.charge(self.array.nbytes)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only :data:`ALLOWED_GLOBALS` (to safe stand-ins).

    ``source`` names the file in the error message.  Use :func:`restricted_load`
    rather than this class directly: it also swaps the array stand-ins for
    real arrays and turns every failure into an ``InputError``.
    """

    def __init__(self, file, *, source: str, budget: int | None = None, **kwargs):
        super().__init__(file, **kwargs)
        self._source = source
        self._budget = _Budget(budget) if budget is not None else None

    def find_class(self, module: str, name: str) -> Any:
        obj = ALLOWED_GLOBALS.get((module, name))
        if obj is None:
            raise InputError(
                f"{self._source}: pickle references a forbidden global '{module}.{name}'; "
                f"CIFAR batches may only contain numpy arrays, lists, ints and bytes"
            )
        if self._budget is not None:
            if obj is _codecs_encode_stub:
                return _charged(obj, self._budget)
            if obj is _reconstruct_stub:
                budget = self._budget

                def reconstruct(*args: Any) -> _ArrayStub:
                    _reconstruct_stub(*args)  # the checks
                    return _ChargedArrayStub(budget)

                return reconstruct
        return obj


class _Materializer:
    """Replaces array stand-ins by their arrays inside dicts / lists / tuples.

    Every container is visited once (results memoised by ``id``: a pickle's
    shared references make a DAG whose tree unfolding can be exponential in
    the file's size), at most ``_MAX_DEPTH`` levels deep and at most
    ``max_nodes`` containers and items in all.
    """

    def __init__(self, max_nodes: int | None = None):
        self.done: dict[int, Any] = {}
        self.keep: list[Any] = []  # keeps visited objects alive, so their ids stay unique
        self.left = MAX_NODES if max_nodes is None else max_nodes

    def _count(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise _Refused("pickle holds too many objects for a CIFAR batch")

    def __call__(self, obj: Any, depth: int = 0) -> Any:
        if isinstance(obj, (int, float, bytes, str, bool)) or obj is None:
            return obj
        key = id(obj)
        if key in self.done:
            return self.done[key]
        if depth > _MAX_DEPTH:
            raise _Refused("pickle nests containers too deeply for a CIFAR batch")
        self._count(1)
        if isinstance(obj, _ArrayStub):
            if obj.array is None:
                raise _Refused("pickle holds an array that was never filled in")
            out = obj.array
        elif isinstance(obj, (_DTypeStub, _NdarrayToken)):
            raise _Refused("pickle holds a bare numpy type object")
        elif isinstance(obj, dict):
            self._count(len(obj))
            out = {k: self(v, depth + 1) for k, v in obj.items()}
        elif isinstance(obj, list):
            self._count(len(obj))
            if all(type(v) in (int, bytes, str) for v in obj):  # fast path: labels, filenames
                out = obj
            else:
                out = [self(v, depth + 1) for v in obj]
        elif isinstance(obj, tuple):
            self._count(len(obj))
            out = tuple(self(v, depth + 1) for v in obj)
        else:
            out = obj
        self.done[key] = out
        self.keep.append(obj)
        return out


def _materialize(obj: Any, max_nodes: int | None = None) -> Any:
    """Replace array stand-ins by their arrays (see :class:`_Materializer`)."""
    return _Materializer(max_nodes)(obj)


# Opcodes a CIFAR batch never needs: out-of-band buffers, bytearrays, persistent ids.
_REFUSED_OPCODES = frozenset({"BYTEARRAY8", "NEXT_BUFFER", "READONLY_BUFFER", "PERSID", "BINPERSID"})
_MEMO_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_MEMO_GETS = frozenset({"GET", "BINGET", "LONG_BINGET"})


def _prescan(data: bytes) -> None:
    """Walk the opcodes without executing them (pickletools): every length field is checked
    against the bytes actually present before the real unpickler allocates anything, and memo
    indices are bounded (the C unpickler sizes its memo table by the largest index it is given)."""
    if not data:
        raise _Refused("empty file")
    puts = 0  # memo entries stored so far
    stored: set[int] = set()
    for count, (op, arg, _pos) in enumerate(pickletools.genops(data)):
        name = op.name
        if name in _REFUSED_OPCODES:
            raise _Refused(f"pickle uses opcode {name}, which CIFAR batches never contain")
        if name in _MEMO_PUTS or name == "MEMOIZE":
            index = puts if name == "MEMOIZE" else arg
            if not isinstance(index, int) or index < 0 or index > count or index >= MAX_MEMO_ENTRIES:
                raise _Refused(
                    f"pickle stores memo entry {index!r} (after {count} opcodes; at most "
                    f"{MAX_MEMO_ENTRIES} entries are allowed): a forged pickle, not a CIFAR batch"
                )
            puts += 1
            if puts > MAX_MEMO_ENTRIES:
                raise _Refused(f"pickle uses more than {MAX_MEMO_ENTRIES} memo entries; not a CIFAR batch")
            stored.add(index)
        elif name in _MEMO_GETS and arg not in stored:
            raise _Refused(f"pickle reads memo entry {arg!r}, which it never stored: a corrupt or forged pickle")


def restricted_load(path: str | os.PathLike) -> Any:
    """Unpickle ``path`` with :class:`RestrictedUnpickler`; every failure is an ``InputError``.

    The file is read into memory (its size checked against the input limit
    first) and pre-scanned opcode by opcode (nothing executed) so that a
    forged length or memo index cannot make the unpickler allocate more than
    the file holds; see the module docs for the other bounds.
    """
    path = Path(path)
    src = str(path)
    data = read_file_bytes(path, "a CIFAR batch file")
    try:
        _prescan(data)
        # Bytes the stand-ins build: the latin-1 payload and its array copy, each at most the file's size.
        budget = 3 * len(data) + (1 << 16)
        obj = RestrictedUnpickler(io.BytesIO(data), source=src, encoding="bytes", budget=budget).load()
        return _materialize(obj)
    except InputError:
        raise
    except _Refused as e:
        raise InputError(f"{src}: {e}") from None
    except MemoryError:
        raise InputError(f"{src}: truncated or corrupt CIFAR pickle (ran out of memory reading it)") from None
    except RecursionError:
        raise InputError(f"{src}: truncated or corrupt CIFAR pickle (nested too deeply)") from None
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
    obj = restricted_load(path)
    if not isinstance(obj, dict):
        raise InputError(f"{src}: pickle holds a {type(obj).__name__}, not a CIFAR batch dict")
    data = _get(obj, "data")
    if data is None:
        keys = ", ".join(repr(k) for k in obj)
        raise InputError(f"{src}: CIFAR batch has no b'data' entry (keys: {keys})")
    if isinstance(data, (bytes, str, list, tuple, dict)) and len(data) == 0:
        raise InputError(f"{src}: CIFAR b'data' is empty (an empty {type(data).__name__}: no images)")
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
    test = [files["test_batch"]] if "test_batch" in files else []
    if not test and "test" in files and base.name == "cifar-100-python":
        test = [files["test"]]
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
    return ImageDataset(images, labels, str(p), num_classes, files=tuple(str(f) for f in files))


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
