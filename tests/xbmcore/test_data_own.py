"""Datasets of one's own images: the `folder` and `csv` layouts, class-disjoint seeded splits, stable labels,
given splits, and every bad input named."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xbmcore.config import DataParams
from xbmcore.data import open_splits, prepare_dataset

from test_data_layouts import check_loads_its_own_file, colour, mean_colour as _mean

SIZES = dict(cache_size=32, train_size=32, test_resize=32, test_size=32, cache_workers=1)


def image(path: Path, class_id: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 32), colour(class_id)).save(path, quality=100)
    return path


def params(tmp_path: Path, name: str, root: Path, **kw) -> DataParams:
    return DataParams(name=name, root=str(root), prepared=str(tmp_path / "prepared"), **{**SIZES, **kw})


def class_folder(root: Path, classes: int, per_class: int = 3, names=None) -> list[str]:
    names = names or [f"class {c:02d}" for c in range(classes)]
    for c, name in enumerate(names):
        for i in range(per_class):
            image(root / name / f"img {i}.jpg", c)
    return names


def split_classes(s) -> dict[str, set[int]]:
    return {k: set(getattr(s, k).class_ids.tolist()) for k in ("train", "val", "test", "query", "gallery")
            if getattr(s, k) is not None}


def names_of(s, split: str) -> set[str]:
    return {s.class_names[c] for c in getattr(s, split).class_ids}


# --------------------------------------------------------------------------------------------------- folder

def test_folder_whole_classes_go_to_seeded_disjoint_splits(tmp_path):
    class_folder(tmp_path / "photos", 20)
    p = params(tmp_path, "folder", tmp_path / "photos", test_fraction=0.5, val_fraction=0.2, split_seed=1)
    s = open_splits(prepare_dataset(p, tmp_path, progress=False), p)
    got = split_classes(s)
    assert {k: len(v) for k, v in got.items()} == {"train": 8, "val": 2, "test": 10}
    assert not (got["train"] & got["test"]) and not (got["train"] & got["val"]) and not (got["val"] & got["test"])
    # Every image of a class lands in its class's split: 3 per class.
    assert (len(s.train), len(s.val), len(s.test)) == (24, 6, 30)
    # Labels: class names in sorted order, kept with the index.
    assert s.class_names == [f"class {c:02d}" for c in range(20)]
    check_loads_its_own_file(s.test)  # label k holds the images of the k-th folder
    check_loads_its_own_file(s.val)
    # Not a block in name order: the draw is random (seeded).
    assert sorted(got["test"]) != list(range(10)) and sorted(got["test"]) != list(range(10, 20))
    # Preparing again (also from scratch) gives the same labels and splits; another seed gives another split.
    p_fresh = params(tmp_path / "fresh", "folder", tmp_path / "photos", test_fraction=0.5, val_fraction=0.2,
                     split_seed=1)
    fresh = open_splits(prepare_dataset(p_fresh, tmp_path / "fresh", progress=False), p_fresh)
    assert split_classes(fresh) == got and fresh.class_names == s.class_names
    other = params(tmp_path, "folder", tmp_path / "photos", test_fraction=0.5, val_fraction=0.2, split_seed=2)
    assert split_classes(open_splits(prepare_dataset(other, tmp_path, progress=False), other))["test"] != got["test"]


def test_folder_with_given_splits_is_honoured(tmp_path):
    root = tmp_path / "photos"
    for split, classes in (("train", ["a", "b", "c", "d"]), ("query", ["x", "y"]), ("gallery", ["x", "y"])):
        for c in classes:
            for i in range(2):
                image(root / split / c / f"{i}.png", ord(c))
    p = params(tmp_path, "folder", root, val_fraction=0.25)
    s = open_splits(prepare_dataset(p, tmp_path, progress=False), p)
    assert s.test is None
    assert names_of(s, "query") == names_of(s, "gallery") == {"x", "y"}
    # A class in query and gallery has one label: the query's relevant items are found.
    assert set(s.query.class_ids) == set(s.gallery.class_ids)
    # The given train split keeps its classes; val is drawn from them (one of four), seeded.
    assert names_of(s, "train") | names_of(s, "val") == {"a", "b", "c", "d"} and len(names_of(s, "val")) == 1
    for split in ("query", "gallery", "train"):
        ds = getattr(s, split)
        for k in range(len(ds)):
            np.testing.assert_allclose(_mean(ds[k][0]), colour(ord(s.class_names[ds.class_ids[k]])), atol=3)


def test_folder_ignores_hidden_files_and_junk_and_names_what_is_not_an_image(tmp_path, caplog):
    root = tmp_path / "photos"
    class_folder(root, 4, names=sorted(["café au lait", "Ünïcødé", "日本", "plain"]))  # colour k: label k
    (root / "plain" / "Thumbs.db").write_bytes(b"\0" * 10)
    (root / "plain" / ".DS_Store").write_bytes(b"\0" * 10)
    (root / ".hidden_folder").mkdir()
    image(root / ".hidden_folder" / "x.jpg", 3)
    (root / "日本" / "notes.txt").write_text("not an image")
    (root / "README.md").write_text("loose file")
    p = params(tmp_path, "folder", root, test_fraction=0.5, val_fraction=0.0)
    with caplog.at_level(logging.WARNING):
        s = open_splits(prepare_dataset(p, tmp_path, progress=False), p)
    assert len(s.train) + len(s.test) == 12
    assert "2 files that are not images in class folders were ignored" in caplog.text
    assert "notes.txt" in caplog.text and "README.md" in caplog.text and "Thumbs.db" not in caplog.text
    assert sorted(s.class_names) == sorted(["café au lait", "Ünïcødé", "日本", "plain"])
    check_loads_its_own_file(s.test)


def test_folder_bad_layouts(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data.root .*nowhere: not a folder"):
        prepare_dataset(params(tmp_path, "folder", tmp_path / "nowhere"), tmp_path, progress=False)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"empty: no images found; expected <root>/<class>/<image>"):
        prepare_dataset(params(tmp_path, "folder", tmp_path / "empty"), tmp_path, progress=False)
    mixed = tmp_path / "mixed"
    image(mixed / "train" / "a" / "1.jpg", 1)
    image(mixed / "dogs" / "1.jpg", 2)
    with pytest.raises(ValueError, match=r"mixes split folders \(train\) with other folders \(dogs\)"):
        prepare_dataset(params(tmp_path, "folder", mixed), tmp_path, progress=False)
    class_folder(tmp_path / "few", 3)
    with pytest.raises(ValueError, match=r"data.test_fraction=0.5: 3 classes leave 1 for training"):
        prepare_dataset(params(tmp_path, "folder", tmp_path / "few", test_fraction=0.5), tmp_path, progress=False)


def test_unreadable_images_are_named_or_skipped_and_counted(tmp_path, caplog):
    root = tmp_path / "photos"
    class_folder(root, 4, per_class=3)
    (root / "class 01" / "fake.jpg").write_text("a text file with an image's name")
    truncated = root / "class 02" / "img 0.jpg"
    noisy = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(truncated, format="JPEG")
    data = truncated.read_bytes()
    truncated.write_bytes(data[:len(data) // 2])  # header intact: found only when decoded
    p = params(tmp_path, "folder", root, test_fraction=0.5, val_fraction=0.0)
    with pytest.raises(ValueError, match=r"1 of 13 listed images cannot be read: .*fake.jpg \(corrupt: cannot "
                                         r"identify image file"):
        prepare_dataset(p, tmp_path, progress=False)
    (root / "class 01" / "fake.jpg").unlink()
    with pytest.raises(ValueError, match=r"1 of 12 listed images cannot be decoded: .*img 0.jpg \(cannot decode: "
                                         r"OSError: image file is truncated"):
        prepare_dataset(p, tmp_path, progress=False)
    skip = params(tmp_path, "folder", root, test_fraction=0.5, val_fraction=0.0, skip_corrupt=True)
    with caplog.at_level(logging.WARNING):
        s = open_splits(prepare_dataset(skip, tmp_path, progress=False), skip)
    assert "skipped 1 of 12 listed images that cannot be decoded" in caplog.text
    assert len(s.train) + len(s.test) == 11


def test_a_class_with_one_image_in_a_searched_split_is_left_out_with_a_count(tmp_path, caplog):
    root = tmp_path / "photos"
    for split, counts in (("train", {"a": 2, "b": 2}), ("test", {"c": 2, "d": 1, "e": 3, "f": 1})):
        for c, n in counts.items():
            for i in range(n):
                image(root / split / c / f"{i}.jpg", ord(c))
    p = params(tmp_path, "folder", root, val_fraction=0.0)
    with caplog.at_level(logging.WARNING):
        s = open_splits(prepare_dataset(p, tmp_path, progress=False), p)
    assert "test: 2 classes with a single image left out (as a query it can never be retrieved)" in caplog.text
    assert names_of(s, "test") == {"c", "e"} and len(s.test) == 5


# ------------------------------------------------------------------------------------------------------ csv

def write_csv(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def csv_dataset(root: Path, split: bool = False) -> Path:
    rows = ["path,label" + (",split" if split else "")]
    labels = ["sku-17", "sku 3", "Ärmel", "42", "x/y"]
    for c, label in enumerate(labels):
        for i in range(3):
            rel = f"imgs/{c}/photo {i}.jpg"
            image(root / rel, c)
            part = "" if not split else (",train" if c < 3 else (",query" if i == 0 else ",gallery"))
            rows.append(f'{rel},"{label}"{part}')
    return write_csv(root / "labels.csv", rows)


def test_csv_labels_are_any_string_and_paths_relative_to_the_file(tmp_path):
    path = csv_dataset(tmp_path / "shop")
    p = params(tmp_path, "csv", path, test_fraction=0.4, val_fraction=0.0)
    s = open_splits(prepare_dataset(p, tmp_path, progress=False), p)
    assert s.class_names == sorted(["sku-17", "sku 3", "Ärmel", "42", "x/y"])
    assert len(split_classes(s)["test"]) == 2 and len(split_classes(s)["train"]) == 3
    # Each image carries the id of its own label (label j of the file was painted with colour j).
    written = ["sku-17", "sku 3", "Ärmel", "42", "x/y"]
    for ds in (s.train.without_augmentation(), s.test):
        for i in range(len(ds)):
            np.testing.assert_allclose(_mean(ds[i][0]), colour(written.index(s.class_names[ds.class_ids[i]])), atol=3)


def test_csv_split_column_is_honoured(tmp_path):
    path = csv_dataset(tmp_path / "shop", split=True)
    p = params(tmp_path, "csv", path, val_fraction=0.0)
    s = open_splits(prepare_dataset(p, tmp_path, progress=False), p)
    assert names_of(s, "train") == {"sku-17", "sku 3", "Ärmel"}
    assert names_of(s, "query") == names_of(s, "gallery") == {"42", "x/y"}
    assert (len(s.query), len(s.gallery)) == (2, 4) and s.test is None


@pytest.mark.parametrize("line, message", [
    ("imgs/0/photo 0.jpg,sku-17,extra", r"labels.csv:5: expected 2 columns \(path,label\), got 3"),
    ("imgs/0/photo 0.jpg,", r"labels.csv:5: empty label"),
    (",sku-17", r"labels.csv:5: empty path"),
    ("imgs/0/./photo 1.jpg,sku-17", r"labels.csv:5: duplicate path 'imgs/0/./photo 1.jpg' \(first on line 3\)"),
])
def test_csv_bad_rows_name_file_and_line(tmp_path, line, message):
    path = csv_dataset(tmp_path / "shop")
    lines = path.read_text(encoding="utf-8").splitlines()
    write_csv(path, lines[:4] + [line] + lines[4:])
    with pytest.raises(ValueError, match=message):
        prepare_dataset(params(tmp_path, "csv", path), tmp_path, progress=False)


def test_csv_bad_header_split_and_missing_file(tmp_path, caplog):
    path = csv_dataset(tmp_path / "shop", split=True)
    lines = path.read_text(encoding="utf-8").splitlines()
    write_csv(path, ["file,class"] + lines[1:])
    with pytest.raises(ValueError, match=r"labels.csv:1: expected the header path,label or path,label,split, got"):
        prepare_dataset(params(tmp_path, "csv", path), tmp_path, progress=False)
    write_csv(path, lines[:3] + [lines[3].replace(",train", ",validation")] + lines[4:])
    with pytest.raises(ValueError, match=r"labels.csv:4: unknown split 'validation'; expected one of train, val, "
                                         r"test, query, gallery"):
        prepare_dataset(params(tmp_path, "csv", path), tmp_path, progress=False)
    write_csv(path, lines + ["imgs/9/gone.jpg,sku-17,train"])
    with pytest.raises(ValueError, match=r"1 of 16 listed images cannot be read: .*gone.jpg \(missing\)"):
        prepare_dataset(params(tmp_path, "csv", path, val_fraction=0.0), tmp_path, progress=False)
    p = params(tmp_path, "csv", path, val_fraction=0.0, skip_corrupt=True)
    with caplog.at_level(logging.WARNING):
        s = open_splits(prepare_dataset(p, tmp_path, progress=False), p)
    assert "skipped 1 of 16 listed images that cannot be read" in caplog.text and len(s.train) == 9
    with pytest.raises(FileNotFoundError, match=r"data.root .*missing.csv: not a file"):
        prepare_dataset(params(tmp_path, "csv", tmp_path / "missing.csv"), tmp_path, progress=False)
    write_csv(path, ["path,label"])
    with pytest.raises(ValueError, match=r"labels.csv: no rows after the header"):
        prepare_dataset(params(tmp_path, "csv", path), tmp_path, progress=False)
