"""Sharded datasets (Parquet files, WebDataset tars): which files one input names, and how its shards are kept.

A sharded input is one dataset read from several files; its output keeps the
sharding: one output file per input shard, under the same relative name, with
the same rows in the same order.  The readers record that layout in
:class:`ShardLayout` (on ``ImageDataset.shards``) together with what each
format carries through unchanged (a Parquet file's other columns, a
WebDataset sample's other members and keys), and the writers rebuild the
shards from it with the purified images in place of the originals.

An input is one shard file, a folder of them (its visible files, sorted by
name; sub-folders are not searched), a glob (``data/train-*.parquet``) or a
brace pattern as WebDataset writes them (``shards/train-{000..009}.tar``,
expanded with ``braceexpand``, webdataset's own dependency; every file it
names must exist).
"""

from __future__ import annotations

import glob as _glob
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from puregen.errors import InputError

__all__ = ["Shard", "ShardLayout", "SHARD_SUFFIXES", "is_glob", "shard_files", "sharded_format_of", "looks_like_shard_folder"]

# The suffix of each sharded format's files.
SHARD_SUFFIXES = {"parquet": ".parquet", "webdataset": ".tar"}


@dataclass(frozen=True)
class Shard:
    """One input file's rows ``[start, stop)`` of the dataset, written back as ``name``."""

    name: str
    start: int
    stop: int
    extra: Any = None  # the format's carried-through data for these rows (see the format's module)


@dataclass(frozen=True)
class ShardLayout:
    """How a sharded dataset was stored: its format, its shards in order, and its image encoding."""

    format: str
    shards: tuple[Shard, ...]
    encoding: str  # parquet: "encoded" or "raw"; webdataset: carried per sample in the shard's extra

    def head(self, n: int, take) -> "ShardLayout":
        """The layout of the first ``n`` rows; ``take(extra, k)`` keeps an extra's first ``k`` rows.

        Shards past row ``n`` are dropped and the last one kept is cut, so a ``--limit`` run writes
        the shards it purified and no others."""
        kept = []
        for s in self.shards:
            if s.start >= n:
                break
            stop = min(s.stop, n)
            kept.append(s if stop == s.stop else replace(s, stop=stop, extra=take(s.extra, stop - s.start)))
        return replace(self, shards=tuple(kept))


def is_glob(path: str | os.PathLike) -> bool:
    """True when ``path`` is a pattern (glob or braces) rather than one file or folder."""
    return any(ch in str(path) for ch in "*?[{")


def _expand(text: str) -> list[Path]:
    """The existing files a glob or brace pattern names, sorted; a brace-named file that is missing is an error."""
    if "{" in text:
        from braceexpand import braceexpand

        named = [Path(t) for t in braceexpand(text)]
        missing = [t for t in named if not t.exists()]
        if missing:
            raise InputError(f"{missing[0]}: named by the pattern {text} but no such file")
        return sorted(named)
    return sorted(Path(m) for m in _glob.glob(text))


def shard_files(path: str | os.PathLike, suffix: str) -> tuple[Path, list[tuple[Path, str]]]:
    """The input's root and its ``(file, relative name)`` pairs, sorted by name; none found is an error."""
    text = str(path)
    p = Path(path)
    if is_glob(text) and not p.exists():
        matches = _expand(text)
        files = [m for m in matches if m.is_file() and not m.name.startswith(".")]
        if not files:
            raise InputError(f"{text}: the pattern matches no {suffix} files")
        wrong = [m for m in files if not m.name.lower().endswith(suffix)]
        if wrong:
            raise InputError(f"{wrong[0]}: matched by {text} but not a {suffix} file")
        names = [m.name for m in files]
        if len(set(names)) != len(names):
            raise InputError(f"{text}: the pattern matches two shards of the same name in different folders")
        return Path(os.path.commonpath([str(m.parent) for m in files])), [(m, m.name) for m in files]
    if p.is_dir():
        entries = sorted((e for e in p.iterdir() if not e.name.startswith(".")), key=lambda e: e.name)
        files = [e for e in entries if e.is_file()]
        wrong = [e for e in entries if not (e.is_file() and e.name.lower().endswith(suffix))]
        if wrong:
            raise InputError(f"{wrong[0]}: a folder of {suffix} shards holds only {suffix} files")
        if not files:
            raise InputError(f"{p}: no {suffix} files in the folder")
        return p, [(e, e.name) for e in files]
    if not p.exists():
        raise InputError(f"{p}: no such file or directory")
    return p.parent, [(p, p.name)]


def sharded_format_of(path: str | os.PathLike) -> str | None:
    """``"parquet"`` or ``"webdataset"`` when ``path`` (a file, a folder or a glob) names shards of it, else None."""
    text = str(path)
    p = Path(path)
    if is_glob(text) and not p.exists():
        try:
            candidates = _expand(text)
        except InputError:
            return None
    elif p.is_dir():
        candidates = [e for e in p.iterdir() if not e.name.startswith(".")]
        if not candidates or not all(e.is_file() for e in candidates):
            return None
    else:
        candidates = [p]
    for fmt, suffix in SHARD_SUFFIXES.items():
        if candidates and all(c.name.lower().endswith(suffix) for c in candidates):
            return fmt
    return None


def looks_like_shard_folder(root: Path, suffix: str) -> bool:
    """True if ``root`` holds nothing but ``suffix`` files (hidden names allowed): safe to replace."""
    return all(e.name.startswith(".") or (e.is_file() and e.name.lower().endswith(suffix)) for e in root.iterdir())
