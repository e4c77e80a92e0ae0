"""Benchmark of real-image loading: the per-image PIL path against the decoded-image cache, printed as JSON.

Usage: python -m bench.data_real [--classes 200 --per-class 10] [--batches 100] [--device cpu|cuda]

Generates classes x per-class photo-like JPEGs (500 x 400, quality 90: smooth gradients, shaded shapes, edges
and mild sensor noise, which a JPEG codec finds as costly as a photograph) as a `folder` dataset in a temporary
folder, then measures, in one run, 224 px training batches of 64 (random resized crop, flip, normalisation):

  pil    torchvision.datasets.ImageFolder with the v2 transforms, DataLoader workers = cores: what torchvision
         users write. Every image is decoded from its file at every step.
  cache  the pipeline's path: the cache built by prepare_dataset (raw uint8, shorter side 256), read by a
         DataLoader, augmented by xbmcore.data.batch.to_device on --device.
  jpeg   the alternative cache format, for the choice: the same cached images re-encoded as JPEG (quality 90) and
         decoded per batch with torchvision.io.decode_jpeg in the loader, then the same augmentation.

Also: the one-off cache build time per image, bytes per image of the raw and the JPEG cache, and how fast one
process reads raw cached batches (no workers, no augmentation: the CPU's share of a GPU run).
"""
from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from bench.data import RandomBatches
from xbmcore.config import DataParams

SIZE = (500, 400)


# ------------------------------------------------------------------------------------------- photo renderer

