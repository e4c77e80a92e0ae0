"""A throwaway copy of the project for end-to-end runs (GUI tests, the screenshot): the pipeline's code, dvc.yaml
and a params.yaml with chosen values, in a fresh git + DVC repository, so `dvc exp run` works there exactly as in
the real project without touching it.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from xbmcore.config import validate_params

PROJECT = Path(__file__).resolve().parents[1]
COPIED = ("dvc.yaml", "params.yaml", "pipeline", "xbmcore")


def _git(dest: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=xbm", "-c", "user.email=xbm@localhost", *args], cwd=dest, check=True,
                   capture_output=True)


def make_project(dest: Path, overrides: dict[str, Any], source: Path = PROJECT) -> Path:
    """Copy the pipeline into dest (a new folder), apply `overrides` ({"train.xbm_steps": 200}) to its
    params.yaml (validated), and make it a git + DVC repository with one commit. Returns dest."""
    dest.mkdir(parents=True)
    for name in COPIED:
        src = source / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dest / name)
    raw = yaml.safe_load((dest / "params.yaml").read_text())
    for key, value in overrides.items():
        *sections, name = key.split(".")
        node = raw
        for s in sections:
            node = node.setdefault(s, {})
        node[name] = value
    validate_params(raw, str(dest / "params.yaml"))
    (dest / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (dest / ".gitignore").write_text("/data/\n/artifacts/\n/runs/\n/plots/\n/metrics.json\n*.db\n__pycache__/\n")
    _git(dest, "init", "-q")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=dest, check=True, capture_output=True)
    _git(dest, "add", "-A")
    _git(dest, "commit", "-q", "-m", "demo project")
    return dest
