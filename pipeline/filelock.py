"""The one file lock of the application: an exclusive `flock` on a file for the length of a `with` block.

flock locks belong to the open file: the kernel drops them when the holder exits or is killed, so a crashed
worker never leaves a stale lock behind (unlike a lock *file* whose existence is the lock). They hold between
processes of one host, on local file systems; the study's server databases use their own lock (storage.py).
The lock file is created if missing (its parent folder too) and left in place: deleting it while another
process waits on it would let a third one lock a new file of the same name.
"""
from __future__ import annotations

import fcntl
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive flock on `path` for the block; waits (blocks) while another process holds it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
