"""WebDataset tar shards (`webdataset`): read a folder or glob of ``.tar`` shards as one dataset; write it back.

A sample is the group of tar members sharing a key (``__key__``): its image
member is the one with extension ``png``, ``jpg``, ``jpeg`` or ``npy`` (a
uint8 ``HxW`` or ``HxWxC`` array), its label the integer text in ``cls``
(optional, but all samples or none), and every other member is carried
through unchanged, bytes for bytes.

Writing keeps the sharding: one output tar per input tar, same name, same
samples in the same order, same keys and other members.  The image member is
replaced by the purified image: ``.npy`` input stays ``.npy``, an encoded
image becomes a lossless PNG (``.jpg`` -> ``.png``, as in an image folder).
Members are written with mtime 0, so the same images give the same tar bytes.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from puregen.data.atomic import atomic_directory
from puregen.data.dataset import ImageDataset
from puregen.data.folder import decode_image_bytes
from puregen.data.shards import Shard, ShardLayout, shard_files
from puregen.errors import InputError

__all__ = ["IMAGE_EXTENSIONS", "read_webdataset", "write_webdataset_shards"]

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "npy")


def _samples(path: Path) -> list[dict]:
    """The shard's samples as webdataset groups them (``__key__`` plus one bytes value per member)."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    try:
        with open(path, "rb") as f:
            return [
                {k: v for k, v in s.items() if k != "__url__"}
                for s in group_by_keys(({**m, "__url__": str(path)} for m in tar_file_iterator(f)), lcase=False)
            ]
    except Exception as e:  # tarfile.ReadError, EOFError, ValueError on a repeated member, ...
        raise InputError(f"{path}: cannot read as a WebDataset tar (corrupt or truncated: {type(e).__name__}: {e})") from None


def _image_member(sample: dict, where: str) -> str:
    found = [ext for ext in sample if ext.lower() in IMAGE_EXTENSIONS]
    if len(found) != 1:
        what = "no image member" if not found else f"{len(found)} image members ({', '.join(found)})"
        raise InputError(f"{where}: sample {sample['__key__']!r} has {what}; expected exactly one of "
                         f"{', '.join('.' + e for e in IMAGE_EXTENSIONS)}")
    return found[0]


def _decode(data: bytes, ext: str, where: str) -> np.ndarray:
    if ext.lower() != "npy":
        arr = decode_image_bytes(data, where)
        return arr if arr.ndim == 3 else arr[:, :, None]
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # ValueError, EOFError, ...
        raise InputError(f"{where}: cannot read the .npy member ({type(e).__name__}: {e})") from None
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3)):
        raise InputError(f"{where}: the .npy member is {arr.dtype} {arr.shape}; expected uint8 HxW, HxWx1 or HxWx3")
    return arr if arr.ndim == 3 else arr[:, :, None]


def _label(data: bytes, where: str) -> int:
    try:
        return int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise InputError(f"{where}: the cls member {data[:20]!r} is not an integer label") from None


def read_webdataset(path: str | os.PathLike, *, num_classes: int | None = None) -> ImageDataset:
    """Read WebDataset shards (see the module docs) as one :class:`ImageDataset` with its `ShardLayout`."""
    root, files = shard_files(path, ".tar")
    images, labels, shards, first, labelled = [], [], [], None, None
    for f, name in files:
        samples = _samples(f)
        if not samples:
            raise InputError(f"{f}: the shard holds no samples (an empty shard cannot be kept)")
        start = len(images)
        for s in samples:
            where = f"{f}: sample {s['__key__']!r}"
            ext = _image_member(s, str(f))
            arr = _decode(s[ext], ext, where)
            if first is None:
                first = (where, arr.shape)
            elif arr.shape != first[1]:
                raise InputError(f"{where}: image is {arr.shape} but {first[0]} is {first[1]}; "
                                 f"every sample must hold an image of one shape")
            if labelled is None:
                labelled = "cls" in s
            if ("cls" in s) != labelled:
                raise InputError(f"{where}: some samples have a cls label and others do not")
            if "cls" in s:
                labels.append(_label(s["cls"], where))
            images.append(arr)
        # What is carried through: every member but the image, and the image's extension.
        extra = [({k: v for k, v in s.items() if k != _image_member(s, str(f))}, _image_member(s, str(f)))
                 for s in samples]
        shards.append(Shard(name, start, len(images), extra))
    layout = ShardLayout("webdataset", tuple(shards), "per-sample")
    return ImageDataset(
        np.stack(images), np.asarray(labels, np.int64) if labels else None, str(path), num_classes,
        files=tuple(str(f) for f, _ in files), shards=layout,
    )


def _encode(img: np.ndarray, ext: str) -> tuple[str, bytes]:
    """The purified image's member (extension, bytes): npy stays npy, anything else becomes PNG."""
    buf = io.BytesIO()
    if ext.lower() == "npy":
        np.save(buf, img, allow_pickle=False)
        return ext, buf.getvalue()
    Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img).save(buf, format="PNG", compress_level=1)
    return ("PNG" if ext.isupper() else "png"), buf.getvalue()


def write_webdataset_shards(root: str | os.PathLike, images: np.ndarray, layout: ShardLayout) -> Path:
    """Write ``images`` as the shards of ``layout`` under the folder ``root`` (atomically); return ``root``."""
    from webdataset import TarWriter

    root = Path(root)
    with atomic_directory(root) as tmp:
        for s in layout.shards:
            with open(tmp / s.name, "wb") as f:
                writer = TarWriter(f, encoder=False, mtime=0)
                for i, (members, ext) in enumerate(s.extra):
                    new_ext, data = _encode(images[s.start + i], ext)
                    if new_ext in members:
                        raise InputError(f"{s.name}: sample {members['__key__']!r} already has a .{new_ext} member; "
                                         f"cannot store its purified {ext} image as .{new_ext}")
                    writer.write({**members, new_ext: data})
                writer.close()
    return root


def head_samples(extra: list, k: int) -> list:
    """A shard's first ``k`` samples (for `ShardLayout.head`)."""
    return extra[:k]
