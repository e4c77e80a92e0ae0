"""The decoded-image cache of a real dataset: every image decoded once, stored as raw uint8, memory-mapped.

    cache/pixels.u8   the images back to back, each h x w x 3 uint8 (RGB interleaved, as decoded: viewed as a
                      channels-last tensor, the layout torch's uint8 resize is fastest on, 2.5x channel-first)
    cache/shapes.npy  N x 3 int64: byte offset, h, w of image k (row k of the prepared index.csv)

Each image is decoded by xbmcore.data.decode.decode_rgb (EXIF orientation applied; grayscale, palette, CMYK
and 16-bit images converted to 8-bit RGB; transparent ones composited on white; an image over data.max_pixels
refused) and resized so that its shorter side is `size`, by PIL's bilinear filter with torchvision's Resize(int)
rounding: the pixels are those of `Resize(size)` on the original. An image of at least 4x the target is first
shrunk to >= 2x it (a JPEG by its reduced DCT scale, PIL's draft mode; others by Image.reduce), which keeps a
12-megapixel photo from costing 20x a 500 px one, within a few grey levels of the direct resize.

Raw pixels, not JPEG re-encoded at the cache size: reading a batch is a memory copy, so the loader feeds a GPU
from one core, where decoding a 256 px JPEG costs a core ~0.3 ms per image (bench.data_real measures both).
The price is disk: ~0.25 MB per image at size 256 (SOP's 120k images: ~30 GB).

Built in parallel processes; both files are written under temporary names and renamed only when complete,
and the caller writes meta.json last, so a killed build never leaves a cache that passes for complete.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from xbmcore.data.decode import DEFAULT_MAX_PIXELS, decode_rgb
from xbmcore.atomic import atomic_path

log = logging.getLogger(__name__)

CACHE_DIR = "cache"
PIXELS_FILE = "pixels.u8"
SHAPES_FILE = "shapes.npy"


def decode_image(path: str | Path, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The cached form of one image: h x w x 3 uint8 with min(h, w) == size. Raises on an unreadable file and
    on one over max_pixels (xbmcore.data.decode).

    Args:
        path: the image file.
        size: the shorter side of the result.
        max_pixels: the pixel budget of the original.

    Returns:
        h x w x 3 uint8 RGB, C-contiguous.
    """
    return np.ascontiguousarray(np.asarray(decode_rgb(path, size, max_pixels)))


def _decode_job(job: tuple[str, int, int]) -> tuple[bytes, int, int] | str:
    path, size, max_pixels = job
    try:
        arr = decode_image(path, size, max_pixels)
    except Exception as err:  # PIL raises many types for a damaged file; the caller names it
        return f"{type(err).__name__}: {err}"
    return arr.tobytes(), arr.shape[0], arr.shape[1]


def build_cache(folder: Path, paths: Sequence[Path], size: int, workers: int | None = None,
                progress: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[tuple[int, str]]:
    """Decode `paths` into folder/cache/; returns the (position, error) of the images that could not be decoded.

    Those are left out of the cache, so its row k is the k-th decodable path. `workers` processes decode
    (None: one per core; 1: in this process), each holding at most one full-size image of <= max_pixels.

    Args:
        folder: the prepared dataset's folder; the cache goes to ``folder/cache/``.
        paths: the images, in index order.
        size: the shorter side of the cached images (data.cache_size).
        workers: decoding processes (None: one per core).
        progress: show a progress bar.
        max_pixels: the pixel budget of an original image.

    Returns:
        ``[(position in paths, error message), ...]`` of the images left out.
    """
    out = folder / CACHE_DIR
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tmp"):  # a build killed earlier (SIGKILL skips atomic_path's clean-up)
        stale.unlink()
    workers = workers or os.cpu_count() or 1
    jobs = [(str(p), size, max_pixels) for p in paths]
    failed: list[tuple[int, str]] = []
    table: list[tuple[int, int, int]] = []
    with atomic_path(out / PIXELS_FILE) as tmp_pixels, open(tmp_pixels, "wb") as f:
        pool = multiprocessing.get_context("spawn" if os.name != "posix" else "fork").Pool(workers) \
            if workers > 1 and len(jobs) > 1 else None
        try:
            results = pool.imap(_decode_job, jobs, chunksize=8) if pool else map(_decode_job, jobs)
            offset = 0
            for k, r in enumerate(tqdm(results, total=len(jobs), desc="decoding images into the cache",
                                       unit="img", disable=not progress)):
                if isinstance(r, str):
                    failed.append((k, r))
                    continue
                data, h, w = r
                f.write(data)
                table.append((offset, h, w))
                offset += len(data)
        finally:
            if pool is not None:
                pool.terminate()
        f.flush()
        os.fsync(f.fileno())
        with atomic_path(out / SHAPES_FILE) as tmp_shapes:
            with open(tmp_shapes, "wb") as g:
                np.save(g, np.array(table, dtype=np.int64).reshape(-1, 3))
    return failed


class ImageCache:
    """Read access to a built cache. Pickles without its memory map (DataLoader workers reopen it).

    Args:
        folder: the cache folder (``<prepared dataset>/cache``).

    Raises:
        ValueError: a pixels file whose size does not match the shapes table (a damaged cache).

    Attributes:
        folder (Path): the cache folder.
        shapes (np.ndarray): N x 3 int64: byte offset, h, w of each image.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.shapes = np.load(self.folder / SHAPES_FILE)  # N x 3: offset, h, w
        self._pixels: np.memmap | None = None
        expected = int((3 * self.shapes[:, 1] * self.shapes[:, 2]).sum())
        actual = (self.folder / PIXELS_FILE).stat().st_size
        if actual != expected:
            raise ValueError(f"{self.folder / PIXELS_FILE}: {actual} bytes, but {SHAPES_FILE} describes {expected}; "
                             f"the cache is damaged: prepare the dataset again")

    def __len__(self) -> int:
        return len(self.shapes)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pixels": None}

    @property
    def pixels(self) -> np.memmap:
        """The pixels file, memory-mapped read-only (opened on first use in each process)."""
        if self._pixels is None:
            self._pixels = np.memmap(self.folder / PIXELS_FILE, dtype=np.uint8, mode="r")
        return self._pixels

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images `rows` back to back (uint8, h x w x 3 each) and their B x 2 (h, w).

        Args:
            rows: B row numbers of the cache.

        Returns:
            ``(pixels, shapes)``: the flat uint8 pixels and B x 2 int64 (h, w), in the order of `rows`.
        """
        off, h, w = self.shapes[rows].T
        n = 3 * h * w
        start = np.concatenate([[0], np.cumsum(n)[:-1]])
        flat = np.empty(int(n.sum()), np.uint8)
        src = self.pixels
        for k in np.argsort(off, kind="stable"):  # in file order: sequential reads on a cold cache
            flat[start[k]:start[k] + n[k]] = src[off[k]:off[k] + n[k]]
        return flat, np.stack([h, w], 1)

    def image(self, row: int) -> np.ndarray:
        """Image `row` as h x w x 3 uint8.

        Args:
            row: a row of the cache.

        Returns:
            The image's RGB pixels.
        """
        flat, hw = self.read(np.array([row]))
        return flat.reshape(int(hw[0, 0]), int(hw[0, 1]), 3)
