"""Parsers of the published layouts of the five real datasets, each into an Index of relative image paths.

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

import re
from pathlib import Path

import numpy as np

from xbmcore.config import DataParams
from xbmcore.data.index import Index

Rows = list[tuple[int, list[str]]]  # (line number, columns)


def read_columns(path: Path, names: tuple[str, ...], skip: int = 0, header: tuple[str, ...] | None = None) -> Rows:
    """Whitespace-separated table with exactly len(names) columns per non-blank line after `skip` lines.

    `header`, when given, is the expected first line after the skipped ones (compared case-insensitively).
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
    # The release has Img/img.zip; unpacked either in place (Img/img/...) or next to Eval/ (img/...).
    return folder / "Img" if (folder / "Img" / "img").is_dir() and not (folder / "img").is_dir() else folder


def parse_cub(folder: Path, p: DataParams) -> tuple[Index, list[Path]]:
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
