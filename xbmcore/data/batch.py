"""A batch of cached images as the loader hands it over (uint8, each its own size), and the one call that moves
it to the training device and turns it into the network's input there.

    ImageBatch       pixels of B images back to back (uint8), their sizes, labels, dataset indices, the view
    to_device(batch, device) -> (images B x 3 x S x S float normalised, labels B, indices B), all on `device`

The crop, resize, flip and normalisation run on the device that trains. For a GPU, loader workers only copy
bytes out of the memory-mapped cache and `to_device` augments on the GPU, which costs the CPU nothing. For a
CPU, the loader workers augment (collate_for), in parallel beside the training process; with no workers that is
the training process itself, and the crop boxes and flips come from the global torch RNG that a checkpoint
restores.

The resize is torch's bilinear interpolation with antialiasing, the filter PIL applies (uint8 on the CPU, where
torch has PIL's SIMD kernel; float32 on a GPU, which has no uint8 kernel). Within 1 grey level of PIL's resize
of the same crop (tests/xbmcore/test_data_cache.py).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import get_worker_info
from torch.utils.data._utils.collate import default_collate

from xbmcore.config import DataParams
from xbmcore.data.transforms import MEAN, STD, _check_sizes, crop_boxes, interpolation, normalisation


@dataclass(frozen=True)
class View:
    """How a split is shown to the network: train = random resized crop + flip, else resize + centre crop.

    Attributes:
        train: random resized crop + flip (True) or resize + centre crop (False).
        train_size: the training crop's output side.
        scale: the training crop's area range.
        test_resize: the shorter side test images are resized to.
        test_size: the test centre crop's side.
        mean: the normalisation's per-channel mean (RGB).
        std: the normalisation's per-channel standard deviation.
        interpolation: the resize filter, ``"bilinear"`` or ``"bicubic"``.
    """

    train: bool
    train_size: int
    scale: tuple[float, float]
    test_resize: int
    test_size: int
    mean: tuple[float, ...] = MEAN
    std: tuple[float, ...] = STD
    interpolation: str = "bilinear"

    @classmethod
    def of(cls, p: DataParams, train: bool) -> "View":
        """The view the `data` section describes.

        Args:
            p: the `data` section.
            train: the training view (augmented) or the test view.

        Returns:
            The View.

        Raises:
            ValueError: data.test_size > data.test_resize.
        """
        _check_sizes(p)
        mean, std = normalisation(p)
        return cls(train, p.train_size, tuple(p.train_crop_scale), p.test_resize, p.test_size, mean, std,
                   interpolation(p))

    @property
    def size(self) -> int:
        """S, the side of the images this view produces."""
        return self.train_size if self.train else self.test_size


@dataclass
class ImageBatch:
    """B cached images as the loader hands them over: raw uint8 pixels, each image its own size.

    Attributes:
        pixels: uint8, the images back to back; image k is h_k x w_k x 3 (RGB interleaved), starting at the sum
            of the previous images' 3 h w.
        shapes: B x 2 int64 (h, w) of each image.
        labels: B int64 labels.
        indices: B int64 positions in the split.
        view: how the images are to be shown (train or test view).
    """

    pixels: torch.Tensor  # uint8, image k is h_k x w_k x 3 starting at sum of the previous 3 h w
    shapes: torch.Tensor  # B x 2 int64 (h, w)
    labels: torch.Tensor  # B int64
    indices: torch.Tensor  # B int64, positions in the split
    view: View

    def __len__(self) -> int:
        return len(self.labels)

    def pin_memory(self) -> "ImageBatch":
        """Called by DataLoader(pin_memory=True): page-locked pixels copy to a GPU asynchronously.

        Returns:
            A copy whose tensors are in page-locked memory.
        """
        return replace(self, pixels=self.pixels.pin_memory(), labels=self.labels.pin_memory(),
                       indices=self.indices.pin_memory())

    def images(self, device: torch.device | str = "cpu",
               memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
        """B x 3 x S x S float32 on `device` (in `memory_format`), normalised with the view's mean and std (ImageNet's by default).

        The train view's crop boxes and flips come from the global torch RNG.

        Args:
            device: where the crops, resizes and normalisation run and the result lives.
            memory_format: the result's memory format (``torch.channels_last`` on a GPU).

        Returns:
            The network's input for the batch.
        """
        device = torch.device(device)
        B, v, S = len(self), self.view, self.view.size
        hw = self.shapes.tolist()
        if v.train:
            boxes = crop_boxes(B, self.shapes[:, 0], self.shapes[:, 1], v.scale).long().tolist()  # top, left, h, w
            flips = (torch.rand(B) < 0.5).tolist()
        else:
            boxes, flips = [None] * B, [False] * B
        flat = self.pixels.to(device, non_blocking=True)
        work = torch.uint8 if device.type == "cpu" else torch.float32
        if device.type == "cpu" and get_worker_info() is not None:
            # In a loader worker: write straight into shared memory, which the batch crosses to the trainer in
            # (as default_collate does), instead of a copy there.
            out = torch.empty(0).new(torch.empty(0)._typed_storage()._new_shared(B * 3 * S * S)).view(B, 3, S, S)
        else:
            out = torch.empty(B, 3, S, S, device=device, memory_format=memory_format)
        # (x / 255 - mean) / std as x * mul - sub, per image while it is in the cache.
        std = torch.tensor(v.std, device=device).view(3, 1, 1)
        mul, sub = 1.0 / (255.0 * std), torch.tensor(v.mean, device=device).view(3, 1, 1) / std
        start = 0
        for k, ((h, w), box, flip) in enumerate(zip(hw, boxes, flips)):
            img = flat[start:start + 3 * h * w].view(1, h, w, 3).permute(0, 3, 1, 2)  # 1 x 3 x h x w channels-last
            start += 3 * h * w
            if box is None:  # test view: shorter side to test_resize, then the centre crop
                if min(h, w) != v.test_resize:
                    h, w = (v.test_resize, int(v.test_resize * w / h)) if h <= w else \
                        (int(v.test_resize * h / w), v.test_resize)
                    img = _resize(img.to(work), h, w, v.interpolation)
                top, left = int(round((h - S) / 2.0)), int(round((w - S) / 2.0))
                box = (top, left, S, S)
            top, left, bh, bw = box
            img = img[:, :, top:top + bh, left:left + bw]
            if (bh, bw) != (S, S):
                img = _resize(img.to(work), S, S, v.interpolation)
            out[k].copy_(img[0].flip(-1) if flip else img[0]).mul_(mul).sub_(sub)
        return out


def _resize(img: torch.Tensor, h: int, w: int, mode: str = "bilinear") -> torch.Tensor:
    return F.interpolate(img, size=(h, w), mode=mode, align_corners=False, antialias=True)


def collate_for(device: torch.device | str) -> Callable:
    """DataLoader collate_fn for a model on `device`. A dataset's __getitems__ may hand over an ImageBatch, or
    collated (images, labels, indices) already; a list of samples is stacked. For a CPU model an ImageBatch is
    augmented here, in the loader workers (in parallel, beside the training process); for a GPU it stays raw and
    to_device augments it on the GPU.

    Args:
        device: the model's device.

    Returns:
        The collate function for ``DataLoader(collate_fn=...)``.
    """
    return functools.partial(_collate, augment=torch.device(device).type == "cpu")


def _collate(batch, augment: bool):
    if isinstance(batch, ImageBatch):
        return (batch.images("cpu"), batch.labels, batch.indices) if augment else batch
    if isinstance(batch, (tuple, list)) and len(batch) == 3 and isinstance(batch[0], torch.Tensor) \
            and batch[0].dim() == 4:
        return batch
    return default_collate(batch)


def to_device(batch: ImageBatch | Sequence[torch.Tensor], device: torch.device | str,
              memory_format: torch.memory_format = torch.contiguous_format
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, labels, indices) on `device`; an ImageBatch is cropped, resized, flipped and normalised there.

    Args:
        batch: a collated ``(images, labels, indices)``, or an ImageBatch of raw cached images.
        device: the model's device.
        memory_format: the images' memory format on the device.

    Returns:
        ``(images B x 3 x S x S float, labels B, indices B)`` on `device`.
    """
    if isinstance(batch, ImageBatch):
        imgs, labels, idx = batch.images(device, memory_format), batch.labels, batch.indices
    else:
        imgs, labels, idx = batch
    imgs = imgs.to(device, non_blocking=True, memory_format=memory_format)  # B x 3 x S x S
    labels = torch.as_tensor(labels).to(device, non_blocking=True)  # B
    idx = torch.as_tensor(idx).to(device, non_blocking=True)  # B, dataset indices
    return imgs, labels, idx
