"""The download stage: params file in, prepared dataset and a summary out; bad input -> message and exit status."""
from __future__ import annotations

import re

import numpy as np
import yaml

from pipeline.download import main

TINY = {"data": {"synthetic": {"num_classes": 24, "classes_per_superclass": 4, "image_size": 16},
                 "train_size": 16, "test_resize": 16, "test_size": 16, "val_fraction": 0.25}}


def test_stage_prepares_and_then_verifies(tmp_path, capsys):
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(TINY))
    assert main(["--params", str(tmp_path / "p.yaml")]) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "data" / "prepared" / "synthetic"  # relative to the params file's folder
    assert f"synthetic: prepared in {folder}" in out
    # 24 classes: 12 train (3 of them carved for validation), 12 test.
    # The split table's rows only: MLflow may print its own lines (a run's link) when a tracking server is set.
    rows = {m[1]: (int(m[2]), int(m[3])) for m in re.finditer(r"^\s+(\w+)\s+(\d+) images\s+(\d+) classes$", out, re.M)}
    assert {k: classes for k, (_, classes) in rows.items()} == {"train": 9, "val": 3, "test": 12}
    assert sum(n for n, _ in rows.values()) == len(np.load(folder / "images.npy", mmap_mode="r"))
    stamp = (folder / "images.npy").stat().st_mtime_ns
    assert main(["--params", str(tmp_path / "p.yaml"), "-S", "data.download=false"]) == 0
    assert (folder / "images.npy").stat().st_mtime_ns == stamp  # verified, not regenerated


def test_stage_reports_bad_params_and_missing_data(tmp_path, capsys):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"data": {"name": "imagenet"}}))
    assert main(["--params", str(tmp_path / "params.yaml")]) == 2
    assert "data.name: Input should be 'synthetic', 'sop'" in capsys.readouterr().err
    assert main(["--params", str(tmp_path / "params.yaml"), "-S", "data.name=vehicleid"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("download failed: PKU VehicleID: not found under") and "pkuml.org" in err


def test_stage_builds_the_cache_of_a_folder_and_names_a_bad_csv_line(tmp_path, capsys):
    from bench.data_real import make_folder_dataset

    make_folder_dataset(tmp_path / "photos", classes=4, per_class=3, size=(40, 30))
    sizes = {"cache_size": 24, "train_size": 16, "test_resize": 24, "test_size": 16, "cache_workers": 1,
             "val_fraction": 0.0}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"data": {"name": "folder", "root": "photos", **sizes}}))
    assert main(["--params", str(tmp_path / "p.yaml")]) == 0
    out = capsys.readouterr().out
    assert "  cache          12 images    0.00 GB, shorter side 24 px" in out
    assert "  train           6 images       2 classes" in out and "  test            6 images       2 classes" in out
    (tmp_path / "labels.csv").write_text("path,label\nphotos/class_000/img_00.jpg,a\nphotos/class_000/img_01.jpg\n")
    assert main(["--params", str(tmp_path / "p.yaml"), "-S", "data.name=csv", "-S", "data.root=labels.csv"]) == 1
    assert "labels.csv:3: expected 2 columns (path,label), got 1" in capsys.readouterr().err
