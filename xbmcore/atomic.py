"""The one way this project writes a file: a temporary name in the same folder, fsync, then `os.replace`.

A reader, or a run killed half-way through the write, sees the old file or the new one, never a torn one. The
fsync comes before the rename: without it, a crash soon after can leave the new name pointing at empty bytes.
The temporary name starts with a dot and ends in `.tmp`, so a clean-up of a folder can find what a SIGKILL left.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `final` to write; on success it is fsynced and renamed to `final`, on an
    error it is deleted. The file gets the mode a plain `open` would give (mkstemp's 0600 is widened).

    Args:
        final: the file to write (its folder is created).

    Yields:
        The temporary path (``.<name>.<random>.tmp`` in the same folder) to write to.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically.

    Args:
        path: the file to write.
        data: its new content.

    Returns:
        `path`, as a Path.
    """
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically.

    Args:
        path: the file to write.
        text: its new content.

    Returns:
        `path`, as a Path.
    """
    return write_bytes(path, text.encode("utf-8"))
