"""Image transforms: train = random resized crop + horizontal flip, test = resize + centre crop; then normalise.

Two implementations of the same recipe:

  pil_transform    torchvision.transforms.v2 on one decoded image (the file-backed datasets);
  BatchTransform   the same on a whole uint8 batch B x 3 x H x W at once (the array-backed embedded set): one
                   affine grid per image (crop box and flip) and one grid_sample call for the batch, which is what
                   lets the loader feed thousands of images per second from one process.
Sizes come from DataParams: train_size (crop output), test_resize (shorter side), test_size (centre crop); the
resize filter (interpolation) and the normalisation (mean, std) too. Their `auto` values are resolved from the model
when the params are loaded (xbmcore.backbones.resolve_input); an unresolved `auto` filter or normalisation is the
built-in backbones' (bilinear, ImageNet's statistics), an unresolved size an error.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from xbmcore.config import DataParams

# ImageNet statistics: what the pretrained torchvision backbones expect; harmless for networks trained from scratch.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# torchvision's RandomResizedCrop default aspect-ratio range.
RATIO = (3 / 4, 4 / 3)


def normalisation(p: DataParams) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) images are normalised with: data.mean and data.std, ImageNet's where they say auto.

    Args:
        p: the `data` section.

    Returns:
        ``(mean, std)``, three floats each (RGB).
    """
    return (MEAN if p.mean == "auto" else tuple(p.mean)), (STD if p.std == "auto" else tuple(p.std))


def interpolation(p: DataParams) -> str:
    """The resize filter of the crops and the test view: data.interpolation, bilinear where it says auto.

    Args:
        p: the `data` section.

    Returns:
        ``"bilinear"`` or ``"bicubic"``.
    """
    return "bilinear" if p.interpolation == "auto" else p.interpolation


def _check_sizes(p: DataParams) -> None:
    if auto := [k for k in ("train_size", "test_resize", "test_size") if getattr(p, k) == "auto"]:
        raise ValueError(f"data.{', data.'.join(auto)}: auto, unresolved: the model's input settles it; load the "
                         f"params with xbmcore.backbones.resolve_input(params) first (the pipeline does)")
    if p.test_size > p.test_resize:
        raise ValueError(
            f"data.test_size ({p.test_size}) must be <= data.test_resize ({p.test_resize}): the centre crop is "
            f"taken from the resized image")


def pil_transform(p: DataParams, train: bool) -> v2.Compose:
    """Transform for one PIL image -> float tensor 3 x S x S, normalised.

    Args:
        p: the `data` section (sizes and crop scale).
        train: random resized crop + flip, else resize + centre crop.

    Returns:
        A torchvision v2 transform.

    Raises:
        ValueError: data.test_size > data.test_resize.
    """
    _check_sizes(p)
    mode = v2.InterpolationMode(interpolation(p))
    geometric = (
        [v2.RandomResizedCrop(p.train_size, scale=tuple(p.train_crop_scale), ratio=RATIO, interpolation=mode,
                              antialias=True),
         v2.RandomHorizontalFlip()]
        if train else [v2.Resize(p.test_resize, interpolation=mode, antialias=True), v2.CenterCrop(p.test_size)]
    )
    mean, std = normalisation(p)
    return v2.Compose([*geometric, v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def crop_boxes(n: int, height: int | torch.Tensor, width: int | torch.Tensor, scale: tuple[float, float],
               ratio: tuple[float, float] = RATIO, attempts: int = 10) -> torch.Tensor:
    """RandomResizedCrop's box sampling, vectorised: n x 4 (top, left, h, w) in pixels.

    Like torchvision: up to `attempts` draws of an area fraction in `scale` and a log-uniform aspect ratio in
    `ratio`; the first draw that fits is used; images with none fall back to the largest centred box whose
    aspect ratio lies within `ratio`. `height` and `width` are one size for all n images, or one per image (n).

    Args:
        n: the number of images.
        height: the images' height, one for all or n of them.
        width: the images' width, one for all or n of them.
        scale: the range of the box's area as a fraction of the image's.
        ratio: the range of the box's aspect ratio (width / height).
        attempts: draws per image before the fallback.

    Returns:
        n x 4 float32 boxes (top, left, h, w), drawn from the global torch RNG.
    """
    H = torch.as_tensor(height, dtype=torch.float32).expand(n)  # n
    W = torch.as_tensor(width, dtype=torch.float32).expand(n)
    target = (H * W)[:, None] * torch.empty(n, attempts).uniform_(*scale)  # n x attempts
    ar = torch.exp(torch.empty(n, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1])))
    w = torch.round(torch.sqrt(target * ar))
    h = torch.round(torch.sqrt(target / ar))
    ok = (w > 0) & (w <= W[:, None]) & (h > 0) & (h <= H[:, None])
    first = ok.to(torch.uint8).argmax(1)  # first fitting attempt (0 when none fits; overwritten below)
    rows = torch.arange(n)
    w, h, found = w[rows, first], h[rows, first], ok.any(1)
    # Fallback: the whole image, narrowed to the nearest aspect ratio within `ratio`.
    in_ratio = W / H
    fw = torch.where(in_ratio > ratio[1], torch.round(H * ratio[1]), W)
    fh = torch.where(in_ratio < ratio[0], torch.round(W / ratio[0]), H)
    w = torch.where(found, w, fw)
    h = torch.where(found, h, fh)
    top = torch.where(found, torch.floor(torch.rand(n) * (H - h + 1)), torch.div(H - fh, 2, rounding_mode="floor"))
    left = torch.where(found, torch.floor(torch.rand(n) * (W - w + 1)), torch.div(W - fw, 2, rounding_mode="floor"))
    return torch.stack([top, left, h, w], 1)


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int,
                 mode: str = "bilinear") -> torch.Tensor:
    """Crop box i (top, left, h, w) of image i, resize it bilinearly to size x size, mirror where flip[i].

    x: B x C x H x W float, boxes: B x 4, flip: B bool -> B x C x size x size. The sampling grid maps output pixel
    centres into the box in grid_sample's coordinates (align_corners=False: -1 and 1 are the outer pixel edges),
    so the output samples the box exactly as torchvision's bilinear resized_crop (without antialiasing) does.
    Crop, resize and flip are separable, so the grid is an outer combination of one x and one y ramp per image.

    Args:
        x: B x C x H x W float images.
        boxes: B x 4 crop boxes (top, left, h, w) in pixels.
        flip: B bools: mirror that image horizontally.
        size: the output side S.
        mode: ``"bilinear"`` or ``"bicubic"`` sampling.

    Returns:
        B x C x S x S float images.
    """
    B, C, H, W = x.shape
    top, left, h, w = boxes.to(torch.float32).unbind(1)
    ramp = (torch.arange(size, dtype=torch.float32) + 0.5) / size  # output pixel centres in [0, 1]
    ramp_x = torch.where(flip[:, None], 1 - ramp, ramp)  # B x S
    gx = (2 * (left[:, None] + ramp_x * w[:, None]) / W - 1)  # B x S, input x in [-1, 1]
    gy = (2 * (top[:, None] + ramp * h[:, None]) / H - 1)  # B x S
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)  # B x S x S x 2
    return F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)


