"""ImageDataset: one split of a prepared dataset, images from a uint8 array or from image files.

Items are (image float Tensor 3 x S x S, label int in 0..C-1, i) where i is the position in the split, the item
index the index-mode memory keys on. Labels are contiguous within the split; `class_ids` keeps the dataset's own.

DataLoader(ds, batch_sampler=...) calls `__getitems__` with a whole batch of indices. The array-backed case answers
it with one fancy-index into the (memory-mapped) array and one batched transform, instead of B separate
`__getitem__` calls; the file-backed case decodes the files one by one.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from xbmcore.config import DataParams
from xbmcore.data.transforms import BatchTransform, pil_transform

log = logging.getLogger(__name__)

Item = tuple[torch.Tensor, int, int]


class ImageDataset(torch.utils.data.Dataset):
    """Use `from_array` or `from_files`. `train=True` turns augmentation on (random resized crop + flip)."""

    def __init__(self, class_ids: np.ndarray, p: DataParams, train: bool, name: str = "",
                 super_labels: np.ndarray | None = None):
        self.class_ids = np.asarray(class_ids, dtype=np.int64)
        classes, self.labels = np.unique(self.class_ids, return_inverse=True)
        self.labels = self.labels.astype(np.int64)
        self.num_classes = len(classes)
        self.super_labels = super_labels
        self.name = name
        self.train = train
        self.params = p
        self._array: np.ndarray | None = None
        self._rows: np.ndarray | None = None
        self._paths: list[Path] | None = None
        self.skipped: set[int] = set()  # file-backed: items found corrupt and replaced (skip_corrupt)
        # Both transforms built once; `train` picks one per call, so flipping the attribute works too.
        self._batch_tf = {t: BatchTransform(p, t) for t in (True, False)}
        self._pil_tf = {t: pil_transform(p, t) for t in (True, False)}

    @classmethod
    def from_array(cls, images: np.ndarray, rows: np.ndarray, class_ids: np.ndarray, p: DataParams, train: bool,
                   name: str = "", super_labels: np.ndarray | None = None) -> "ImageDataset":
        """Images are rows `rows` of `images` (N x 3 x H x W uint8, typically np.load(..., mmap_mode="r"))."""
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{name or 'images'}: expected a uint8 array N x 3 x H x W, got {images.dtype} "
                             f"{images.shape}")
        ds = cls(class_ids, p, train, name, super_labels)
        ds._array, ds._rows = images, np.asarray(rows, dtype=np.int64)
        if len(ds._rows) != len(ds.class_ids):
            raise ValueError(f"{name}: {len(ds._rows)} rows but {len(ds.class_ids)} labels")
        return ds

    @classmethod
    def from_files(cls, paths: Sequence[Path], class_ids: np.ndarray, p: DataParams, train: bool, name: str = "",
                   super_labels: np.ndarray | None = None) -> "ImageDataset":
        ds = cls(class_ids, p, train, name, super_labels)
        ds._paths = [Path(x) for x in paths]
        if len(ds._paths) != len(ds.class_ids):
            raise ValueError(f"{name}: {len(ds._paths)} paths but {len(ds.class_ids)} labels")
        return ds

    def without_augmentation(self) -> "ImageDataset":
        """The same split with the test transform (e.g. to embed the training set for the memory)."""
        ds = copy.copy(self)
        ds.train = False
        return ds

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        kind = "array" if self._array is not None else "files"
        return (f"ImageDataset({self.name!r}, {len(self)} images, {self.num_classes} classes, {kind}, "
                f"train={self.train})")

    # ------------------------------------------------------------------------------------------------ fetching

    def __getitem__(self, i: int) -> Item:
        if self._array is not None:
            return self.__getitems__([i])[0]
        return self._pil_tf[self.train](self._load(int(i))), int(self.labels[i]), int(i)

    def __getitems__(self, indices: Sequence[int]) -> list[Item]:
        """A whole batch; a list of (image, label, i) so that the default collate_fn stacks it."""
        idx = np.asarray(indices, dtype=np.int64)
        if self._array is None:
            return [self.__getitem__(int(i)) for i in idx]
        rows = self._rows[idx]
        # Fancy indexing copies the rows out of the memory map; sorted reads touch the file in order.
        order = np.argsort(rows, kind="stable")
        batch = np.empty((len(rows),) + self._array.shape[1:], np.uint8)
        batch[order] = self._array[rows[order]]
        images = self._batch_tf[self.train](torch.from_numpy(batch))  # B x 3 x S x S float
        return list(zip(images.unbind(0), self.labels[idx].tolist(), idx.tolist()))

    def image(self, i: int) -> Image.Image:
        """Item i as stored, before any transform (RGB): what a person looks at (thumbnails of retrievals)."""
        if self._array is not None:
            return Image.fromarray(np.ascontiguousarray(self._array[self._rows[int(i)]].transpose(1, 2, 0)))
        return self._load(int(i))

    def _load(self, i: int) -> Image.Image:
        """Decode image i; a corrupt or missing file raises naming it, or with skip_corrupt is replaced."""
        path = self._paths[i]
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except (OSError, ValueError, SyntaxError, UnidentifiedImageError) as err:
            if not self.params.skip_corrupt:
                raise ValueError(
                    f"{path}: cannot decode image ({type(err).__name__}: {err}); fix or remove the file, or set "
                    f"data.skip_corrupt: true to skip it") from None
            self.skipped.add(i)
            log.warning("skipped corrupt image %s (%d skipped in %s so far): %s", path, len(self.skipped),
                        self.name, err)
            return self._load(self._substitute(i, path))

    def _substitute(self, i: int, path: Path) -> int:
        # The next image of the same class that is not known to be corrupt: the batch keeps its P x M shape.
        same = np.flatnonzero(self.labels == self.labels[i])
        for j in np.roll(same, -int(np.searchsorted(same, i)) - 1):
            if int(j) not in self.skipped:
                return int(j)
        raise ValueError(f"{path}: cannot decode image, and every image of its class in {self.name} is corrupt")
