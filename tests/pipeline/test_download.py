"""The download stage: params file in, prepared dataset and a summary out."""
from __future__ import annotations

import pytest
import yaml

from pipeline.download import main

TINY = {"data": {"synthetic": {"num_classes": 24, "classes_per_superclass": 4, "image_size": 16},
                 "train_size": 16, "test_resize": 16, "test_size": 16, "val_fraction": 0.25}}


def test_stage_prepares_and_then_verifies(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(TINY))
    assert main(["--params", "p.yaml"]) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "data" / "prepared" / "synthetic"
    assert f"synthetic: prepared in {folder}" in out
    # 24 classes: 12 train (3 of them carved for validation), 12 test.
    assert "train" in out and " 9 classes" in out and " 3 classes" in out and " 12 classes" in out
    stamp = (folder / "images.npy").stat().st_mtime_ns
    assert main(["--params", "p.yaml"]) == 0
    assert (folder / "images.npy").stat().st_mtime_ns == stamp


def test_stage_reports_bad_params(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"data": {"name": "imagenet"}}))
    with pytest.raises(ValueError, match=r"params.yaml: invalid parameters\n  data.name: .*'synthetic', 'sop'"):
        main([])
