"""Decoding images the product did not make (a user's folder, a client's request) within a pixel budget.

    open_image(src, max_pixels)          the header only; width x height over max_pixels is refused before a
                                         pixel is decoded (ImageTooLarge, a ValueError), and so is Pillow's own
                                         bomb check (DecompressionBombError above ~179 MP, not an OSError)
    decode_rgb(src, size, max_pixels)    8-bit RGB, EXIF orientation applied, shorter side `size`: torchvision's
                                         Resize(size) of the original (PIL bilinear, sizes from the original)

decode_rgb decodes a JPEG at a reduced DCT scale (draft mode) when that still leaves at least twice the target;
other formats have no reduced decode, so they are decoded whole (bounded by max_pixels) and then shrunk by
Image.reduce to at least twice the target before any other mode conversion or rotation copies them (palette and
16-bit images, which reduce cannot average, are converted to RGB first). A PNG of 81 MP can be 97 KB on disk and
243 MB decoded as RGB: the budget, not the file size, is what bounds memory.

A decode of more than LARGE_PIXELS holds a process-wide lock until its full-size pixels are freed, so the
threads of one process (a model server answers requests from a thread pool) hold at most one large image.
"""
from __future__ import annotations

import io
import math
import threading
from contextlib import nullcontext
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

# The image files of a user's folder, a dropped file or a request: what Pillow decodes and people keep in photo
# folders. Other files in a folder (README, .DS_Store, a video) are not images. The one set of the project (the
# folder collection, the desktop app); a published layout's scan takes whatever Pillow opens (layouts.image_extensions).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})

# 50 MP: an 8,660 x 5,773 photo, beyond most cameras; decoded as RGBA it costs 200 MB. (Pillow itself refuses
# more than 2 x Image.MAX_IMAGE_PIXELS = 178,956,970, the schema's upper bound for data.max_pixels.)
DEFAULT_MAX_PIXELS = 50_000_000
# Above this many pixels (16 MB as RGBA) a decode takes the lock; below it threads decode side by side.
LARGE_PIXELS = 4_000_000

_LARGE_DECODE = threading.Lock()
_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# Modes Image.reduce cannot average (palette indices, bits, 16-bit): converted to RGB before reducing.
_CONVERT_FIRST = ("1", "P", "PA", "I;16", "I;16B", "I;16L", "I;16N")
# EXIF orientation -> the transpose that shows the image upright (what ImageOps.exif_transpose applies).
_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_90}
_SWAPS_SIDES = (Image.Transpose.TRANSPOSE, Image.Transpose.ROTATE_270, Image.Transpose.TRANSVERSE,
                 Image.Transpose.ROTATE_90)

Source = str | Path | bytes | bytearray | memoryview | BinaryIO


class ImageTooLarge(ValueError):
    """An image over the pixel budget: refused as unreadable, before (or instead of) decoding it."""


def _mp(pixels: int) -> str:
    return f"{pixels / 1e6:.4g} MP"


def resized_shape(width: int, height: int, size: int) -> tuple[int, int]:
    """(w, h) with the shorter side `size`, the longer one scaled and truncated (torchvision's Resize(int)).

    Args:
        width: the original width.
        height: the original height.
        size: the shorter side wanted.

    Returns:
        ``(w, h)`` of the resized image.
    """
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def open_image(source: Source, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The image with only its header parsed, refused (ImageTooLarge) when width x height > max_pixels.

    Args:
        source: a path, the file's bytes, or a binary file object.
        max_pixels: the pixel budget.

    Returns:
        The opened PIL image (close it when done).

    Raises:
        ImageTooLarge: over the budget, or over Pillow's own decompression-bomb limit.
        FileNotFoundError: a path that does not exist.
        PIL.UnidentifiedImageError: not an image Pillow knows.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    try:
        im = Image.open(source)
    except Image.DecompressionBombError as err:
        raise ImageTooLarge(f"over the pixel limit of {_mp(max_pixels)} (max_pixels): {err}") from None
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise ImageTooLarge(f"{w} x {h} pixels ({_mp(w * h)}), over the limit of {_mp(max_pixels)} (max_pixels)")
    return im


def _to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB, always a new image: 16-bit grey keeps its top 8 bits, transparency is composited on white."""
    if im.mode in _HIGH_BIT_MODES:  # convert() would clip everything above 255 to white
        im = Image.fromarray((np.asarray(im, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def decode_rgb(source: Source, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """RGB image with shorter side `size` (see the module docstring); ImageTooLarge over the budget, Pillow's
    errors (OSError, SyntaxError, ValueError, ...) for a damaged or foreign file.

    Args:
        source: a path, the file's bytes, or a binary file object.
        size: the shorter side of the result.
        max_pixels: the pixel budget, of the original and of the result.

    Returns:
        An 8-bit RGB PIL image, EXIF orientation applied, shorter side `size`.

    Raises:
        ImageTooLarge: the original, or the resized result, over the budget.
    """
    im = open_image(source, max_pixels)
    try:
        w, h = im.size
        tw, th = resized_shape(w, h, size)  # the output's pixel count, whatever the orientation
        if tw * th > max_pixels:  # a 1 x 10^6 strip resized to shorter side 256 would be 65 GP
            raise ImageTooLarge(f"{w} x {h} pixels resized to shorter side {size} would be {tw} x {th} "
                                f"({_mp(tw * th)}), over the limit of {_mp(max_pixels)} (max_pixels)")
        with _LARGE_DECODE if w * h > LARGE_PIXELS else nullcontext():
            transpose = _ORIENTATION.get(im.getexif().get(0x0112))  # a PNG's EXIF may follow its pixels: loads
            if im.format == "JPEG" and min(w, h) >= 4 * size:
                # The smallest DCT scale that keeps >= 2x the target: the final resize still averages >= 2 pixels.
                im.draft("RGB", (math.ceil(w * 2 * size / min(w, h)), math.ceil(h * 2 * size / min(w, h))))
            small = _to_rgb(im) if im.mode in _CONVERT_FIRST else im
            factor = min(small.size) // (2 * size)
            if factor >= 2:
                small = small.reduce(factor)
            small = _to_rgb(small)
            im.close()  # frees the full-size pixels before the lock lets another large decode start
    finally:
        im.close()
    target = (th, tw) if transpose in _SWAPS_SIDES else (tw, th)
    if transpose is not None:
        small = small.transpose(transpose)
    return small if small.size == target else small.resize(target, Image.BILINEAR)
