"""prepare_dataset: make data/prepared/<name>/ (index + meta, and the array for the embedded set); open_splits.

Idempotent: the meta file records the recipe the folder was made from (the parameters that shape its content,
and for real datasets the size and mtime of the annotation files). When the recipe matches and the files hash to
what the meta file says, nothing is redone.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from xbmcore.config import DataParams
from xbmcore.data import synthetic
from xbmcore.data.dataset import ImageDataset
from xbmcore.data.index import (ARRAY_FILE, FORMAT_VERSION, INDEX_FILE, Index, atomic_path, carve_val, read_index,
                                read_meta, sha256_file, write_index, write_meta)
from xbmcore.data.sources import ensure_raw, get_source

log = logging.getLogger(__name__)


@dataclass
class Splits:
    """The splits of one prepared dataset. Datasets evaluated query-vs-gallery (In-Shop) have test None."""

    train: ImageDataset
    val: ImageDataset | None = None
    test: ImageDataset | None = None
    query: ImageDataset | None = None
    gallery: ImageDataset | None = None
    name: str = ""
    meta: dict[str, Any] = field(default_factory=dict, repr=False)


def _recipe(p: DataParams, annotations: list[Path] | None = None, image_root: Path | None = None) -> dict:
    r: dict[str, Any] = {"format_version": FORMAT_VERSION, "name": p.name, "val_fraction": p.val_fraction}
    if p.name == "synthetic":
        r["synthetic"] = {**p.synthetic.model_dump(), "generator": synthetic.GENERATOR_VERSION}
    else:
        r["skip_corrupt"] = p.skip_corrupt
        r["image_root"] = str(image_root)
        r["annotations"] = [[str(a), a.stat().st_size, a.stat().st_mtime_ns] for a in annotations or []]
        if p.name == "vehicleid":
            r["vehicleid_test"] = p.vehicleid_test
    return r


def _is_prepared(out: Path, recipe: dict) -> bool:
    try:
        meta = read_meta(out)
    except (FileNotFoundError, ValueError):
        return False
    if meta.get("recipe") != recipe:
        return False
    for name, digest in meta.get("sha256", {}).items():
        if not (out / name).is_file() or sha256_file(out / name) != digest:
            log.warning("%s: %s does not match its recorded hash; preparing again", out, name)
            return False
    return True


def _finish(out: Path, p: DataParams, index: Index, recipe: dict, extra: dict[str, Any]) -> None:
    write_index(out, index)
    files = [INDEX_FILE] + ([ARRAY_FILE] if extra.get("storage") == "array" else [])
    meta = {"format_version": FORMAT_VERSION, "dataset": p.name, "recipe": recipe, "counts": index.counts(),
            "num_images": len(index), "sha256": {f: sha256_file(out / f) for f in files}, **extra}
    write_meta(out, meta)  # last: its presence marks the folder complete


def _prepare_synthetic(out: Path, p: DataParams, recipe: dict) -> None:
    sp = p.synthetic
    t0 = time.perf_counter()
    # Generate straight into a memory-mapped .npy so that large configurations never sit in RAM twice.
    with atomic_path(out / ARRAY_FILE) as tmp:
        shape = (synthetic.num_images(sp), 3, sp.image_size, sp.image_size)
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        data = synthetic.generate(sp, out=arr)
        arr.flush()
        del arr
    seconds = time.perf_counter() - t0
    # Zero-shot protocol: the first half of the classes train, the second half test.
    splits = np.where(data.labels < sp.num_classes // 2, "train", "test").astype(object)
    index = carve_val(Index(np.arange(len(data.labels), dtype=np.int64), data.labels, splits, data.super_labels),
                      p.val_fraction)
    # No timing in meta.json: the folder must be byte-identical for the same params (DVC hashes it).
    _finish(out, p, index, recipe, {"storage": "array", "array": ARRAY_FILE, "image_size": sp.image_size})
    log.info("synthetic: generated %d images of %d classes in %.1f s", len(index), sp.num_classes, seconds)


def _check_images(index: Index, image_root: Path, p: DataParams, progress: bool) -> Index:
    """Every listed image must exist and have a readable header; with skip_corrupt the bad ones are dropped.

    Only the header is parsed (about 0.1 ms per file); an image whose pixel data is damaged is caught when it is
    decoded, by ImageDataset.
    """
    bad: list[tuple[str, str]] = []
    for rel in tqdm(index.items, desc=f"{p.name}: checking images", unit="img", disable=not progress, leave=False):
        path = image_root / rel
        try:
            with Image.open(path) as im:
                im.size  # header parsed
        except FileNotFoundError:
            bad.append((str(path), "missing"))
        except (OSError, ValueError, SyntaxError, UnidentifiedImageError) as err:
            bad.append((str(path), f"corrupt: {err}"))
    if not bad:
        return index
    listing = "; ".join(f"{f} ({why})" for f, why in bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
    if not p.skip_corrupt:
        raise ValueError(f"{len(bad)} of {len(index)} listed images cannot be read: {listing}. Restore them, or set "
                         f"data.skip_corrupt: true to leave them out")
    log.warning("skipped %d of %d listed images that cannot be read: %s", len(bad), len(index), listing)
    drop = {f for f, _ in bad}
    return index.select(np.array([str(image_root / rel) not in drop for rel in index.items]))


def _prepare_real(out: Path, p: DataParams, folder: Path, index: Index, recipe: dict, progress: bool) -> None:
    src = get_source(p.name)
    image_root = src.image_root(folder)
    index = carve_val(_check_images(index, image_root, p, progress), p.val_fraction)
    # A relative data.root is stored relative to the prepared folder, so the project can move as a whole; an
    # absolute one (a shared dataset folder) stays absolute.
    root_ref = str(image_root.resolve()) if Path(p.root).is_absolute() else os.path.relpath(image_root, out)
    _finish(out, p, index, recipe, {"storage": "files", "image_root": root_ref, "source_folder": str(folder)})
    log.info("%s: indexed %d images from %s", p.name, len(index), folder)


def prepare_dataset(p: DataParams, project_root: Path, progress: bool = True) -> Path:
    """Generate (synthetic), or find/download and parse (real datasets), into project_root/p.prepared/p.name."""
    project_root = Path(project_root)
    out = project_root / p.prepared / p.name
    if p.name == "synthetic":
        recipe = _recipe(p)
        if _is_prepared(out, recipe):
            log.info("synthetic: %s is up to date (verified)", out)
            return out
        out.mkdir(parents=True, exist_ok=True)
        _prepare_synthetic(out, p, recipe)
        return out
    src = get_source(p.name)
    folder = ensure_raw(src, project_root / p.root, p.download, progress)
    index, annotations = src.parse(folder, p)
    recipe = _recipe(p, annotations, src.image_root(folder).resolve())
    if _is_prepared(out, recipe):
        log.info("%s: %s is up to date (verified)", p.name, out)
        return out
    out.mkdir(parents=True, exist_ok=True)
    _prepare_real(out, p, folder, index, recipe, progress)
    return out


def open_splits(prepared_dir: Path, p: DataParams) -> Splits:
    """The splits of a prepared dataset: train with augmentation, the others with the test transform."""
    prepared_dir = Path(prepared_dir)
    meta = read_meta(prepared_dir)
    if meta["dataset"] != p.name:
        raise ValueError(f"{prepared_dir}: holds dataset {meta['dataset']!r}, but data.name is {p.name!r}")
    array_backed = meta["storage"] == "array"
    index = read_index(prepared_dir, array_backed)
    if array_backed:
        images = np.load(prepared_dir / meta["array"], mmap_mode="r")
        if len(images) != len(index) or index.items.max(initial=-1) >= len(images):
            raise ValueError(f"{prepared_dir}: {meta['array']} has {len(images)} images, the index lists "
                             f"{len(index)}; prepare it again")
    else:
        image_root = (prepared_dir / meta["image_root"]).resolve()
    sets: dict[str, ImageDataset] = {}
    for split in ("train", "val", "test", "query", "gallery"):
        m = index.splits == split
        if not m.any():
            continue
        sub = index.select(m)
        train = split == "train"
        if array_backed:
            sets[split] = ImageDataset.from_array(images, sub.items, sub.labels, p, train, split, sub.super_labels)
        else:
            sets[split] = ImageDataset.from_files([image_root / rel for rel in sub.items], sub.labels, p, train,
                                                  split, sub.super_labels)
    if "train" not in sets:
        raise ValueError(f"{prepared_dir}: the index has no train split")
    return Splits(name=p.name, meta=meta, **sets)
