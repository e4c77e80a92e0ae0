"""The project's one file hasher and one digest of parameters: what reproducibility keys on (checkpoints that
may resume a run, MLflow runs, the figures' result rows, downloads and prepared datasets)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

_CHUNK = 1 << 22


def file_digest(path: str | Path, algo: str = "sha256", missing_ok: bool = False) -> str | None:
    """Hex digest (`algo`: sha256, md5, ...) of a file's bytes, read in 4 MiB blocks; None for a file that cannot
    be read when `missing_ok`, else its OSError.

    Args:
        path: the file.
        algo: a hashlib algorithm name.
        missing_ok: return None instead of raising when the file cannot be read.

    Returns:
        The hex digest, or None (with `missing_ok`).

    Raises:
        OSError: the file cannot be read (without `missing_ok`).
    """
    h = hashlib.new(algo)
    try:
        with open(path, "rb") as f:
            while block := f.read(_CHUNK):
                h.update(block)
    except OSError:
        if missing_ok:
            return None
        raise
    return h.hexdigest()


def data_digest(data: Any, length: int = 12) -> str:
    """Short sha256 of JSON-able data, independent of dict order.

    Args:
        data: JSON-serialisable data.
        length: hex characters kept.

    Returns:
        The first `length` hex characters of the sha256 of the sorted-key JSON.
    """
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:length]
