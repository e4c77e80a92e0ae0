"""The committed results are the ones dvc.lock records: `dvc metrics diff` and `dvc plots diff` compare against them.

Every out of every stage in dvc.lock that is committed to git (metrics.json, plots/*.csv) must have the md5 and
size the lock records. A code change that alters the results makes this fail until the reference run is made
again (`make run`) and its dvc.lock, metrics.json and plots are committed together.
"""
from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def committed_files() -> set[str]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: nothing is committed to compare")
    return set(out.stdout.decode().split("\0")) - {""}


def locked_outs() -> list[tuple[str, str, dict]]:
    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())
    return [(stage, out["path"], out) for stage, s in lock["stages"].items() for out in s.get("outs", [])]


def test_committed_outs_match_dvc_lock():
    files = committed_files()
    checked, wrong = [], []
    for stage, path, out in locked_outs():
        inside = sorted(f for f in files if f.startswith(path.rstrip("/") + "/"))
        if inside:  # a directory out: the lock holds one hash of a listing kept in the DVC cache, not per file
            pytest.fail(f"dvc.lock: stage {stage} out {path} is a directory with committed files {inside[:3]}; "
                        f"declare the committed files as separate outs so that their md5 is recorded")
        if path not in files:
            continue
        data = (ROOT / path).read_bytes()
        checked.append(path)
        got = {"md5": hashlib.md5(data).hexdigest(), "size": len(data)}
        want = {"md5": out.get("md5"), "size": out.get("size")}
        if got != want:
            wrong.append(f"{path} (stage {stage}): committed {got}, dvc.lock records {want}")
    assert {"metrics.json", "plots/train.csv", "plots/val.csv"} <= set(checked), checked
    assert not wrong, ("committed results differ from the run dvc.lock records; run `make run` and commit "
                       "dvc.lock with its outputs:\n" + "\n".join(wrong))
