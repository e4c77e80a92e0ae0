"""Parsers of the published layouts of the five real datasets, and of the two layouts of one's own images (folder,
csv, at the end), each into an Index of relative image paths.

Every parser returns (index, annotation files) with the splits of the dataset's standard retrieval protocol:

  sop        Ebay_train.txt / Ebay_test.txt: 11,318 training and 11,316 test classes (products), 12 super-classes
  inshop     list_eval_partition.txt: train / query / gallery (items of clothing); super-class = gender/category
  cub        images.txt + image_class_labels.txt: classes 1-100 train, 101-200 test
  cars       cars_annos.mat: classes 1-98 train, 99-196 test
  vehicleid  train_list.txt and test_list_{800,1600,2400}.txt (data.vehicleid_test picks one); as in the XBM
             paper's retrieval protocol the test list is one set searched against itself (query = gallery, self
             excluded), so it lands in `test`; super-class = vehicle model where attribute/model_attr.txt has it

A line with the wrong number of columns or a non-integer where an integer belongs raises ValueError naming the
file and line.
"""
from __future__ import annotations

import csv
import logging
import os
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xbmcore.config import DataParams
from xbmcore.data.index import Index

log = logging.getLogger(__name__)

Rows = list[tuple[int, list[str]]]  # (line number, columns)