class BatchTransform:
    """The train or test transform applied to a uint8 batch B x 3 x H x W -> float B x 3 x S x S, normalised.

    Call it on a batch: ``BatchTransform(p, train=True)(images)``.

    Args:
        p: the `data` section (sizes and crop scale).
        train: random resized crop + flip (from the global torch RNG), else resize + centre crop.

    Raises:
        ValueError: data.test_size > data.test_resize.
    """

    def __init__(self, p: DataParams, train: bool):
        _check_sizes(p)
        self.train = train
        self.train_size = p.train_size
        self.test_resize = p.test_resize
        self.test_size = p.test_size
        self.scale = tuple(p.train_crop_scale)
        self.mode = interpolation(p)
        # (x / 255 - mean) / std folded into one multiply-add.
        mean, std = normalisation(p)
        std = torch.tensor(std).view(1, 3, 1, 1)
        self._mul = 1.0 / (255.0 * std)
        self._add = -torch.tensor(mean).view(1, 3, 1, 1) / std

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"BatchTransform: expected a uint8 batch B x 3 x H x W, got {x.dtype} {tuple(x.shape)}")
        # One intra-op thread: a 32 px batch is a few milliseconds of work, and splitting it costs more than it
        # saves; on a busy CPU every parallel region waits for a second core (measured 43 ms instead of 5 ms per
        # batch of 64 at load 9 on 2 cores). Worker processes of a DataLoader run with one thread anyway.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            x = self._crop_flip(x) if self.train else self._resize_centre(x)
            return x * self._mul + self._add
        finally:
            torch.set_num_threads(threads)

    def _crop_flip(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        flip = torch.rand(B) < 0.5
        return resized_crop(x.float(), crop_boxes(B, H, W, self.scale), flip, self.train_size, self.mode)

    def _resize_centre(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        xf = x.float()
        if min(H, W) != self.test_resize:
            # Shorter side to test_resize, keeping the aspect ratio (torchvision's Resize(int) rounding).
            if H <= W:
                size = (self.test_resize, int(self.test_resize * W / H))
            else:
                size = (int(self.test_resize * H / W), self.test_resize)
            xf = F.interpolate(xf, size=size, mode=self.mode, align_corners=False, antialias=True)
            H, W = size
        S = self.test_size
        top, left = int(round((H - S) / 2.0)), int(round((W - S) / 2.0))
        return xf[:, :, top:top + S, left:left + S]
