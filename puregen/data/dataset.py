"""In-memory image dataset: uint8 NHWC images, optional int64 labels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from puregen.data.validation import validate_images_uint8, validate_labels, validate_num_classes
from puregen.errors import InputError

__all__ = ["ImageDataset"]


@dataclass(eq=False)
class ImageDataset:
    """A batch of images as read from disk.

    Attributes:
        images: ``uint8`` array, shape ``(N, H, W, C)``, ``C`` in {1, 3}
            (a 3-D ``(N, H, W)`` array is accepted and gets ``C = 1``).
        labels: ``int64`` array of shape ``(N,)``, or ``None`` (unlabelled).
        source: where the data came from (a path, or ``"<memory>"``); used in
            error messages.
        num_classes: number of classes when known (labels are then checked to
            be ``< num_classes``), else ``None``.
        class_names: optional class names, index ``k`` naming label ``k``
            (set by the image-folder reader).  When given, ``num_classes``
            defaults to ``len(class_names)`` and must equal it.
        names: optional per-image names, ``/``-separated paths relative to an
            image folder's root (``bag/img_0018.png``), set by the image-folder
            reader so that a writer can keep them.
        label_dtype: the integer dtype the labels had on disk (``uint8`` for
            an ``.npz`` saved that way), so that writing back can keep it;
            ``labels`` itself is always ``int64``.
        files: the files the data was read from, in reading order (set by
            `read_dataset` for every file format; the IDX and CIFAR readers
            name each file of a pair or a folder's batches).
        shards: for a sharded input (Parquet, WebDataset), the layout that
            its writer rebuilds: each shard's rows and name, and the columns
            or members carried through (see :mod:`puregen.data.shards`).

    Everything is validated in ``__post_init__``; bad input raises
    :class:`~puregen.errors.InputError` naming ``source``.
    """

    images: np.ndarray
    labels: np.ndarray | None = None
    source: str = "<memory>"
    num_classes: int | None = None
    class_names: tuple[str, ...] | None = None
    names: tuple[str, ...] | None = None
    label_dtype: str | None = None
    files: tuple[str, ...] | None = None
    shards: Any = None  # a puregen.data.shards.ShardLayout

    def __post_init__(self) -> None:
        self.source = str(self.source)
        self.images = validate_images_uint8(self.images, self.source)
        if self.names is not None:
            self.names = tuple(str(n) for n in self.names)
            if len(self.names) != self.images.shape[0]:
                raise InputError(f"{self.source}: {len(self.names)} names for {self.images.shape[0]} images")
        self.num_classes = validate_num_classes(self.num_classes, self.source)
        if self.class_names is not None:
            names = tuple(str(c) for c in self.class_names)
            if self.num_classes is None:
                self.num_classes = len(names)
            elif len(names) != self.num_classes:
                raise InputError(
                    f"{self.source}: {len(names)} class names given but num_classes={self.num_classes}"
                )
            self.class_names = names
        if self.shards is not None and (self.shards.shards[-1].stop if self.shards.shards else 0) != len(self):
            raise InputError(f"{self.source}: the shards hold {self.shards.shards[-1].stop} rows for {len(self)} images")
        if self.labels is not None:
            self.labels = validate_labels(self.labels, self.images.shape[0], self.source, self.num_classes)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(N, H, W, C)``."""
        n, h, w, c = self.images.shape
        return int(n), int(h), int(w), int(c)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of one image."""
        return self.shape[1:]

    @property
    def height(self) -> int:
        return self.shape[1]

    @property
    def width(self) -> int:
        return self.shape[2]

    @property
    def channels(self) -> int:
        return self.shape[3]

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    def __repr__(self) -> str:
        lab = "None" if self.labels is None else f"int64[{len(self.labels)}]"
        return (
            f"ImageDataset(source={self.source!r}, images=uint8{list(self.shape)}, labels={lab}, "
            f"num_classes={self.num_classes})"
        )