def read_columns(path: Path, names: tuple[str, ...], skip: int = 0, header: tuple[str, ...] | None = None) -> Rows:
    """Whitespace-separated table with exactly len(names) columns per non-blank line after `skip` lines.

    `header`, when given, is the expected first line after the skipped ones (compared case-insensitively).

    Args:
        path: the text file.
        names: the columns' names (for messages; their number is the expected column count).
        skip: lines skipped first.
        header: the expected header line's words, lower case; None: no header.

    Returns:
        ``[(line number, columns), ...]`` of the non-blank lines.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a wrong header, a line with another column count, or no rows.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    rows: Rows = []
    with open(path, encoding="utf-8") as f:
        lines = enumerate(f, start=1)
        for _ in range(skip):
            next(lines, None)
        if header is not None:
            lineno, line = next(lines, (skip + 1, ""))
            if tuple(line.lower().split()) != header:
                raise ValueError(f"{path}:{lineno}: expected the header {' '.join(header)!r}, got {line.strip()!r}")
        for lineno, line in lines:
            cols = line.split()
            if not cols:
                continue
            if len(cols) != len(names):
                raise ValueError(
                    f"{path}:{lineno}: expected {len(names)} columns ({' '.join(names)}), got {len(cols)}: "
                    f"{line.strip()!r}")
            rows.append((lineno, cols))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def _int(path: Path, lineno: int, name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{path}:{lineno}: column {name!r} must be an integer, got {value!r}") from None


def _index(items: list[str], labels: list[int], splits: list[str], supers: list[int] | None = None) -> Index:
    return Index(np.array(items, dtype=object), np.array(labels, dtype=np.int64), np.array(splits, dtype=object),
                 np.array(supers if supers is not None else [-1] * len(items), dtype=np.int64))


# ------------------------------------------------------------------------------------------------- datasets

def parse_sop(folder: Path, p: DataParams) -> tuple[Index, list[Path]]:
    """Stanford Online Products: Ebay_train.txt and Ebay_test.txt.

    Args:
        folder: the dataset's folder (Stanford_Online_Products).
        p: the `data` section (unused here; every parser takes it).

    Returns:
        ``(index, annotation files)``: train and test splits, super-class = product category.
    """
    items, labels, splits, supers = [], [], [], []
    files = [folder / "Ebay_train.txt", folder / "Ebay_test.txt"]
    for split, path in zip(("train", "test"), files):
        names = ("image_id", "class_id", "super_class_id", "path")
        for lineno, (_, cls, sup, rel) in read_columns(path, names, header=names):
            items.append(rel)
            labels.append(_int(path, lineno, "class_id", cls))
            supers.append(_int(path, lineno, "super_class_id", sup))
            splits.append(split)
    return _index(items, labels, splits, supers), files


def parse_inshop(folder: Path, p: DataParams) -> tuple[Index, list[Path]]:
    """In-Shop: Eval/list_eval_partition.txt.

    Args:
        folder: the dataset's folder (InShop).
        p: the `data` section (unused here).

    Returns:
        ``(index, annotation files)``: train, query and gallery splits; super-class = gender/category.
    """
    path = folder / "Eval" / "list_eval_partition.txt"
    # Line 1: the number of images; line 2: the header.
    rows = read_columns(path, ("image_name", "item_id", "evaluation_status"), skip=1,
                        header=("image_name", "item_id", "evaluation_status"))
    with open(path, encoding="utf-8") as f:
        declared = f.readline().strip()
    if declared.isdigit() and int(declared) != len(rows):
        raise ValueError(f"{path}:1: declares {declared} images, but {len(rows)} rows follow")
    items, labels, splits, cats = [], [], [], []
    for lineno, (rel, item_id, status) in rows:
        m = re.fullmatch(r"id_(\d+)", item_id)
        if m is None:
            raise ValueError(f"{path}:{lineno}: item_id must look like id_00000001, got {item_id!r}")
        if status not in ("train", "query", "gallery"):
            raise ValueError(f"{path}:{lineno}: evaluation_status must be train, query or gallery, got {status!r}")
        items.append(rel)
        labels.append(int(m.group(1)))
        splits.append(status)
        parts = rel.split("/")  # img/WOMEN/Dresses/id_00000002/02_1_front.jpg -> WOMEN/Dresses
        cats.append("/".join(parts[1:3]) if len(parts) >= 5 else "")
    cat_ids = {c: k for k, c in enumerate(sorted(set(cats) - {""}))}
    return _index(items, labels, splits, [cat_ids.get(c, -1) for c in cats]), [path]


def inshop_image_root(folder: Path) -> Path:
    """Where In-Shop's image paths (``img/...``) start.

    Args:
        folder: the dataset's folder.

    Returns:
        ``folder/Img`` when img.zip was unpacked in place (Img/img/...), else `folder`.
    """
    # The release has Img/img.zip; unpacked either in place (Img/img/...) or next to Eval/ (img/...).
    return folder / "Img" if (folder / "Img" / "img").is_dir() and not (folder / "img").is_dir() else folder


def parse_cub(folder: Path, p: DataParams) -> tuple[Index, list[Path]]:
    """CUB-200-2011: images.txt and image_class_labels.txt.

    Args:
        folder: the dataset's folder (CUB_200_2011).
        p: the `data` section (unused here).

    Returns:
        ``(index, annotation files)``: classes 1-100 train, 101-200 test.
    """
    images_txt, labels_txt = folder / "images.txt", folder / "image_class_labels.txt"
    paths = {}
    for lineno, (image_id, rel) in read_columns(images_txt, ("image_id", "path")):
        paths[_int(images_txt, lineno, "image_id", image_id)] = "images/" + rel
    items, labels, splits = [], [], []
    for lineno, (image_id, cls) in read_columns(labels_txt, ("image_id", "class_id")):
        iid, c = _int(labels_txt, lineno, "image_id", image_id), _int(labels_txt, lineno, "class_id", cls)
        if iid not in paths:
            raise ValueError(f"{labels_txt}:{lineno}: image_id {iid} is not in {images_txt.name}")
        if not 1 <= c <= 200:
            raise ValueError(f"{labels_txt}:{lineno}: class_id must be in 1..200, got {c}")
        items.append(paths[iid])
        labels.append(c)
        splits.append("train" if c <= 100 else "test")
    return _index(items, labels, splits), [images_txt, labels_txt]


def parse_cars(folder: Path, p: DataParams) -> tuple[Index, list[Path]]:
    """Cars196: cars_annos.mat (read with scipy).

    Args:
        folder: the dataset's folder (cars196).
        p: the `data` section (unused here).

    Returns:
        ``(index, annotation files)``: classes 1-98 train, 99-196 test.

    Raises:
        FileNotFoundError: no cars_annos.mat.
        ValueError: an unreadable file, or annotations without the expected fields or classes.
    """
    import scipy.io  # only this dataset needs it

    path = folder / "cars_annos.mat"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    try:
        mat = scipy.io.loadmat(path, squeeze_me=True)
    except Exception as err:  # scipy raises several types for a damaged file
        raise ValueError(f"{path}: cannot read the MATLAB file ({type(err).__name__}: {err})") from None
    if "annotations" not in mat:
        raise ValueError(f"{path}: expected a variable 'annotations', got {sorted(k for k in mat if k[0] != '_')}")
    annos = np.atleast_1d(mat["annotations"])
    missing = {"relative_im_path", "class"} - set(annos.dtype.names or ())
    if missing:
        raise ValueError(f"{path}: annotations lack the fields {sorted(missing)}")
    items, labels, splits = [], [], []
    for k, a in enumerate(annos):
        c = int(a["class"])
        if not 1 <= c <= 196:
            raise ValueError(f"{path}: annotation {k + 1}: class must be in 1..196, got {c}")
        items.append(str(a["relative_im_path"]))
        labels.append(c)
        splits.append("train" if c <= 98 else "test")
    return _index(items, labels, splits), [path]


def parse_vehicleid(folder: Path, p: DataParams) -> tuple[Index, list[Path]]:
    """VehicleID: train_list.txt and the test list data.vehicleid_test picks.

    Args:
        folder: the dataset's folder (VehicleID_V1.0).
        p: the `data` section: `vehicleid_test` (800, 1600 or 2400).

    Returns:
        ``(index, annotation files)``: train and test splits; super-class = vehicle model where
            attribute/model_attr.txt has it.
    """
    split_dir = folder / "train_test_split"
    train_txt, test_txt = split_dir / "train_list.txt", split_dir / f"test_list_{p.vehicleid_test}.txt"
    items, labels, splits = [], [], []
    for split, path in (("train", train_txt), ("test", test_txt)):
        for lineno, (name, vid) in read_columns(path, ("image_name", "vehicle_id")):
            items.append(f"image/{name}.jpg")
            labels.append(_int(path, lineno, "vehicle_id", vid))
            splits.append(split)
    files = [train_txt, test_txt]
    model = {}
    model_txt = folder / "attribute" / "model_attr.txt"
    if model_txt.is_file():
        for lineno, (vid, mid) in read_columns(model_txt, ("vehicle_id", "model_id")):
            model[_int(model_txt, lineno, "vehicle_id", vid)] = _int(model_txt, lineno, "model_id", mid)
        files.append(model_txt)
    return _index(items, labels, splits, [model.get(v, -1) for v in labels]), files


# ---------------------------------------------------------------------------------------------- own images
#
#   folder  <root>/<class>/<image> (images anywhere below the class folder), or <root>/train/<class>/... and
#           <root>/test/<class>/... (also val/, query/, gallery/) when the split is given
#   csv     a file with the header path,label (optionally split); paths relative to the file, labels any string
#
# Class names map to labels in sorted order (code points), the same on every machine and every preparation; the
# names are returned so that the prepared folder keeps them. Without a given split, splits are drawn per class
# (split_by_class).

# Names that file managers leave among images: ignored without a word (like hidden files).
JUNK_FILES = frozenset({"thumbs.db", "desktop.ini", "ehthumbs.db", "icon\r"})
SPLIT_NAMES = ("train", "val", "test", "query", "gallery")


def image_extensions() -> frozenset[str]:
    """File extensions PIL can open (.jpg, .png, .webp, .tif, ...), lower case.

    Returns:
        The extensions, with their dot.
    """
    from PIL import Image

    Image.init()
    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


@dataclass
class OwnLayout:
    """One's own images, parsed (`parse_folder`, `parse_csv`).

    Attributes:
        index: the images; labels index `class_names`; splits all "train" where the layout gives none.
        class_names: the class names in sorted order (code points): label k is class_names[k].
        image_root: the folder the index's paths are relative to.
        annotations: the files the index was read from (the CSV), for the recipe.
        given_split: whether the layout gives the splits (split folders, or a split column).
    """

    index: Index  # labels index `class_names`; splits all "train" where the layout gives none
    class_names: list[str]
    image_root: Path
    annotations: list[Path]  # files the index was read from (the CSV), for the recipe
    given_split: bool


def _labelled(items: list[str], names: list[str], splits: list[str], image_root: Path, annotations: list[Path],
              given: bool) -> OwnLayout:
    class_names = sorted(set(names))
    label = {n: k for k, n in enumerate(class_names)}
    return OwnLayout(_index(items, [label[n] for n in names], splits or ["train"] * len(items)), class_names,
                     image_root, annotations, given)


def _scan(folder: Path, root: Path, exts: frozenset[str], ignored: list[str]) -> list[str]:
    """Image paths under `folder`, relative to `root`, sorted; other files are appended to `ignored`."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if f.startswith(".") or f.lower() in JUNK_FILES:
                continue
            path = Path(dirpath) / f
            if path.suffix.lower() in exts:
                out.append(path.relative_to(root).as_posix())
            else:
                ignored.append(str(path))
    return out


