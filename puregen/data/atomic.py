"""Atomic file and directory writes.

Everything is first written to a hidden temporary sibling (same directory,
hence same file system) and then moved into place with ``os.replace``.  A
crash at any point leaves either the old output or the new one, never a
half-written file, and an existing output is only replaced once the new one
is complete.  Leftover temporaries are named ``.<name>.<random>.tmp`` (JSON files:
``.<name>.tmp-<pid>``); a job's orphan sweep (engine.job_folder) knows both.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator

import numpy as np

from puregen.errors import InputError

__all__ = ["atomic_write_file", "atomic_directory", "write_npz_atomic", "write_json_atomic"]


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once: os.umask can only be queried by setting it.
_UMASK = _current_umask()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _prepare_parent(path: Path) -> Path:
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise InputError(f"{path}: cannot create parent directory {parent} (a file is in the way)") from None
    except OSError as e:
        raise InputError(f"{path}: cannot create parent directory {parent}: {e.strerror or e}") from None
    return parent


@contextlib.contextmanager
def atomic_write_file(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """Context manager yielding a binary file; on success it replaces ``path``.

    On an exception the temporary file is removed and ``path`` is untouched.
    Parent directories are created as needed.  The data is fsynced before the
    rename.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a directory; cannot write a file there")
    parent = _prepare_parent(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise InputError(f"{path}: cannot write: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except OSError as e:  # disk full, quota, I/O error: name the file being written
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise InputError(f"{path}: cannot write: {e.strerror or e}") from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(parent)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Context manager yielding an empty temporary directory that becomes ``path``.

    On success: if ``path`` does not exist the temporary directory is renamed
    to it; if it exists (a directory) it is first renamed aside, the new one
    moved into place, and only then is the old one deleted.  The caller
    decides beforehand whether replacing an existing directory is allowed.
    On an exception the temporary directory is deleted and ``path`` is
    untouched.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{path}: exists and is not a directory")
    parent = _prepare_parent(path)
    try:
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp"))
    except OSError as e:
        raise InputError(f"{path}: cannot write: {e.strerror or e}") from None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)
        _fsync_dir(tmp)
        if path.exists():
            # rename() may replace an *empty* directory: reserve a unique name.
            old = Path(tempfile.mkdtemp(dir=parent, prefix=f".{path.name}.", suffix=".old"))
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise InputError(f"{path}: cannot write: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(parent)


def write_npz_atomic(path: str | os.PathLike, /, **arrays) -> Path:
    """Write ``arrays`` to an uncompressed ``.npz`` at ``path``, atomically.

    The file name is used as given (no ``.npz`` is appended).  Object arrays
    are refused, so every file written here loads with ``allow_pickle=False``.
    Returns the path.
    """
    path = Path(path)
    if not arrays:
        raise InputError(f"{path}: no arrays to write")
    clean = {}
    for key, value in arrays.items():
        arr = np.asarray(value)
        if arr.dtype.hasobject:
            raise InputError(f"{path}: array {key!r} has dtype object; refusing to write pickled data")
        clean[key] = arr
    with atomic_write_file(path) as f:
        np.savez(f, **clean)
    return path


def write_json_atomic(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` as indented JSON with sorted keys, fsynced, then renamed into place."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise InputError(f"{path}: cannot write: {e.strerror or e}") from None
