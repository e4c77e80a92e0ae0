"""prepare_dataset: make data/prepared/<name>/ (index + meta, and the array for the embedded set or the
decoded-image cache for a real one); open_splits.

Idempotent: the meta file records the recipe the folder was made from (the parameters that shape its content,
and for real datasets the size and mtime of the annotation files and of every listed image). When the recipe
matches and the files hash to what the meta file says, nothing is redone. A rebuild deletes meta.json first, so
a build killed at any point leaves a folder that does not pass for complete.
"""
from __future__ import annotations

import csv
import hashlib
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import UnidentifiedImageError
from tqdm import tqdm

from xbmcore.config import DataParams
from xbmcore.hashing import file_digest
from xbmcore.data import layouts, synthetic
from xbmcore.data.cache import CACHE_DIR, PIXELS_FILE, SHAPES_FILE, ImageCache, build_cache
from xbmcore.data.decode import ImageTooLarge, open_image
from xbmcore.data.dataset import ImageDataset
from xbmcore.atomic import atomic_path
from xbmcore.data.index import (ARRAY_FILE, FORMAT_VERSION, INDEX_FILE, META_FILE, Index, carve_val,
                                read_index, read_meta, write_index, write_meta)
from xbmcore.data.sources import ensure_raw, get_source

log = logging.getLogger(__name__)

# The layouts of one's own images; data.root is the folder or the CSV file itself.
OWN_LAYOUTS = {"folder": layouts.parse_folder, "csv": layouts.parse_csv}
CLASSES_FILE = "classes.csv"  # label,name of the own layouts: results and the GUI can name the classes


@dataclass
class Splits:
    """The splits of one prepared dataset. Datasets evaluated query-vs-gallery (In-Shop) have test None.

    Attributes:
        train: the training split, with augmentation (what the trainer samples P x M batches from).
        val: the validation split (classes carved from training, data.val_fraction), test transform; None
            without one.
        test: the test split, searched in itself; None for query-vs-gallery datasets.
        query: the query set of a query-vs-gallery dataset, else None.
        gallery: the gallery set of a query-vs-gallery dataset, else None.
        pretrain: classes of their own for the pretrain stage (augmented like train), or None.
        name: the dataset's name (data.name).
        meta: the prepared folder's meta.json.
        class_names: the name of class id k (own layouts); None where ids are the dataset's own.
    """

    train: ImageDataset
    val: ImageDataset | None = None
    test: ImageDataset | None = None
    query: ImageDataset | None = None
    gallery: ImageDataset | None = None
    pretrain: ImageDataset | None = None  # classes of their own, for the pretrain stage (augmented like train)
    name: str = ""
    meta: dict[str, Any] = field(default_factory=dict, repr=False)
    class_names: list[str] | None = None  # name of class id k (own layouts), None where ids are the dataset's own


def params_recipe(p: DataParams) -> dict:
    """The part of a prepared dataset's recipe that the params alone decide: what a run's params must match.

    Args:
        p: the `data` section.

    Returns:
        The recipe's params part (format version, name, val fraction, and the keys that shape the dataset).
    """
    r: dict[str, Any] = {"format_version": FORMAT_VERSION, "name": p.name, "val_fraction": p.val_fraction}
    if p.name == "synthetic":
        r["synthetic"] = {**p.synthetic.model_dump(), "generator": synthetic.GENERATOR_VERSION}
        return r
    r["skip_corrupt"] = p.skip_corrupt
    r["max_pixels"] = p.max_pixels  # which images are refused
    if p.cache_size == "auto":
        raise ValueError("data.cache_size: auto, unresolved: the model's input settles it; load the params with "
                         "xbmcore.backbones.resolve_input(params) first (the pipeline does)")
    r["cache_size"] = p.cache_size
    if p.name == "vehicleid":
        r["vehicleid_test"] = p.vehicleid_test
    if p.name in OWN_LAYOUTS:
        r["test_fraction"], r["split_seed"] = p.test_fraction, p.split_seed
    return r


