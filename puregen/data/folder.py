"""Image folders: ``root/<class_name>/*.png|jpg|jpeg`` (or unlabelled ``root/*.png``).

Reading:

* class names are the sub-folder names sorted as Python strings; label ``k``
  is the ``k``-th name.  Empty class folders still count (label indices stay
  stable).  ``num_classes`` is the number of class folders.
* files are sorted by name within each class; the global order is class by
  class (class 0's files, then class 1's, ...).
* a root holding image files and no sub-folders is read unlabelled
  (labels ``None``).  Images beside class folders is an error.
* names starting with ``.`` are ignored (hidden files, temporaries); any
  other file that is not ``.png``/``.jpg``/``.jpeg`` (any case) is an error,
  as is a folder nested inside a class folder, and an image name that is
  not a regular file (a FIFO, socket, device or broken link: never opened).
* modes: ``L`` -> C=1, ``RGB`` -> C=3; ``1`` (bilevel) is read as ``L`` and
  ``P`` (palette, no transparency) as ``RGB``.  Images with an alpha channel
  (``RGBA``, ``LA``, ``PA``, ``P`` with transparency) and other modes
  (16-bit, CMYK, ...) are refused: converting them would silently change
  pixels.  All images must have the same size and (normalised) mode.
* an unreadable or corrupt image raises ``InputError`` naming that file.

The reader records each image's path relative to the root
(``ImageDataset.names``, e.g. ``bag/img_0018.png``).

Writing (:func:`write_image_folder`) stores lossless PNGs in class folders.
Given ``names`` (a folder reader's), each image keeps its file name: a PNG
stays ``img_0018.png``; a JPEG ``img_0018.jpg`` is written as the PNG
``img_0018.png``, because encoding the purified pixels as JPEG again would
change them (``img_0018.jpg.png`` where a PNG of that stem is already there).
Without names, images are named by their global index (``000000.png``, ...),
so writing then reading returns them in class-major order (stable within a
class: i.e. ``images[np.argsort(labels, kind="stable")]``).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from puregen.data.atomic import atomic_directory
from puregen.data.dataset import ImageDataset
from puregen.data.validation import (
    check_declared_bytes,
    check_regular_file,
    validate_images_uint8,
    validate_labels,
    validate_num_classes,
)
from puregen.errors import InputError

__all__ = [
    "IMAGE_EXTENSIONS",
    "read_image_folder",
    "write_image_folder",
    "looks_like_image_folder",
    "default_class_names",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _visible(entries) -> list[Path]:
    return sorted((p for p in entries if not p.name.startswith(".")), key=lambda p: p.name)


def decode_image_bytes(data: bytes, src: str) -> np.ndarray:
    """Decode one encoded image (PNG, JPEG, ...) held in memory, by the same rules as a file; ``src`` names it."""
    return _load_image(io.BytesIO(data), src)


def _load_image(path, src: str | None = None) -> np.ndarray:
    """Decode one image (a path, or a binary stream named ``src``) to uint8 HxW (L) or HxWx3 (RGB)."""
    src = str(path) if src is None else src
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode == "1":
                im = im.convert("L")
            elif mode == "P":
                if "transparency" in im.info:
                    raise InputError(
                        f"{src}: palette image with transparency; puregen reads only L (grayscale) and RGB "
                        f"images without alpha: convert it first"
                    )
                im = im.convert("RGB")
            elif mode in ("RGBA", "LA", "PA", "La", "RGBa"):
                raise InputError(
                    f"{src}: has an alpha channel (mode {mode}); puregen reads only L (grayscale) and RGB "
                    f"images: flatten or convert it first"
                )
            elif mode not in ("L", "RGB"):
                raise InputError(
                    f"{src}: unsupported image mode {mode}; puregen reads only 8-bit L (grayscale) and RGB"
                )
            arr = np.asarray(im, dtype=np.uint8)
    except InputError:
        raise
    except Exception as e:  # UnidentifiedImageError, OSError, SyntaxError, DecompressionBombError, ...
        raise InputError(f"{src}: cannot read image (corrupt or not an image: {type(e).__name__}: {e})") from None
    return arr


def _scan(root: Path) -> tuple[list[str] | None, list[tuple[Path, int]]]:
    """Return (class names or None, [(file, label)]) in the global read order."""
    entries = _visible(root.iterdir())
    dirs = [p for p in entries if p.is_dir()]
    files = [p for p in entries if not p.is_dir()]
    if dirs:
        if files:
            stray = [p.name for p in files][:3]
            raise InputError(
                f"{root}: has both class folders and loose files ({', '.join(stray)}); "
                f"put every image in a class folder (or none)"
            )
        class_names = [p.name for p in dirs]
        items = []
        for label, d in enumerate(dirs):
            for f in _visible(d.iterdir()):
                if f.is_dir():
                    raise InputError(f"{f}: nested folder inside class folder {d.name!r}; expected image files only")
                if not _is_image_name(f.name):
                    raise InputError(f"{f}: not a .png/.jpg/.jpeg file (image folders hold only images)")
                check_regular_file(f, "an image file")  # a FIFO would block the decoder
                items.append((f, label))
        return class_names, items
    for f in files:
        if not _is_image_name(f.name):
            raise InputError(f"{f}: not a .png/.jpg/.jpeg file (image folders hold only images)")
        check_regular_file(f, "an image file")  # a FIFO would block the decoder
    return None, [(f, -1) for f in files]


def read_image_folder(root: str | os.PathLike, *, num_classes: int | None = None) -> ImageDataset:
    """Read an image folder (see module docs) as an :class:`ImageDataset`."""
    root = Path(root)
    src = str(root)
    if not root.is_dir():
        raise InputError(f"{src}: not a directory")
    class_names, items = _scan(root)
    if not items:
        raise InputError(f"{src}: no images found (expected root/<class>/*.png|jpg|jpeg)")
    if class_names is not None:
        num_classes = validate_num_classes(num_classes, src)
        if num_classes is not None and num_classes < len(class_names):
            raise InputError(
                f"{src}: has {len(class_names)} class folders but num_classes={num_classes}"
            )
    first_path = items[0][0]
    first = _load_image(first_path)
    check_declared_bytes(len(items) * first.size, src, f"{len(items)} images of shape {first.shape}")
    images = np.empty((len(items),) + first.shape[:2] + ((first.shape[2],) if first.ndim == 3 else (1,)), np.uint8)
    mode_of = {2: "L", 3: "RGB"}
    for i, (path, _) in enumerate(items):
        arr = first if i == 0 else _load_image(path)
        if arr.shape != first.shape:
            raise InputError(
                f"{path}: image is {arr.shape[1]}x{arr.shape[0]} {mode_of[arr.ndim]} but {first_path.name} is "
                f"{first.shape[1]}x{first.shape[0]} {mode_of[first.ndim]}; all images must have the same size and mode"
            )
        images[i] = arr.reshape(images.shape[1:])
    names = tuple(path.relative_to(root).as_posix() for path, _ in items)
    if class_names is None:
        return ImageDataset(images, None, src, num_classes, names=names)
    labels = np.fromiter((lab for _, lab in items), dtype=np.int64, count=len(items))
    if num_classes is not None and num_classes > len(class_names):
        # keep the given count; names exist only for the folders present
        return ImageDataset(images, labels, src, num_classes, names=names)
    return ImageDataset(images, labels, src, len(class_names), tuple(class_names), names=names)


def default_class_names(num_classes: int) -> list[str]:
    """Zero-padded indices ('0'..'9', or '00'..'99', ...): string order equals index order."""
    width = len(str(max(num_classes - 1, 0)))
    return [f"{k:0{width}d}" for k in range(num_classes)]


def _check_class_names(names: Sequence[Any], src: str) -> list[str]:
    names = [str(n) for n in names]
    for n in names:
        if not n or n in (".", "..") or n.startswith(".") or "/" in n or os.sep in n or "\0" in n:
            raise InputError(f"{src}: invalid class name {n!r} (must be a plain, non-hidden folder name)")
    if len(set(names)) != len(names):
        raise InputError(f"{src}: class names are not unique")
    if names != sorted(names):
        raise InputError(
            f"{src}: class names must be in sorted (string) order so that reading assigns the same "
            f"labels; got {names[:5]}{'...' if len(names) > 5 else ''}"
        )
    return names


def looks_like_image_folder(root: str | os.PathLike) -> bool:
    """True if ``root`` holds nothing but image files and folders of image files (hidden names allowed)."""
    root = Path(root)
    for p in root.iterdir():
        if p.name.startswith("."):
            continue
        if p.is_dir():
            for q in p.iterdir():
                if q.name.startswith("."):
                    continue
                if q.is_dir() or not _is_image_name(q.name):
                    return False
        elif not _is_image_name(p.name):
            return False
    return True


def write_image_folder(
    root: str | os.PathLike,
    images: np.ndarray,
    labels: Any = None,
    class_names: Sequence[str] | None = None,
    *,
    num_classes: int | None = None,
    overwrite: bool = True,
    names: Sequence[str] | None = None,
) -> Path:
    """Write images as PNGs under ``root`` (atomically: built in a temp folder, then renamed).

    With labels: ``root/<class_names[k]>/<index>.png``; one folder per class
    (``num_classes`` folders, default ``len(class_names)`` or
    ``max(label) + 1``), empty ones included.  ``class_names`` default to
    zero-padded indices and must be sorted.  Without labels:
    ``root/<index>.png``.  ``names`` keep the images' own file names (see
    the module docs); their folder part is replaced by the label's class.

    An existing ``root`` is replaced only when ``overwrite`` is true and it
    looks like an image folder (nothing but images and folders of images);
    a directory holding anything else is never deleted.
    """
    root = Path(root)
    src = str(root)
    images = validate_images_uint8(images, src)
    n = images.shape[0]
    if root.exists():
        if not root.is_dir():
            raise InputError(f"{src}: exists and is not a directory")
        if any(not p.name.startswith(".") for p in root.iterdir()):
            if not overwrite:
                raise InputError(f"{src}: already exists and is not empty (overwrite=False)")
            if not looks_like_image_folder(root):
                raise InputError(
                    f"{src}: already exists and holds files other than images; refusing to replace it"
                )
    class_dirs: list[str] | None = None
    if labels is not None:
        num_classes = validate_num_classes(num_classes, src)
        if class_names is not None:
            class_dirs = _check_class_names(class_names, src)
            if num_classes is not None and num_classes != len(class_dirs):
                raise InputError(f"{src}: {len(class_dirs)} class names but num_classes={num_classes}")
            num_classes = len(class_dirs)
        labels = validate_labels(labels, n, src, num_classes)
        if num_classes is None:
            num_classes = int(labels.max()) + 1
        if class_dirs is None:
            class_dirs = default_class_names(num_classes)
    elif class_names is not None:
        raise InputError(f"{src}: class_names given without labels")
    files = _output_file_names(names, labels, n, src)
    with atomic_directory(root) as tmp:
        dirs = [] if class_dirs is None else [tmp / name for name in class_dirs]
        for d in dirs:
            d.mkdir()
        for i in range(n):
            d = tmp if labels is None else dirs[labels[i]]
            img = images[i]
            # 2-D uint8 -> mode L, (H, W, 3) uint8 -> mode RGB
            pil = Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img)
            pil.save(d / files[i], format="PNG", compress_level=1)
    return root


def _output_file_names(names: Sequence[str] | None, labels, n: int, src: str) -> list[str]:
    """Each image's PNG file name inside its class folder (see the module docs)."""
    if names is None:
        width = max(6, len(str(n - 1)))
        return [f"{i:0{width}d}.png" for i in range(n)]
    if len(names) != n:
        raise InputError(f"{src}: {len(names)} names for {n} images")
    base = [str(name).replace(os.sep, "/").rsplit("/", 1)[-1] for name in names]
    for b in base:
        if not b or b.startswith(".") or "\0" in b:
            raise InputError(f"{src}: invalid image file name {b!r}")
    group = [0] * n if labels is None else [int(k) for k in labels]
    taken = {(g, b) for g, b in zip(group, base) if b.lower().endswith(".png")}
    out = []
    for g, b in zip(group, base):
        stem, dot, ext = b.rpartition(".")
        if ext.lower() == "png":
            out.append(b)
            continue
        png = f"{stem}.png" if dot and (g, f"{stem}.png") not in taken else f"{b}.png"
        taken.add((g, png))
        out.append(png)
    if len(set(zip(group, out))) != n:
        raise InputError(f"{src}: two images would be written to the same file name")
    return out
