"""ImageDataset: one split of a prepared dataset, images from a uint8 array or from the decoded-image cache.

Items are (image float Tensor 3 x S x S, label int in 0..C-1, i) where i is the position in the split, the item
index the index-mode memory keys on. Labels are contiguous within the split; `class_ids` keeps the dataset's own.

DataLoader(ds, batch_sampler=...) calls `__getitems__` with a whole batch of indices. The array-backed case (the
embedded set, all images one size) answers it with one fancy-index into the memory-mapped array and one batched
transform. The cache-backed case (real datasets, images of any size) answers with an ImageBatch of the raw uint8
images, which `xbmcore.data.batch.to_device` augments on the training device.
"""
from __future__ import annotations

import copy
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from xbmcore.config import DataParams
from xbmcore.data.batch import ImageBatch, View, to_device
from xbmcore.data.cache import ImageCache
from xbmcore.data.transforms import BatchTransform

Item = tuple[torch.Tensor, int, int]


class ImageDataset(torch.utils.data.Dataset):
    """Use `from_array` or `from_cache`. `train=True` turns augmentation on (random resized crop + flip).

    Items are ``(image, label, i)``: a 3 x S x S float tensor normalised with the ImageNet statistics, the
    contiguous label and the position i in the split (the index the memory and the losses key on).

    Args:
        class_ids: N class ids of the dataset (any integers); relabelled to 0..C-1 in sorted order.
        p: the `data` section (sizes and crop scale of the transforms).
        train: augment (random resized crop + flip) rather than resize + centre crop.
        name: the split's name, for messages.
        super_labels: N super-class ids, or None.

    Attributes:
        class_ids (np.ndarray): N int64 class ids of the dataset.
        labels (np.ndarray): N int64 contiguous labels (0..C-1).
        num_classes (int): C.
        super_labels (np.ndarray | None): N super-class ids.
        name (str): the split's name.
        train (bool): whether items are augmented; may be flipped (see `without_augmentation`).
    """

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
        self._cache: ImageCache | None = None
        self._rows: np.ndarray | None = None
        # Both transforms built once; `train` picks one per call, so flipping the attribute works too.
        self._batch_tf = {t: BatchTransform(p, t) for t in (True, False)}
        self._view = {t: View.of(p, t) for t in (True, False)}

    @classmethod
    def from_array(cls, images: np.ndarray, rows: np.ndarray, class_ids: np.ndarray, p: DataParams, train: bool,
                   name: str = "", super_labels: np.ndarray | None = None) -> "ImageDataset":
        """Images are rows `rows` of `images` (N x 3 x H x W uint8, typically np.load(..., mmap_mode="r")).

        Args:
            images: all images of the dataset, uint8 N x 3 x H x W (one size).
            rows: the split's rows of `images`, one per item.
            class_ids: the items' class ids (as many as rows).
            p: the `data` section.
            train: augment.
            name: the split's name.
            super_labels: the items' super-class ids, or None.

        Returns:
            The split.

        Raises:
            ValueError: images that are not uint8 N x 3 x H x W, or rows and class_ids of different lengths.
        """
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{name or 'images'}: expected a uint8 array N x 3 x H x W, got {images.dtype} "
                             f"{images.shape}")
        ds = cls(class_ids, p, train, name, super_labels)
        ds._array, ds._rows = images, np.asarray(rows, dtype=np.int64)
        if len(ds._rows) != len(ds.class_ids):
            raise ValueError(f"{name}: {len(ds._rows)} rows but {len(ds.class_ids)} labels")
        return ds

    @classmethod
    def from_cache(cls, cache: ImageCache, rows: np.ndarray, class_ids: np.ndarray, p: DataParams, train: bool,
                   name: str = "", super_labels: np.ndarray | None = None) -> "ImageDataset":
        """Images are rows `rows` of a decoded-image cache (each its own size).

        Args:
            cache: the prepared dataset's decoded-image cache.
            rows: the split's rows of the cache, one per item.
            class_ids: the items' class ids (as many as rows).
            p: the `data` section.
            train: augment.
            name: the split's name.
            super_labels: the items' super-class ids, or None.

        Returns:
            The split; its `__getitems__` hands over ImageBatches of raw images (augmented on the device).

        Raises:
            ValueError: rows and class_ids of different lengths, or rows beyond the cache.
        """
        ds = cls(class_ids, p, train, name, super_labels)
        ds._cache, ds._rows = cache, np.asarray(rows, dtype=np.int64)
        if len(ds._rows) != len(ds.class_ids):
            raise ValueError(f"{name}: {len(ds._rows)} rows but {len(ds.class_ids)} labels")
        if ds._rows.max(initial=-1) >= len(cache):
            raise ValueError(f"{name}: the index lists row {ds._rows.max()}, but the cache has {len(cache)} images; "
                             f"prepare the dataset again")
        return ds

    def without_augmentation(self) -> "ImageDataset":
        """The same split with the test transform (e.g. to embed the training set for the memory).

        Returns:
            A shallow copy with ``train = False``; the images are shared.
        """
        ds = copy.copy(self)
        ds.train = False
        return ds

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        kind = "array" if self._array is not None else "cache"
        return (f"ImageDataset({self.name!r}, {len(self)} images, {self.num_classes} classes, {kind}, "
                f"train={self.train})")

    # ------------------------------------------------------------------------------------------------ fetching

    def __getitem__(self, i: int) -> Item:
        if self._cache is not None:
            img, label, idx = to_device(self.__getitems__([i]), "cpu")
            return img[0], int(label[0]), int(idx[0])
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[Item] | ImageBatch:
        """A whole batch: a list of (image, label, i) that the default collate_fn stacks, or an ImageBatch."""
        idx = np.asarray(indices, dtype=np.int64)
        rows = self._rows[idx]
        if self._cache is not None:
            flat, hw = self._cache.read(rows)
            return ImageBatch(torch.from_numpy(flat), torch.from_numpy(hw), torch.from_numpy(self.labels[idx]),
                              torch.from_numpy(idx), self._view[self.train])
        # Fancy indexing copies the rows out of the memory map; sorted reads touch the file in order.
        order = np.argsort(rows, kind="stable")
        batch = np.empty((len(rows),) + self._array.shape[1:], np.uint8)
        batch[order] = self._array[rows[order]]
        images = self._batch_tf[self.train](torch.from_numpy(batch))  # B x 3 x S x S float
        return list(zip(images.unbind(0), self.labels[idx].tolist(), idx.tolist()))
    def image(self, i: int) -> Image.Image:
        """Item i as stored, before any transform (RGB): what a person looks at (thumbnails of retrievals).

        Args:
            i: the item's position in the split.

        Returns:
            The image at its stored size (the cache's, or the array's).
        """
        if self._cache is not None:
            return Image.fromarray(self._cache.image(int(self._rows[int(i)])))
        return Image.fromarray(np.ascontiguousarray(self._array[self._rows[int(i)]].transpose(1, 2, 0)))
