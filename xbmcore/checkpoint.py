"""Training checkpoints: written atomically, read back with `torch.load(weights_only=True)`, and found again.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so the safe unpickler reads it: no
code runs when a checkpoint is loaded. RNG states are stored as tensors and ints for the same reason.
Periodic checkpoints of a phase live in one folder as `step_<global step>.pt`. `resumable_checkpoint` picks the
newest one that continues a phase: same format, phase, starting step and `training_digest` (the parameters that
decide the result, and `code_fingerprint`, this library's sources).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import random
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from xbmcore.atomic import atomic_path
from xbmcore.config import Params
from xbmcore.distributed import world_size

log = logging.getLogger(__name__)

# 2: the sampler position is no longer stored (it follows from the step); RNG states are one per rank.
# 3: the warm-up's end step and the drift probe's snapshots and history.
CHECKPOINT_FORMAT = 3
# Train params that change how a run is operated, not what it computes (evaluation runs on a forked RNG). nproc
# does change it (the global batch) and is checked on its own, so that a resume with another nproc is refused
# with a message rather than silently started over.
_OPERATIONAL = ("checkpoint_every", "eval_every", "num_threads", "device", "precision", "log_every", "nproc",
                "memory_view_every", "memory_view_k", "memory_view_anchors")  # the memory view observes only
# The drift probe's and the auto warm-up's: they decide what is computed only when the warm-up ends on drift.
_DRIFT = ("drift_probe", "drift_every", "drift_dts", "warmup_drift", "warmup_drift_dt", "warmup_drift_window",
          "warmup_min_steps", "warmup_max_steps")

_NAME = re.compile(r"^step_(\d+)\.pt$")


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write `state` to `path` atomically (xbmcore.atomic): a reader, or a run killed half-way through the
    write, sees the old file or the new one, never a torn one.

    Args:
        state: a plain dict of tensors, numbers, strings, lists and dicts (``TrainState.state_dict``).
        path: the file to write (its folder is created).

    Returns:
        `path`, as a Path.
    """
    path = Path(path)
    # Through a file object: given a path, torch.save names the archive's root folder after the (random) temp name,
    # and the same state would give other bytes at every write.
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with the safe unpickler; a missing or unreadable file is a ValueError naming it.

    Args:
        path: the checkpoint file.
        map_location: where the tensors are loaded (``torch.load``'s map_location).

    Returns:
        The checkpoint dict.

    Raises:
        ValueError: a missing file, one the safe unpickler cannot read, or content that is not a dict.
    """
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
    """Where the periodic checkpoint of `step` lives.

    Args:
        folder: the phase's checkpoint folder.
        step: the global step.

    Returns:
        ``folder/step_<step, 8 digits>.pt``.
    """
    return Path(folder) / f"step_{step:08d}.pt"


def list_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of the periodic checkpoints in `folder`, oldest first (temp files are ignored).

    Args:
        folder: the phase's checkpoint folder (it may not exist).

    Returns:
        ``[(step, path), ...]`` sorted by step; empty without the folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def prune_checkpoints(folder: str | Path, keep: int = 2) -> None:
    """Delete all but the newest `keep` periodic checkpoints (and stale temp files of killed writes).

    Args:
        folder: the phase's checkpoint folder.
        keep: how many of the newest to keep (0: delete them all).
    """
    folder = Path(folder)
    for _, p in list_checkpoints(folder)[:-keep] if keep else list_checkpoints(folder):
        p.unlink(missing_ok=True)
    for p in folder.glob(".step_*.pt.*.tmp") if folder.is_dir() else []:
        p.unlink(missing_ok=True)


# ---- which checkpoint continues a phase ----

@functools.cache
def code_fingerprint() -> str:
    """Hash of this library's sources. A phase killed and run again by the same code resumes; after a code
    change (DVC reruns the stage because its code deps changed) it starts over instead of finishing a run begun
    by other code.

    Returns:
        The first 12 hex characters of the sha256 of xbmcore's ``*.py`` files (paths and bytes), computed once
            per process.
    """
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def training_digest(params: Params, phase: str) -> str:
    """Hash of what a phase's result depends on (parameters, the pretrained weights' bytes and the code); a
    checkpoint resumes only a run with the same digest.

    The warm-up depends neither on the memory nor on the XBM phase's length, lr and schedule, so changing those
    keeps a warm-up checkpoint valid.

    Args:
        params: the run's params.
        phase: ``"warmup"``, or any other phase (``"xbm"``, ``"baseline"``): the XBM phase also depends on the
            memory section and its own length, lr and schedule.

    Returns:
        A 12-character hex digest. Operational settings (checkpoint and evaluation intervals, threads, device,
            precision, log interval, nproc) do not enter it, nor the drift probe's unless the warm-up is auto.
    """
    skip = _OPERATIONAL + (() if params.train.warmup_steps == "auto" else _DRIFT)
    if phase == "warmup":
        skip += ("xbm_steps", "lr", "lr_schedule")  # the XBM phase's
        sections = ("data", "model", "loss", "train")
    else:
        sections = ("data", "model", "loss", "memory", "train")
    return params.digest(sections, drop=tuple(f"train.{k}" for k in skip), extra={"code": code_fingerprint()})


def resumable_checkpoint(folder: str | Path, params: Params, phase: str, start: int, end: int,
                         delete_stale: bool = False) -> tuple[Path, dict[str, Any]] | None:
    """(path, state) of the newest checkpoint in `folder` that continues this phase: same phase, same digest
    (training_digest), same starting step, step within [start, end]. Others are stale (other parameters or code,
    or a phase that started elsewhere); `delete_stale` removes them, with a warning, so they cannot pile up.

    Args:
        folder: the phase's checkpoint folder.
        params: the run's params (their `training_digest` must match).
        phase: the phase's name.
        start: the step the phase started at.
        end: the phase's last step.
        delete_stale: delete the checkpoints that do not continue this phase (and unreadable ones).

    Returns:
        ``(path, state)`` of the newest checkpoint that continues the phase, or None.

    Raises:
        ValueError: the checkpoint that would continue the phase was written by another number of processes.
    """
    folder = Path(folder)
    digest = training_digest(params, phase)
    stale, found = [], None
    nproc = world_size()
    for step, path in reversed(list_checkpoints(folder)):
        try:
            state = load_checkpoint(path)
        except ValueError as err:
            log.warning("skipping %s", err)
            stale.append(path)
            continue
        if (state.get("format"), state.get("phase"), state.get("digest"), state.get("phase_start")) == \
                (CHECKPOINT_FORMAT, phase, digest, start) and start <= step <= end:
            if state.get("nproc") != nproc:
                raise ValueError(
                    f"{path}: written by a run of {state.get('nproc')} process(es), this run has {nproc}; the "
                    f"global batch (processes x train.batch_size) and the data each rank sees would change "
                    f"mid-phase. Run again with -S train.nproc={state.get('nproc')} (on one node) to resume, or "
                    f"delete {folder} to start the {phase} phase over")
            found = (path, state)
            break
        stale.append(path)
    if delete_stale and stale:
        if found is None:
            log.warning("%s: %d checkpoint(s) of other parameters, other code or another starting step; deleted, "
                        "the %s phase starts over", folder, len(stale), phase)
        for p in stale:
            p.unlink(missing_ok=True)
    return found


# ---- RNG states (global generators the data pipeline and the model may draw from) ----

def rng_state() -> dict[str, Any]:
    """The global generators' states: torch's, numpy's, Python's and (where initialised) CUDA's.

    Returns:
        A plain dict of tensors, ints, floats and lists (the safe unpickler reads it): what `set_rng_state`
            takes.
    """
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
    """Restore the global generators from `rng_state`'s dict.

    Args:
        state: what `rng_state` returned; its CUDA states are restored where CUDA is available.
    """
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block (evaluation) without moving the global RNG streams, so training does not depend on it."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)
