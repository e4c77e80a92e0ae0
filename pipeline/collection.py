"""Image collections to embed: a folder (one sub-folder per class, or flat), a CSV, or one image file.

    <root>/<class>/<image>    labels from the class folders (sorted names -> 0..C-1)
    <root>/<image>            no labels
    file.csv                  header `path,label` (label optional): paths relative to the CSV's folder, labels
                              any string (sorted -> 0..C-1)
    image.jpg                 one image (a query)

`ImageFiles` decodes with PIL (EXIF orientation applied, any mode converted to RGB, an image over the pixel budget
refused: xbmcore.data.decode) and applies the test transform; an image that cannot be decoded comes back as its error message, so `embed_files` can name, skip and count it (or
stop with `strict`).
"""
from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from xbmcore.data.decode import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, open_image

log = logging.getLogger(__name__)


@dataclass
class Collection:
    root: Path  # folder the names are relative to
    names: list[str]  # image paths relative to root, as stored with the embeddings
    labels: np.ndarray | None  # int64 per image (0..C-1), None for a flat folder or a CSV without labels
    classes: list[str] | None  # class name of each label

    @property
    def paths(self) -> list[Path]:
        return [self.root / n for n in self.names]

    def __len__(self) -> int:
        return len(self.names)


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def _labelled(names: list[str], class_names: list[str]) -> tuple[np.ndarray, list[str]]:
    classes = sorted(set(class_names))
    at = {c: i for i, c in enumerate(classes)}
    return np.array([at[c] for c in class_names], dtype=np.int64), classes


def read_collection(source: str | Path) -> Collection:
    """The images of a folder, a CSV or a single image file (see the module docstring); ValueError when there
    is none or the layout is ambiguous, naming the path."""
    source = Path(source)
    if not source.exists():
        raise ValueError(f"{source}: no such file or folder (expected a folder of images, a CSV or an image)")
    if source.is_file():
        if source.suffix.lower() == ".csv":
            return _read_csv(source)
        if source.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(f"{source}: expected a folder, a .csv file or an image "
                             f"({', '.join(sorted(IMAGE_SUFFIXES))}), got a {source.suffix or 'suffix-less'} file")
        return Collection(source.parent, [source.name], None, None)
    top = sorted(p for p in source.iterdir() if _is_image(p))
    class_dirs = sorted(d for d in source.iterdir() if d.is_dir() and not d.name.startswith("."))
    nested = [(d.name, p) for d in class_dirs for p in sorted(d.iterdir()) if _is_image(p)]
    if top and nested:
        raise ValueError(f"{source}: holds both images ({top[0].name}, ...) and class folders with images "
                         f"({nested[0][0]}/, ...); expected one layout: <root>/<class>/<image> or <root>/<image>")
    if top:
        return Collection(source, [p.name for p in top], None, None)
    if not nested:
        raise ValueError(f"{source}: no images found (expected <root>/<class>/<image> or <root>/<image> with "
                         f"suffixes {', '.join(sorted(IMAGE_SUFFIXES))})")
    names = [f"{c}/{p.name}" for c, p in nested]
    labels, classes = _labelled(names, [c for c, _ in nested])
    return Collection(source, names, labels, classes)


def _read_csv(path: Path) -> Collection:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    header = [h.strip().lower() for h in rows[0]] if rows else []
    if header not in (["path"], ["path", "label"]):
        raise ValueError(f"{path}:1: expected the header 'path,label' (or 'path'), got {','.join(header)!r}")
    names, class_names = [], []
    for lineno, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise ValueError(f"{path}:{lineno}: expected {len(header)} columns ({','.join(header)}), "
                             f"got {len(row)}: {','.join(row)!r}")
        names.append(row[0].strip())
        if len(header) == 2:
            class_names.append(row[1].strip())
    if not names:
        raise ValueError(f"{path}: no rows after the header")
    if len(header) == 1:
        return Collection(path.parent, names, None, None)
    labels, classes = _labelled(names, class_names)
    return Collection(path.parent, names, labels, classes)


def load_rgb(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image file to RGB at full size with its EXIF orientation applied; refused over max_pixels.
    (xbmcore.data.decode.decode_rgb decodes straight to a target size, at a fraction of the memory.)"""
    with open_image(path, max_pixels) as im:
        im = ImageOps.exif_transpose(im)
        return im.convert("RGB")


class ImageFiles(torch.utils.data.Dataset):
    """Items (tensor 3 x S x S, i), or (error message, i) for a file that cannot be read or decoded."""

    def __init__(self, paths: list[Path], transform: Callable, load: Callable[[Path], Image.Image] = load_rgb):
        self.paths, self.transform, self.load = paths, transform, load

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return self.transform(self.load(self.paths[i])), i
        except Exception as err:  # unreadable, truncated, not an image: the caller names, skips and counts it
            return f"{type(err).__name__}: {err}", i


def _split_failures(batch):
    ok = [(x, i) for x, i in batch if isinstance(x, torch.Tensor)]
    bad = [(msg, i) for msg, i in batch if not isinstance(msg, torch.Tensor)]
    imgs = torch.stack([x for x, _ in ok]) if ok else None
    return imgs, [i for _, i in ok], bad


def embed_files(model: torch.nn.Module, paths: list[Path], transform: Callable, batch_size: int = 64,
                device: str | torch.device = "cpu", num_workers: int = 0, strict: bool = False,
                progress: bool | None = None, names: list[str] | None = None,
                load: Callable[[Path], Image.Image] = load_rgb,
                ) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """Embed image files in batches: (embeddings n x D float32, positions in `paths` of the n embedded images,
    [(name, error)] of the images skipped). strict: the first undecodable image raises ValueError naming it.
    The model must already be on `device`; it runs in eval mode without gradients. `load` decodes one file to the
    PIL image `transform` takes (Embedder passes xbmcore.data.decode.decode_rgb at its test resize)."""
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    names = names or [str(p) for p in paths]
    device = torch.device(device)
    loader = torch.utils.data.DataLoader(ImageFiles(paths, transform, load), batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=_split_failures, pin_memory=device.type == "cuda")
    was_training = model.training
    model.eval()
    feats, kept, skipped = [], [], []
    bar = tqdm(total=len(paths), unit="img", desc="embedding", disable=None if progress is None else not progress)
    try:
        with torch.inference_mode():
            for imgs, idx, bad in loader:
                for msg, i in bad:
                    if strict:
                        raise ValueError(f"{names[i]}: cannot decode the image ({msg})")
                    log.warning("%s: skipped, cannot decode the image (%s)", names[i], msg)
                    skipped.append((names[i], msg))
                if imgs is not None:
                    feats.append(model(imgs.to(device, non_blocking=True)).float().cpu().numpy())
                    kept.extend(idx)
                bar.update(len(idx) + len(bad))
    finally:
        bar.close()
        model.train(was_training)
    if not feats:
        raise ValueError(f"none of the {len(paths)} images could be decoded (first: {skipped[0][0]}: "
                         f"{skipped[0][1]})")
    return np.concatenate(feats).astype(np.float32, copy=False), np.asarray(kept, dtype=np.int64), skipped
