"""The whole pipeline through DVC on a generated `folder` dataset of photo-like JPEGs: cache built by the
download stage, trained and evaluated from it."""
from __future__ import annotations

import json

import pytest

from bench.data_real import make_folder_dataset
from test_dvc_pipeline import GITIGNORE, dvc, git
from tiny_project import assert_test_metrics, copy_project, write_params

pytestmark = pytest.mark.slow


def test_dvc_repro_on_a_folder_of_jpegs(tmp_path):
    root = tmp_path
    copy_project(root)
    make_folder_dataset(root / "photos", classes=12, per_class=4, size=(64, 48))
    write_params(root, data={"name": "folder", "root": "photos", "cache_size": 20, "test_resize": 20,
                             "test_fraction": 0.5, "val_fraction": 0.2, "cache_workers": 2})
    (root / ".gitignore").write_text(GITIGNORE + "/photos/\n")
    git(root, "init", "-q")
    dvc(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "project")

    out = dvc(root, "repro")
    for stage in ("download", "pretrain", "warmup", "memory_init", "train_xbm", "evaluate"):
        assert f"Running stage '{stage}'" in out.stdout
    assert "pretrain: skipped: the folder dataset has no pretrain split" in out.stderr + out.stdout
    prepared = root / "data" / "prepared" / "folder"
    meta = json.loads((prepared / "meta.json").read_text())
    assert meta["storage"] == "cache" and meta["num_images"] == 48
    assert {k: v["classes"] for k, v in meta["counts"].items()} == {"train": 5, "val": 1, "test": 6}
    assert (prepared / "classes.csv").read_text().splitlines()[1] == "0,class_000"
    metrics = json.loads((root / "metrics.json").read_text())
    assert_test_metrics(None, root, metrics["test"])
    assert "Data and pipelines are up to date" in dvc(root, "repro").stdout