def _gradient(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """h x w x 3 float: a linear blend of two colours at a random angle, with a soft vignette."""
    a, b = rng.uniform(0, 255, 3).astype(np.float32), rng.uniform(0, 255, 3).astype(np.float32)
    angle = rng.uniform(0, math.pi)
    yy, xx = np.ogrid[0:h, 0:w]
    yy, xx = yy.astype(np.float32), xx.astype(np.float32)
    t = xx * math.cos(angle) + yy * math.sin(angle)  # h x w
    t = ((t - t.min()) / max(float(t.max() - t.min()), 1.0))[..., None]
    r2 = (((xx - w / 2) / w) ** 2 + ((yy - h / 2) / h) ** 2)[..., None]
    return (a + (b - a) * t) * (1 - 0.6 * r2)


def render_photo(rng: np.random.Generator, class_rng: np.random.Generator | None = None,
                 size: tuple[int, int] = SIZE) -> Image.Image:
    """A photo-like RGB image: background gradient, blurred far shapes, a sharp near object, edges and noise.

    `class_rng` (seeded per class) fixes the object's shapes and colours; `rng` varies everything else.
    """
    w, h = size
    cls = class_rng if class_rng is not None else rng
    base = Image.fromarray(_gradient(rng, w, h).clip(0, 255).astype(np.uint8))
    far = ImageDraw.Draw(base)
    for _ in range(rng.integers(4, 9)):  # background clutter, defocused below
        x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(20, 120)
        far.ellipse([x - r, y - r * rng.uniform(0.5, 1.5), x + r, y + r], fill=tuple(rng.integers(0, 256, 3)))
    base = base.filter(ImageFilter.GaussianBlur(rng.uniform(3, 8)))
    near = ImageDraw.Draw(base)
    colours = [tuple(int(c) for c in cls.integers(0, 256, 3)) for _ in range(3)]
    n_parts = int(cls.integers(2, 5))
    parts = [(cls.integers(3, 7), cls.uniform(0.3, 1.0), cls.uniform(0, 2 * math.pi)) for _ in range(n_parts)]
    cx, cy, scale = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h, rng.uniform(0.6, 1.2) * min(w, h) / 4
    for k, (sides, rad, rot) in enumerate(parts):
        ox, oy = cx + rng.normal(0, 4) + scale * 0.6 * (k - n_parts / 2), cy + rng.normal(0, 4)
        pts = [(ox + scale * rad * math.cos(rot + 2 * math.pi * j / sides),
                oy + scale * rad * math.sin(rot + 2 * math.pi * j / sides)) for j in range(int(sides))]
        shade = tuple(int(np.clip(c * rng.uniform(0.7, 1.2), 0, 255)) for c in colours[k % 3])
        near.polygon(pts, fill=shade, outline=(20, 20, 20), width=2)
    for _ in range(rng.integers(3, 8)):  # thin edges: wires, frames, text-like strokes
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        near.line([x0, y0, x0 + rng.uniform(-200, 200), y0 + rng.uniform(-60, 60)],
                  fill=tuple(int(c) for c in rng.integers(0, 256, 3)), width=int(rng.integers(1, 4)))
    arr = np.asarray(base, dtype=np.float32)
    # Surface texture (fabric, print, grain) and light falling across the scene.
    yy, xx = np.ogrid[0:h, 0:w]
    yy, xx = yy.astype(np.float32), xx.astype(np.float32)
    f = cls.uniform(0.15, 0.6, 2)
    texture = 8 * np.sin(xx * f[0] + yy * f[1]) * np.sin(xx * f[1] * 0.7 - yy * f[0] * 1.3)
    a = rng.uniform(0, 2 * math.pi)
    light = 1 + 0.25 * ((xx - cx) * math.cos(a) + (yy - cy) * math.sin(a)) / w
    arr = arr * light[..., None] + texture[..., None]
    arr += 4.0 * rng.standard_normal((h, w, 3), dtype=np.float32)  # sensor noise
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def _render_class(job: tuple[Path, int, int, tuple[int, int], int]) -> list[Path]:
    folder, seed, per_class, size, quality = job
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(per_class):
        path = folder / f"img_{i:02d}.jpg"
        render_photo(rng, np.random.default_rng(seed), size).save(path, quality=quality)
        paths.append(path)
    return paths


def make_folder_dataset(root: Path, classes: int, per_class: int, seed: int = 0, size: tuple[int, int] = SIZE,
                        quality: int = 90, processes: int = 1) -> list[Path]:
    """root/class_XXX/img_YY.jpg photo-like JPEGs (the same for any number of processes); returns their paths."""
    seeds = np.random.default_rng(seed).integers(2**31, size=classes)
    jobs = [(root / f"class_{c:03d}", int(s), per_class, size, quality) for c, s in enumerate(seeds)]
    if processes > 1:
        with multiprocessing.Pool(processes) as pool:
            return [p for ps in pool.map(_render_class, jobs) for p in ps]
    return [p for job in jobs for p in _render_class(job)]


# ----------------------------------------------------------------------------------------------- measuring

def _rate(batches, device: torch.device, convert=None) -> float:
    """Images/s over the iterator after its first batch (worker start-up and first touch excluded)."""
    it = iter(batches)
    first = next(it)
    if convert is not None:
        convert(first)
    t0, n = time.perf_counter(), 0
    for b in it:
        x = convert(b)[0] if convert is not None else b[0]
        n += len(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def pil_path(root: Path, batch: int, batches: int, workers: int) -> float:
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    from xbmcore.data.transforms import MEAN, STD

    tf = v2.Compose([v2.RandomResizedCrop(224, scale=(0.2, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                     v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
    ds = ImageFolder(str(root), transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=RandomBatches(len(ds), batch, batches + 1),
                                         num_workers=workers)
    return _rate(loader, torch.device("cpu"))


class JpegCache(torch.utils.data.Dataset):
    """The alternative format: each cached image re-encoded as a JPEG, decoded per batch in the loader."""

    def __init__(self, ds, quality: int = 90):
        self.ds = ds
        self.blobs = []
        for i in range(len(ds)):
            one = ds.__getitems__([i])
            raw, (h, w) = one.pixels.numpy(), one.shapes[0].tolist()
            buf = io.BytesIO()
            Image.fromarray(raw.reshape(h, w, 3)).save(buf, format="JPEG", quality=quality)
            self.blobs.append(np.frombuffer(buf.getvalue(), np.uint8))

    def __len__(self) -> int:
        return len(self.ds)

    def __getitems__(self, indices):
        from torchvision.io import decode_jpeg

        from xbmcore.data.batch import ImageBatch

        imgs = decode_jpeg([torch.from_numpy(self.blobs[i].copy()) for i in indices])  # list of 3 x h x w
        hw = torch.tensor([im.shape[1:] for im in imgs], dtype=torch.int64)
        idx = torch.as_tensor(indices)
        pixels = torch.cat([im.permute(1, 2, 0).reshape(-1) for im in imgs])  # h x w x 3 each, as the cache
        return ImageBatch(pixels, hw, torch.from_numpy(self.ds.labels[indices]), idx, self.ds._view[True])


def cached_rate(ds, batch: int, batches: int, workers: int, device: torch.device) -> float:
    from xbmcore.data.batch import collate_for, to_device

    loader = torch.utils.data.DataLoader(ds, batch_sampler=RandomBatches(len(ds), batch, batches + 1),
                                         num_workers=workers, collate_fn=collate_for(device),
                                         pin_memory=device.type == "cuda",
                                         prefetch_factor=4 if workers else None)
    return _rate(loader, device, lambda b: to_device(b, device))


def read_rate(ds, batch: int, batches: int) -> float:
    """Raw cached batches handed over by the training process itself (no workers, no augmentation): what a GPU
    run's loader costs the CPU before to_device."""
    from xbmcore.data.batch import collate_for

    loader = torch.utils.data.DataLoader(ds, batch_sampler=RandomBatches(len(ds), batch, batches + 1),
                                         num_workers=0, collate_fn=collate_for("cuda"))
    return _rate(loader, torch.device("cpu"), lambda b: (b.labels,))  # counts images


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.data_real", description=__doc__.split("\n")[0])
    ap.add_argument("--classes", type=int, default=200)
    ap.add_argument("--per-class", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--batches", type=int, default=100, help="timed batches per path (after one warm-up batch)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="PIL path's loader workers (default: cores)")
    ap.add_argument("--cache-workers", type=int, default=os.cpu_count(),
                    help="cache paths' loader workers (default: cores; on a CPU they also augment)")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    from xbmcore.data import open_splits, prepare_dataset

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "photos"
        t0 = time.perf_counter()
        paths = make_folder_dataset(root, args.classes, args.per_class, processes=os.cpu_count())
        gen_s = time.perf_counter() - t0
        p = DataParams(name="folder", root=str(root), prepared=str(Path(tmp) / "prepared"), train_size=224,
                       test_resize=256, test_size=224, train_crop_scale=(0.2, 1.0), val_fraction=0.0,
                       test_fraction=0.5)
        t0 = time.perf_counter()
        out = prepare_dataset(p, Path(tmp), progress=False)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        prepare_dataset(p, Path(tmp), progress=False)
        verify_s = time.perf_counter() - t0
        meta = json.loads((out / "meta.json").read_text())
        train = open_splits(out, p).train
        pil = pil_path(root, args.batch_size, args.batches, args.workers)
        cache = cached_rate(train, args.batch_size, args.batches, args.cache_workers, device)
        read = read_rate(train, args.batch_size, args.batches)
        jpeg_ds = JpegCache(train)
        jpeg = cached_rate(jpeg_ds, args.batch_size, args.batches, args.cache_workers, device)
        result = {
            "images": len(paths),
            "image_size": list(SIZE),
            "jpeg_kb_per_image": round(sum(f.stat().st_size for f in paths) / len(paths) / 1024, 1),
            "generate_s": round(gen_s, 1),
            "cores": os.cpu_count(),
            "device": str(device),
            "batch_size": args.batch_size,
            "crop": 224,
            "cache_size": p.cache_size,
            "cache_build_ms_per_image": round(1000 * build_s / meta["num_images"], 2),
            "cache_verify_s": round(verify_s, 2),
            "raw_cache_kb_per_image": round(meta["cache_bytes"] / meta["num_images"] / 1024, 1),
            "jpeg_cache_kb_per_image": round(sum(b.nbytes for b in jpeg_ds.blobs) / len(jpeg_ds) / 1024, 1),
            "pil_workers": args.workers,
            "cache_workers": args.cache_workers,
            "torch_threads": torch.get_num_threads(),
            "pil_images_per_s": round(pil),
            "cache_images_per_s": round(cache),
            "jpeg_cache_images_per_s": round(jpeg),
            "cache_read_only_images_per_s": round(read),
            "cache_over_pil": round(cache / pil, 2),
            "cache_over_jpeg_cache": round(cache / jpeg, 2),
        }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
