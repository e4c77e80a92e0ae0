"""Training checkpoints: written atomically, read back with `torch.load(weights_only=True)`.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so the safe unpickler reads it: no
code runs when a checkpoint is loaded. RNG states are stored as tensors and ints for the same reason.
Periodic checkpoints of a phase live in one folder as `step_<global step>.pt`; the newest valid one is resumed.
"""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xbmcore.atomic import atomic_path

_NAME = re.compile(r"^step_(\d+)\.pt$")


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write `state` to `path` atomically (xbmcore.atomic): a reader, or a run killed half-way through the
    write, sees the old file or the new one, never a torn one."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with the safe unpickler; a missing or unreadable file is a ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated file, foreign pickle, disk error: one message, the file named
        raise ValueError(
            f"{path}: not a readable checkpoint ({type(err).__name__}: {err}); delete it to start that phase over"
        ) from err
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a checkpoint dict, got {type(state).__name__}")
    return state


def checkpoint_path(folder: str | Path, step: int) -> Path:
    return Path(folder) / f"step_{step:08d}.pt"


def list_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of the periodic checkpoints in `folder`, oldest first (temp files are ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def prune_checkpoints(folder: str | Path, keep: int = 2) -> None:
    """Delete all but the newest `keep` periodic checkpoints (and stale temp files of killed writes)."""
    folder = Path(folder)
    for _, p in list_checkpoints(folder)[:-keep] if keep else list_checkpoints(folder):
        p.unlink(missing_ok=True)
    for p in folder.glob(".step_*.pt.*.tmp") if folder.is_dir() else []:
        p.unlink(missing_ok=True)


# ---- RNG states (global generators the data pipeline and the model may draw from) ----

def rng_state() -> dict[str, Any]:
    np_name, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
    }
    version, internal, gauss_next = random.getstate()
    state["python"] = {"version": version, "internal": list(internal), "gauss_next": gauss_next}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