def _subfolders(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def parse_folder(root: Path, p: DataParams) -> OwnLayout:
    """A folder of class folders, ``<root>/<class>/<image>``, or of split folders, ``<root>/<split>/<class>/...``.

    Images may lie anywhere below their class folder; other files are ignored with a warning.

    Args:
        root: the image folder (data.root).
        p: the `data` section (unused here).

    Returns:
        The parsed layout.

    Raises:
        FileNotFoundError: `root` is not a folder.
        ValueError: split folders mixed with class folders, split folders without train/, or no images.
    """
    if not root.is_dir():
        raise FileNotFoundError(f"data.root {root}: not a folder; expected <root>/<class>/<image> (data.name: folder)")
    exts = image_extensions()
    tops = _subfolders(root)
    split_dirs = [d for d in tops if d.name in SPLIT_NAMES]
    given = bool(split_dirs)
    if given and len(split_dirs) != len(tops):
        raise ValueError(
            f"{root}: mixes split folders ({', '.join(d.name for d in split_dirs)}) with other folders "
            f"({', '.join(d.name for d in tops if d.name not in SPLIT_NAMES)}); expected either <root>/<class>/ or "
            f"<root>/<split>/<class>/ with splits among {', '.join(SPLIT_NAMES)}")
    if given and "train" not in {d.name for d in split_dirs}:
        raise ValueError(f"{root}: has split folders ({', '.join(d.name for d in split_dirs)}) but no train/")
    ignored: list[str] = []
    items, names, splits = [], [], []
    for split_dir in split_dirs if given else [root]:
        loose = [f for f in split_dir.iterdir() if f.is_file() and not f.name.startswith(".")
                 and f.name.lower() not in JUNK_FILES]
        ignored += [str(f) for f in sorted(loose)]  # not in a class folder: no class
        for cls in _subfolders(split_dir):
            found = _scan(cls, root, exts, ignored)
            if not found:
                log.warning("%s: no images; the class is left out", cls)
            items += found
            names += [cls.name] * len(found)
            splits += [split_dir.name if given else ""] * len(found)
    if ignored:
        log.warning("%s: %d files that are not images in class folders were ignored: %s%s", root, len(ignored),
                    ", ".join(ignored[:5]), ", ..." if len(ignored) > 5 else "")
    if not items:
        raise ValueError(f"{root}: no images found; expected <root>/<class>/<image> (extensions "
                         f"{', '.join(sorted(e for e in exts if e in ('.jpg', '.jpeg', '.png', '.webp')))}, ...)")
    return _labelled(items, names, splits if given else [], root, [], given)


def parse_csv(path: Path, p: DataParams) -> OwnLayout:
    """A CSV file with the header ``path,label`` (optionally ``split``); paths relative to the file.

    Args:
        path: the CSV file (data.root); UTF-8, a spreadsheet's BOM allowed.
        p: the `data` section (unused here).

    Returns:
        The parsed layout; labels are any strings.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a wrong header, a row with another column count, an empty path or label, a duplicate path,
            an unknown split, no rows, or a split column without train images.
    """
    if not path.is_file():
        raise FileNotFoundError(f"data.root {path}: not a file; expected a CSV file with the header path,label "
                                f"(optionally split) (data.name: csv)")
    items, names, splits = [], [], []
    seen: dict[str, int] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheet exports start with a BOM
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        if header not in (["path", "label"], ["path", "label", "split"]):
            raise ValueError(f"{path}:1: expected the header path,label or path,label,split, got {','.join(header)!r}")
        for row in reader:
            lineno = reader.line_num
            if not row or not any(c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise ValueError(f"{path}:{lineno}: expected {len(header)} columns ({','.join(header)}), got "
                                 f"{len(row)}: {row}")
            rel, label = row[0].strip(), row[1].strip()
            if not rel or not label:
                raise ValueError(f"{path}:{lineno}: empty {'path' if not rel else 'label'}")
            key = posixpath.normpath(rel.replace("\\", "/"))
            if key in seen:
                raise ValueError(f"{path}:{lineno}: duplicate path {rel!r} (first on line {seen[key]})")
            seen[key] = lineno
            if len(header) == 3:
                split = row[2].strip()
                if split not in SPLIT_NAMES:
                    raise ValueError(f"{path}:{lineno}: unknown split {split!r}; expected one of "
                                     f"{', '.join(SPLIT_NAMES)}")
                splits.append(split)
            items.append(key)
            names.append(label)
    if not items:
        raise ValueError(f"{path}: no rows after the header")
    if splits and "train" not in splits:
        raise ValueError(f"{path}: the split column names no train image")
    return _labelled(items, names, splits, path.parent, [path], bool(splits))


def _draw_classes(classes: np.ndarray, fraction: float, rng: np.random.Generator, what: str, key: str) -> np.ndarray:
    n = int(round(fraction * len(classes)))
    n = max(1, n)
    if len(classes) - n < 2:
        raise ValueError(f"data.{key}={fraction}: {len(classes)} classes leave {len(classes) - n} for training "
                         f"after {n} for {what}; expected at least 2 (add classes or lower data.{key})")
    return rng.permutation(classes)[:n]


def split_by_class(index: Index, given: bool, p: DataParams) -> Index:
    """Whole classes to train / val / test, drawn with data.split_seed: without a given split data.test_fraction of
    the classes go to test; then data.val_fraction of the training classes go to val (also with a given split
    that has no val).

    Args:
        index: the parsed images (splits "train", or the layout's own).
        given: whether the layout gave the splits.
        p: the `data` section: test_fraction, val_fraction, split_seed.

    Returns:
        A new Index with the splits.

    Raises:
        ValueError: fewer than 2 training classes would be left.
    """
    rng = np.random.default_rng(p.split_seed)
    splits = index.splits.copy()
    if not given:
        splits[:] = "train"
        test = _draw_classes(np.unique(index.labels), p.test_fraction, rng, "testing", "test_fraction")
        splits[np.isin(index.labels, test)] = "test"
    if p.val_fraction > 0 and not (splits == "val").any():
        train = splits == "train"
        val = _draw_classes(np.unique(index.labels[train]), p.val_fraction, rng, "validation", "val_fraction")
        splits[train & np.isin(index.labels, val)] = "val"
    return Index(index.items, index.labels, splits, index.super_labels)