def _recipe(p: DataParams, annotations: list[Path] | None = None, image_root: Path | None = None,
            items: np.ndarray | None = None) -> dict:
    r = params_recipe(p)
    if p.name != "synthetic":
        r["image_root"] = str(image_root)
        r["annotations"] = [[str(a), a.stat().st_size, a.stat().st_mtime_ns] for a in annotations or []]
        r["images"] = _listing_digest(image_root, items)
    return r


def _listing_digest(image_root: Path, items: np.ndarray) -> str:
    """Hash of every listed image's path, size and mtime: an image replaced in place rebuilds the cache."""
    h = hashlib.sha256()
    for rel in items:
        try:
            st = os.stat(image_root / rel)
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{rel}\0missing\n".encode())
    return h.hexdigest()


def _is_prepared(out: Path, recipe: dict) -> bool:
    try:
        meta = read_meta(out)
    except (FileNotFoundError, ValueError):
        return False
    if meta.get("recipe") != recipe:
        return False
    for name, digest in meta.get("sha256", {}).items():
        if not (out / name).is_file() or file_digest(out / name) != digest:
            log.warning("%s: %s does not match its recorded hash; preparing again", out, name)
            return False
    # The cache's pixels (GBs) are checked by size and mtime; the table that describes them by its hash.
    for name, (size, mtime) in meta.get("stat", {}).items():
        st = (out / name).stat() if (out / name).is_file() else None
        if st is None or (st.st_size, st.st_mtime_ns) != (size, mtime):
            log.warning("%s: %s is not the file that was built; preparing again", out, name)
            return False
    return True


