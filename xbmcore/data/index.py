"""The normalised index: one format for every dataset, read by every later stage.

A prepared dataset is a folder (data/prepared/<name>/) holding

  index.csv   one row per image, header `item,label,split,super_label`:
                item         the image: a path relative to the image root (file-backed datasets) or a row of
                             images.npy (array-backed, the embedded benchmark)
                label        the dataset's own class id (an integer; datasets with string ids are mapped in
                             sorted order). Splits relabel to 0..C-1 when opened.
                split        train | val | test | query | gallery
                super_label  the super-class id, -1 where the dataset has none
  images.npy  (array-backed only) N x 3 x H x W uint8, memory-mappable
  meta.json   written last, so its presence means the folder is complete: format version, dataset name,
              storage ("array" | "files"), the image root or array file, the recipe (the parameters and source
              files the content was made from), per-split counts and sha256 of the files above.

Every file is written to a temporary name in the same folder and renamed into place (os.replace), so a killed
run never leaves a half-written file under the final name (xbmcore.atomic).
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xbmcore.atomic import atomic_path

FORMAT_VERSION = 1
INDEX_FILE = "index.csv"
META_FILE = "meta.json"
ARRAY_FILE = "images.npy"
# pretrain: classes kept apart from the others for the pretrain stage (the synthetic set's pretrain_classes).
SPLITS = ("train", "val", "test", "query", "gallery", "pretrain")
COLUMNS = ("item", "label", "split", "super_label")


@dataclass
class Index:
    """The rows of index.csv as arrays (all of length N).

    Attributes:
        items: object array of str (image paths relative to the image root) or int64 array (rows of
            images.npy).
        labels: int64 class ids of the source dataset.
        splits: object array of split names (train, val, test, query, gallery, pretrain).
        super_labels: int64 super-class ids, -1 = none.
    """

    items: np.ndarray  # object array of str (paths) or int64 array (rows of images.npy)
    labels: np.ndarray  # int64 class ids of the source dataset
    splits: np.ndarray  # object array of split names
    super_labels: np.ndarray  # int64, -1 = none

    def __post_init__(self) -> None:
        n = len(self.items)
        for name in ("labels", "splits", "super_labels"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"Index.{name}: expected {n} entries like items, got {len(getattr(self, name))}")
        bad = sorted(set(np.unique(self.splits).tolist()) - set(SPLITS))
        if bad:
            raise ValueError(f"Index.splits: expected names in {SPLITS}, got {bad}")

    def __len__(self) -> int:
        return len(self.items)

    def select(self, mask: np.ndarray) -> "Index":
        """The rows where `mask` holds.

        Args:
            mask: N bools (or an index array).

        Returns:
            A new Index of those rows.
        """
        return Index(self.items[mask], self.labels[mask], self.splits[mask], self.super_labels[mask])

    def counts(self) -> dict[str, dict[str, int]]:
        """Images and classes per split present.

        Returns:
            ``{split: {"images": n, "classes": c}}`` for each split with images.
        """
        out = {}
        for s in SPLITS:
            m = self.splits == s
            if m.any():
                out[s] = {"images": int(m.sum()), "classes": int(len(np.unique(self.labels[m])))}
        return out


def carve_val(index: Index, val_fraction: float) -> Index:
    """Move the last `val_fraction` of the training classes (in class-id order) to a `val` split.

    Class-id order, not a random draw: the datasets order classes so that neighbours are related (SOP and the
    embedded set by super-class, CUB by taxonomy), so a contiguous block gives a validation set with the same
    look-alike classes as the test set, and with classes disjoint from training, as in the zero-shot protocol.

    Args:
        index: the index with train (and test) splits.
        val_fraction: the fraction of training classes moved (at least one class); 0 or less: none.

    Returns:
        A new Index with the val split.

    Raises:
        ValueError: fewer than 2 training classes would be left.
    """
    if val_fraction <= 0:
        return index
    train = index.splits == "train"
    classes = np.unique(index.labels[train])
    n_val = max(1, int(round(val_fraction * len(classes))))
    if len(classes) - n_val < 2:
        raise ValueError(
            f"data.val_fraction={val_fraction}: the training split has {len(classes)} classes, which leaves "
            f"{len(classes) - n_val} for training after carving {n_val} for validation; expected at least 2"
        )
    val = train & np.isin(index.labels, classes[-n_val:])
    splits = index.splits.copy()
    splits[val] = "val"
    return Index(index.items, index.labels, splits, index.super_labels)


# ---------------------------------------------------------------------------------------------------- writing

def write_index(folder: Path, index: Index) -> None:
    """Write ``folder/index.csv`` atomically.

    Args:
        folder: the prepared dataset's folder.
        index: its rows.
    """
    with atomic_path(folder / INDEX_FILE) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(COLUMNS)
            w.writerows(zip(index.items.tolist(), index.labels.tolist(), index.splits.tolist(),
                            index.super_labels.tolist()))


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    """Write ``folder/meta.json`` atomically: last, as its presence marks the folder complete.

    Args:
        folder: the prepared dataset's folder.
        meta: JSON-serialisable metadata (format version, dataset, recipe, counts, hashes, storage).
    """
    with atomic_path(folder / META_FILE) as tmp:
        tmp.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------------- reading

def read_meta(folder: Path) -> dict[str, Any]:
    """Read ``folder/meta.json``.

    Args:
        folder: the prepared dataset's folder.

    Returns:
        The metadata.

    Raises:
        FileNotFoundError: the dataset is not prepared.
        ValueError: invalid JSON, or another format version.
    """
    path = folder / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: not found; the dataset is not prepared (run `python -m pipeline.download`)") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); delete the folder and prepare it again") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}; prepare it again")
    return meta


def read_index(folder: Path, array_backed: bool) -> Index:
    """Read ``folder/index.csv``.

    Args:
        folder: the prepared dataset's folder.
        array_backed: items are rows of images.npy (int64) rather than paths.

    Returns:
        The Index.

    Raises:
        ValueError: a wrong header, a row with the wrong number of columns, or a non-integer where an integer
            belongs.
    """
    path = folder / INDEX_FILE
    items, labels, splits, supers = [], [], [], []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(header) != COLUMNS:
            raise ValueError(f"{path}:1: expected header {','.join(COLUMNS)}, got {header!r}")
        for lineno, row in enumerate(reader, start=2):
            if len(row) != len(COLUMNS):
                raise ValueError(f"{path}:{lineno}: expected {len(COLUMNS)} columns {COLUMNS}, got {len(row)}: {row}")
            items.append(row[0])
            labels.append(row[1])
            splits.append(row[2])
            supers.append(row[3])
    try:
        items_arr = np.array(items, dtype=np.int64) if array_backed else np.array(items, dtype=object)
        return Index(items_arr, np.array(labels, dtype=np.int64), np.array(splits, dtype=object),
                     np.array(supers, dtype=np.int64))
    except ValueError as err:
        raise ValueError(f"{path}: a column that must hold integers does not ({err})") from None
