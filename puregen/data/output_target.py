"""Where a dataset will be written, decided and checked before any work starts.

A long purification job must not find out at the end that its output name
means no format, that the folder is read-only, or that writing would replace
the input.  :func:`plan_output` takes the output path (and whether labels
will be written) and returns an :class:`OutputTarget`: the format, every
path the output will occupy (an IDX images file brings its labels file), and
the checks that can be made without writing anything.  :func:`output_digest`
fingerprints the written files so that a finished job can be verified later.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from puregen.data import idx
from puregen.errors import InputError

__all__ = ["OutputTarget", "output_format", "plan_output", "output_digest", "resolved", "overlaps"]

OUTPUT_FORMATS = ("idx", "folder", "npz", "npy", "parquet", "webdataset")

# A sharded output is a folder named with its format's suffix: it receives one shard per input shard.
SHARDED_OUTPUT_SUFFIXES = {".parquet": "parquet", ".wds": "webdataset"}


def output_format(path: str | os.PathLike) -> str:
    """The format that writing to ``path`` produces (see :mod:`puregen.data.writers`)."""
    text = str(path)
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in SHARDED_OUTPUT_SUFFIXES:
        return SHARDED_OUTPUT_SUFFIXES[suffix]
    if text.endswith(("/", os.sep)) or p.is_dir():
        return "folder"
    if idx.is_idx_images_name(p.name):
        return "idx"
    suffix = p.suffix.lower()
    if suffix == "":
        return "folder"
    if suffix in (".npz", ".npy"):
        return suffix[1:]
    raise InputError(
        f"{text}: cannot tell the output format from the name; use .npz, .npy, an IDX images name "
        f"(*-images-idx3-ubyte[.gz]), a directory path ending in '/', or a shard folder named *.parquet "
        f"(Parquet shards) or *.wds (WebDataset tar shards)"
    )


def resolved(path: str | os.PathLike, what: str) -> Path:
    """``path`` made absolute with its symlinks followed; a symlink loop is a clear error."""
    try:
        return Path(path).resolve(strict=False)
    except (RuntimeError, OSError) as e:  # RuntimeError: symlink loop (Python < 3.13), OSError: ELOOP
        raise InputError(f"{path}: cannot resolve the {what} path ({e})") from None


def overlaps(a: Path, b: Path) -> bool:
    """True when resolved paths ``a`` and ``b`` are the same or one lies inside the other."""
    return a == b or a in b.parents or b in a.parents


@dataclass(frozen=True)
class OutputTarget:
    path: Path
    format: str
    labels_path: Path | None = None  # the IDX labels file written beside the images file

    @property
    def files(self) -> tuple[Path, ...]:
        """Every path the output occupies."""
        return (self.path,) if self.labels_path is None else (self.path, self.labels_path)

    def existing(self) -> list[Path]:
        return [p for p in self.files if os.path.lexists(p)]

    def check_replaceable(self) -> None:
        """Refuse, before any work, an existing output that writing could not or must not replace."""
        if self.format == "folder":
            if self.path.exists() and not self.path.is_dir():
                raise InputError(f"{self.path}: exists and is not a directory; cannot write an image folder there")
            if self.path.is_dir():
                from puregen.data.folder import looks_like_image_folder

                if not looks_like_image_folder(self.path):
                    raise InputError(
                        f"{self.path}: is a folder that holds files other than images; refusing to write an "
                        f"image folder over it (choose a new output path)"
                    )
        elif self.format in ("parquet", "webdataset"):
            from puregen.data.shards import SHARD_SUFFIXES, looks_like_shard_folder

            suffix = SHARD_SUFFIXES[self.format]
            if self.path.exists() and not self.path.is_dir():
                raise InputError(f"{self.path}: exists and is not a directory; a {self.format} output is a folder of shards")
            if self.path.is_dir() and not looks_like_shard_folder(self.path, suffix):
                raise InputError(
                    f"{self.path}: is a folder that holds files other than {suffix} shards; refusing to write "
                    f"shards over it (choose a new output path)"
                )
        else:
            for p in self.files:
                if p.is_dir():
                    raise InputError(f"{p}: is a directory; cannot write a .{self.format} file there")


def _check_parent(path: Path) -> None:
    """The nearest existing ancestor must be a writable directory (nothing is created here)."""
    parent = path.parent
    while not parent.exists():
        if os.path.lexists(parent):  # a dangling symlink
            raise InputError(f"{path}: its parent {parent} is a broken symbolic link")
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{path}: cannot create the output there: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{path}: cannot write to {parent}: permission denied")


def plan_output(path: str | os.PathLike, *, has_labels: bool) -> OutputTarget:
    """Decide the format and the files of an output at ``path``; check its location (then, once it is
    known not to overlap the input, `OutputTarget.check_replaceable`)."""
    fmt = output_format(path)
    p = resolved(path, "output")
    if p.parent == p:
        raise InputError(f"{path}: cannot write an output over the file system's root")
    if fmt == "npy" and has_labels:
        raise InputError(f"{path}: a .npy file cannot hold labels; write a .npz to keep them")
    labels_path = None
    if fmt == "idx" and has_labels:
        name = idx.labels_name_for(p.name)
        labels_path = p.with_name(name)
    _check_parent(p)
    return OutputTarget(p, fmt, labels_path)


def output_digest(target: OutputTarget) -> str:
    """sha256 over the output's files (relative names and contents), to verify a finished job."""
    h = hashlib.sha256()
    for root in target.files:
        files = [root] if root.is_file() else sorted(
            (f for f in root.rglob("*") if f.is_file() and not any(s.startswith(".") for s in f.relative_to(root).parts)),
            key=lambda f: f.relative_to(root).as_posix(),
        )
        for f in files:
            name = root.name if f == root else f"{root.name}/{f.relative_to(root).as_posix()}"
            h.update(name.encode() + b"\0")
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            h.update(b"\0")
    return h.hexdigest()