def _finish(out: Path, p: DataParams, index: Index, recipe: dict, extra: dict[str, Any], files: list[str],
            stat: list[str] = ()) -> None:
    write_index(out, index)
    meta = {"format_version": FORMAT_VERSION, "dataset": p.name, "recipe": recipe, "counts": index.counts(),
            "num_images": len(index), "sha256": {f: file_digest(out / f) for f in [INDEX_FILE, *files]}, **extra}
    if stat:
        meta["stat"] = {f: [(out / f).stat().st_size, (out / f).stat().st_mtime_ns] for f in stat}
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
    # Zero-shot protocol: the first half of the classes train, the second half test; the pretraining classes
    # come after both.
    splits = np.select([data.labels < sp.num_classes // 2, data.labels < sp.num_classes], ["train", "test"],
                       "pretrain").astype(object)
    index = carve_val(Index(np.arange(len(data.labels), dtype=np.int64), data.labels, splits, data.super_labels),
                      p.val_fraction)
    # No timing in meta.json: the folder must be byte-identical for the same params (DVC hashes it).
    _finish(out, p, index, recipe, {"storage": "array", "array": ARRAY_FILE, "image_size": sp.image_size},
            [ARRAY_FILE])
    log.info("synthetic: generated %d images of %d classes in %.1f s", len(index), sp.num_classes, seconds)


def _listing(bad: list[tuple[str, str]]) -> str:
    return "; ".join(f"{f} ({why})" for f, why in bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")


def _remedy(bad: list[tuple[str, str]]) -> str:
    larger = ", raise data.max_pixels to admit the large ones" if any("max_pixels" in why for _, why in bad) else ""
    return f"Restore them{larger}, or set data.skip_corrupt: true to leave them out"


def _check_images(index: Index, image_root: Path, p: DataParams, progress: bool) -> Index:
    """Every listed image must exist and have a readable header within data.max_pixels; with skip_corrupt the bad
    ones are dropped.

    Only the header is parsed (about 0.1 ms per file), so a missing file, a non-image or a decompression bomb
    stops preparation before the long decode; an image whose pixel data is damaged is caught when the cache is
    built.
    """
    bad: list[tuple[str, str]] = []
    for rel in tqdm(index.items, desc=f"{p.name}: checking images", unit="img", disable=not progress, leave=False):
        path = image_root / rel
        try:
            open_image(path, p.max_pixels).close()  # header parsed
        except FileNotFoundError:
            bad.append((str(path), "missing"))
        except ImageTooLarge as err:
            bad.append((str(path), f"too large: {err}"))
        except (OSError, ValueError, SyntaxError, UnidentifiedImageError) as err:
            bad.append((str(path), f"corrupt: {err}"))
    if not bad:
        return index
    listing = _listing(bad)
    if not p.skip_corrupt:
        raise ValueError(f"{len(bad)} of {len(index)} listed images cannot be read: {listing}. {_remedy(bad)}")
    log.warning("skipped %d of %d listed images that cannot be read: %s", len(bad), len(index), listing)
    drop = {f for f, _ in bad}
    return index.select(np.array([str(image_root / rel) not in drop for rel in index.items]))


def _drop_unretrievable(index: Index) -> Index:
    """Leave out the queries that can never be retrieved: a class with one image in a split searched against
    itself (val, test), and a query whose class has no gallery image."""
    keep = np.ones(len(index), dtype=bool)
    for split in ("val", "test"):
        m = index.splits == split
        classes, counts = np.unique(index.labels[m], return_counts=True)
        lone = m & np.isin(index.labels, classes[counts == 1])
        if lone.any():
            log.warning("%s: %d classes with a single image left out (as a query it can never be retrieved)",
                        split, int(lone.sum()))
        keep &= ~lone
    query = index.splits == "query"
    orphan = query & ~np.isin(index.labels, index.labels[index.splits == "gallery"])
    if orphan.any():
        log.warning("query: %d images of %d classes without a gallery image left out (they can never be retrieved)",
                    int(orphan.sum()), len(np.unique(index.labels[orphan])))
    index = index.select(keep & ~orphan)
    found = set(index.splits.tolist())
    if "test" not in found and not {"query", "gallery"} <= found:
        raise ValueError(f"no test images left: expected a test split, or query and gallery splits, whose classes "
                         f"have at least two images (splits now: {index.counts()})")
    return index


def _write_classes(out: Path, names: list[str]) -> None:
    with atomic_path(out / CLASSES_FILE) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(("label", "name"))
            w.writerows(enumerate(names))


def read_classes(folder: Path) -> list[str]:
    """The class names of a prepared own-layout dataset (its ``classes.csv``).

    Args:
        folder: the prepared dataset's folder.

    Returns:
        The name of class id k at position k.

    Raises:
        ValueError: a file without the header ``label,name`` or labels 0, 1, ... in order.
    """
    with open(folder / CLASSES_FILE, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0] != ["label", "name"] or [r[0] for r in rows[1:]] != [str(k) for k in range(len(rows) - 1)]:
        raise ValueError(f"{folder / CLASSES_FILE}: expected the header label,name and labels 0, 1, ...; prepare it "
                         f"again")
    return [r[1] for r in rows[1:]]


def _prepare_real(out: Path, p: DataParams, index: Index, image_root: Path, class_names: list[str] | None,
                  recipe: dict, progress: bool) -> None:
    t0 = time.perf_counter()
    index = _drop_unretrievable(_check_images(index, image_root, p, progress))
    failed = build_cache(out, [image_root / rel for rel in index.items], p.cache_size, p.cache_workers, progress,
                         p.max_pixels)
    if failed:
        bad = [(str(image_root / index.items[k]), f"cannot decode: {why}") for k, why in failed]
        if not p.skip_corrupt:
            shutil.rmtree(out / CACHE_DIR)  # incomplete; no meta.json marks it valid anyway
            raise ValueError(f"{len(bad)} of {len(index)} listed images cannot be decoded: {_listing(bad)}. "
                             f"{_remedy(bad)}")
        log.warning("skipped %d of %d listed images that cannot be decoded: %s", len(bad), len(index), _listing(bad))
        keep = np.ones(len(index), dtype=bool)
        keep[[k for k, _ in failed]] = False
        index = index.select(keep)
    files = [f"{CACHE_DIR}/{SHAPES_FILE}"]
    if class_names is not None:
        _write_classes(out, class_names)
        files.append(CLASSES_FILE)
    # A relative data.root is stored relative to the prepared folder, so the project can move as a whole; an
    # absolute one (a shared dataset folder) stays absolute.
    root_ref = str(image_root.resolve()) if Path(p.root).is_absolute() else os.path.relpath(image_root, out)
    cache_bytes = (out / CACHE_DIR / PIXELS_FILE).stat().st_size
    _finish(out, p, index, recipe, {"storage": "cache", "cache": CACHE_DIR, "cache_size": p.cache_size,
                                    "cache_bytes": cache_bytes, "image_root": root_ref},
            files, stat=[f"{CACHE_DIR}/{PIXELS_FILE}"])
    log.info("%s: %d images from %s decoded into a %.1f GB cache in %.0f s", p.name, len(index), image_root,
             cache_bytes / 1e9, time.perf_counter() - t0)


def prepare_dataset(p: DataParams, project_root: Path, progress: bool = True) -> Path:
    """Generate (synthetic), or find/download and parse (real datasets), into project_root/p.prepared/p.name.

    Idempotent: a folder whose meta.json records the same recipe and whose files hash to it is kept as it is.

    Args:
        p: the `data` section: the dataset, where it lies, its splits and sizes.
        project_root: the project's folder; `p.root` and `p.prepared` are relative to it (unless absolute).
        progress: show progress bars (downloads, checks, decoding).

    Returns:
        The prepared folder, ``project_root/p.prepared/p.name``.

    Raises:
        FileNotFoundError: a dataset that is not under data.root and cannot be downloaded (the message says how
            to get it).
        ConnectionError: a download that failed.
        ValueError: unreadable images (without data.skip_corrupt), a layout that does not parse, or splits left
            without test images.
    """
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
    class_names = None
    if p.name in OWN_LAYOUTS:
        own = OWN_LAYOUTS[p.name](project_root / p.root, p)
        index = layouts.split_by_class(own.index, own.given_split, p)
        image_root, annotations, class_names = own.image_root, own.annotations, own.class_names
    else:
        src = get_source(p.name)
        folder = ensure_raw(src, project_root / p.root, p.download, progress)
        index, annotations = src.parse(folder, p)
        image_root = src.image_root(folder)
        index = carve_val(index, p.val_fraction)
    recipe = _recipe(p, annotations, image_root.resolve(), index.items)
    if _is_prepared(out, recipe):
        log.info("%s: %s is up to date (verified)", p.name, out)
        return out
    out.mkdir(parents=True, exist_ok=True)
    (out / META_FILE).unlink(missing_ok=True)  # from here until the new one is written, the folder is incomplete
    _prepare_real(out, p, index, image_root, class_names, recipe, progress)
    return out


def open_splits(prepared_dir: Path, p: DataParams) -> Splits:
    """The splits of a prepared dataset: train with augmentation, the others with the test transform.

    Args:
        prepared_dir: the folder `prepare_dataset` returned.
        p: the `data` section (the dataset name must match; sizes and crop scale configure the transforms).

    Returns:
        The Splits; labels within each split are contiguous (0..C-1).

    Raises:
        FileNotFoundError: the folder is not prepared.
        ValueError: another dataset, a damaged folder (array, cache or index mismatch), a cache of another
            data.cache_size, or no train split.
    """
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
        cache = ImageCache(prepared_dir / meta["cache"])  # row k of the cache is row k of the index
        if len(cache) != len(index):
            raise ValueError(f"{prepared_dir}: the cache has {len(cache)} images, the index lists {len(index)}; "
                             f"prepare it again")
        if meta["cache_size"] != p.cache_size:
            raise ValueError(f"{prepared_dir}: the cache was built at data.cache_size {meta['cache_size']}, but "
                             f"data.cache_size is {p.cache_size}; prepare it again (python -m pipeline.download)")
    sets: dict[str, ImageDataset] = {}
    for split in ("train", "val", "test", "query", "gallery", "pretrain"):
        m = index.splits == split
        if not m.any():
            continue
        sub = index.select(m)
        train = split in ("train", "pretrain")
        if array_backed:
            sets[split] = ImageDataset.from_array(images, sub.items, sub.labels, p, train, split, sub.super_labels)
        else:
            sets[split] = ImageDataset.from_cache(cache, np.flatnonzero(m), sub.labels, p, train, split,
                                                  sub.super_labels)
    if "train" not in sets:
        raise ValueError(f"{prepared_dir}: the index has no train split")
    names = read_classes(prepared_dir) if (prepared_dir / CLASSES_FILE).is_file() else None
    return Splits(name=p.name, meta=meta, class_names=names, **sets)
