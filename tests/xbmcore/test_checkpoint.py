"""Checkpoint files: a write killed half-way leaves the previous file whole; which checkpoint continues a phase
(same format, phase, starting step and digest), and what is refused or deleted as stale."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from xbmcore.checkpoint import (
    CHECKPOINT_FORMAT, checkpoint_path, list_checkpoints, load_checkpoint, preserved_rng, prune_checkpoints,
    resumable_checkpoint, save_checkpoint, training_digest,
)
from xbmcore.config import Params

REPO = Path(__file__).resolve().parents[2]

# A child that saves a checkpoint over `path`, but stops half-way through the bytes, says so, and waits to be
# killed: the kill lands inside the write, wherever the machine's speed would put it.
KILLED_WRITER = textwrap.dedent("""
    import sys, threading
    from pathlib import Path
    import torch
    import xbmcore.checkpoint as ck

    path, ready = Path(sys.argv[1]), Path(sys.argv[2])
    real_save = torch.save

    def half_save(obj, f):
        import io
        buf = io.BytesIO()
        real_save(obj, buf)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        ready.touch()
        threading.Event().wait()  # killed here

    ck.torch.save = half_save
    ck.save_checkpoint({"step": 2, "w": torch.full((256, 256), 2.0)}, path)
""")


def test_a_write_killed_half_way_leaves_the_previous_checkpoint(tmp_path):
    path = checkpoint_path(tmp_path, 1)
    save_checkpoint({"step": 1, "w": torch.full((256, 256), 1.0)}, path)
    ready = tmp_path / "ready"
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path), str(ready)],
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        while not ready.exists():  # the child is inside the write
            assert child.poll() is None, "the writer ended before it was killed"
            try:
                child.wait(0.05)  # the poll interval
            except subprocess.TimeoutExpired:
                pass
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0  # the torn bytes went to the temp file
    state = load_checkpoint(path)  # the final name still holds the old checkpoint, whole
    assert state["step"] == 1 and torch.equal(state["w"], torch.full((256, 256), 1.0))
    assert list_checkpoints(tmp_path) == [(1, path)]  # the temp file is not a checkpoint
    prune_checkpoints(tmp_path, keep=2)  # and the clean-up removes it
    assert [p.name for p in tmp_path.iterdir() if p.name != "ready"] == [path.name]


def test_a_torn_or_foreign_file_is_a_named_error(tmp_path):
    path = checkpoint_path(tmp_path, 3)
    save_checkpoint({"step": 3, "w": torch.ones(64, 64)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{path.name}: not a readable checkpoint"):
        load_checkpoint(path)
    path.write_bytes(b"<html>not a checkpoint</html>")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")


def phase_state(params: Params, phase: str, step: int, start: int = 0, nproc: int = 1, **over) -> dict:
    return {"format": CHECKPOINT_FORMAT, "phase": phase, "phase_start": start, "nproc": nproc, "step": step,
            "digest": training_digest(params, phase), **over}


def with_train(params: Params, **train) -> Params:
    return params.model_copy(update={"train": params.train.model_copy(update=train)})


def test_the_newest_checkpoint_of_the_same_run_continues_it(tmp_path):
    p = Params()
    for step in (4, 8):
        save_checkpoint(phase_state(p, "xbm", step, start=2), checkpoint_path(tmp_path, step))
    path, state = resumable_checkpoint(tmp_path, p, "xbm", 2, 20)
    assert path == checkpoint_path(tmp_path, 8) and state["step"] == 8
    # Past the phase's end, or a phase that started at another step: not this run's.
    assert resumable_checkpoint(tmp_path, p, "xbm", 2, 6)[0] == checkpoint_path(tmp_path, 4)
    assert resumable_checkpoint(tmp_path, p, "xbm", 0, 20) is None
    assert resumable_checkpoint(tmp_path, p, "warmup", 2, 20) is None


def test_a_digest_mismatch_is_refused_and_deleted_as_stale(tmp_path, caplog):
    p = Params()
    save_checkpoint(phase_state(p, "xbm", 6), checkpoint_path(tmp_path, 6))
    changed = with_train(p, lr=p.train.lr * 2)  # decides the XBM phase's result
    assert training_digest(changed, "xbm") != training_digest(p, "xbm")
    assert resumable_checkpoint(tmp_path, changed, "xbm", 0, 10) is None
    assert list_checkpoints(tmp_path)  # without delete_stale: kept
    assert resumable_checkpoint(tmp_path, changed, "xbm", 0, 10, delete_stale=True) is None
    assert list_checkpoints(tmp_path) == [] and "deleted, the xbm phase starts over" in caplog.text
    # A setting that only operates the run (how often to evaluate) keeps the digest, and the checkpoint.
    save_checkpoint(phase_state(p, "xbm", 6), checkpoint_path(tmp_path, 6))
    assert resumable_checkpoint(tmp_path, with_train(p, eval_every=7), "xbm", 0, 10) is not None
    # The warm-up does not depend on the XBM phase's lr.
    assert training_digest(changed, "warmup") == training_digest(p, "warmup")


def test_another_format_is_stale_and_another_process_count_is_refused(tmp_path):
    p = Params()
    save_checkpoint(phase_state(p, "warmup", 4, format=CHECKPOINT_FORMAT - 1), checkpoint_path(tmp_path, 4))
    assert resumable_checkpoint(tmp_path, p, "warmup", 0, 10) is None
    save_checkpoint(phase_state(p, "warmup", 5, nproc=2), checkpoint_path(tmp_path, 5))
    with pytest.raises(ValueError, match=r"written by a run of 2 process\(es\), this run has 1.*train.nproc=2"):
        resumable_checkpoint(tmp_path, p, "warmup", 0, 10)


def test_an_unreadable_checkpoint_is_skipped_for_an_older_good_one(tmp_path, caplog):
    p = Params()
    save_checkpoint(phase_state(p, "warmup", 4), checkpoint_path(tmp_path, 4))
    checkpoint_path(tmp_path, 8).write_bytes(b"torn")
    path, _ = resumable_checkpoint(tmp_path, p, "warmup", 0, 10, delete_stale=True)
    assert path == checkpoint_path(tmp_path, 4) and "skipping" in caplog.text
    assert list_checkpoints(tmp_path) == [(4, path)]


def test_preserved_rng_leaves_the_global_streams_where_they_were():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    with preserved_rng():
        torch.rand(100)
    assert torch.equal(torch.rand(3), expected)


def test_the_same_state_gives_the_same_bytes(tmp_path):
    """DVC hashes the stages' outputs: a checkpoint's bytes depend on its content only, not on the write's
    temporary name or the file's own name."""
    state = {"step": 3, "w": torch.arange(12.0).reshape(3, 4), "rng": [{"torch": torch.get_rng_state()}]}
    a = save_checkpoint(state, tmp_path / "a" / "model.pt").read_bytes()
    b = save_checkpoint(state, tmp_path / "b" / "state.pt").read_bytes()
    assert a == b
