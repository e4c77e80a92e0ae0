"""Fetch a file over HTTP(S)/FTP and unpack archives, safely.

- `fetch`: streams into `<dest>.part` with a progress bar; an interrupted transfer resumes from the bytes already
  there (HTTP Range; a server that ignores Range restarts from zero); the complete file is checked against
  its size and md5/sha256 and only then renamed to `dest`. On a checksum mismatch the partial file is
  deleted, so nothing half-written survives under any name.
- `extract`: tar (any compression) or zip into a temporary folder next to the target, then moves the top-level
  entries into place. Members with absolute paths or `..` components, links that point outside the
  target, and device files are refused before anything is written.
"""
from __future__ import annotations

import http.client
import logging
import os
import posixpath
import shutil
import stat
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

from xbmcore.hashing import file_digest

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


def verify_file(path: Path, md5: str | None = None, sha256: str | None = None, size: int | None = None) -> None:
    """Raise ValueError naming the file, what was expected and what came, when a given check fails.

    Args:
        path: the file.
        md5: its expected md5 (hex), or None.
        sha256: its expected sha256 (hex), or None.
        size: its expected size in bytes, or None.

    Raises:
        ValueError: a check that fails.
    """
    if size is not None and path.stat().st_size != size:
        raise ValueError(f"{path}: expected {size} bytes, got {path.stat().st_size}")
    for algo, want in (("md5", md5), ("sha256", sha256)):
        if want is not None:
            got = file_digest(path, algo)
            if got != want.lower():
                raise ValueError(f"{path}: {algo} mismatch, expected {want}, got {got}")


def _open(url: str, start: int, timeout: float):
    headers = {"User-Agent": "xbm-platform"}
    if start:
        headers["Range"] = f"bytes={start}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _transfer(url: str, part: Path, timeout: float, progress: bool) -> None:
    """One attempt: append to `part` from where it ends (or restart when the server ignores Range)."""
    have = part.stat().st_size if part.exists() else 0
    try:
        resp = _open(url, have, timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # Range not satisfiable: the part is already whole; the checksum decides
            return
        raise
    with resp:
        status = getattr(resp, "status", None)  # None for ftp: no resume there
        if have and status != 206:
            log.info("%s: server ignored the range request, restarting from zero", url)
            have = 0
        length = resp.headers.get("Content-Length")
        expected = int(length) if length is not None else None
        got = 0
        with open(part, "ab" if have else "wb") as f, tqdm(
            total=None if expected is None else have + expected, initial=have, unit="B", unit_scale=True,
            unit_divisor=1024, desc=part.name[: -len(".part")], disable=not progress, leave=False,
        ) as bar:
            while True:
                try:
                    block = resp.read(_CHUNK)
                except http.client.IncompleteRead as err:
                    block = err.partial
                    f.write(block)
                    raise ConnectionError(f"connection closed after {have + got + len(block)} bytes") from None
                if not block:
                    break
                f.write(block)
                got += len(block)
                bar.update(len(block))
        if expected is not None and got < expected:
            raise ConnectionError(f"connection closed after {have + got} of {have + expected} bytes")


def fetch(url: str, dest: Path, *, md5: str | None = None, sha256: str | None = None, size: int | None = None,
          retries: int = 3, timeout: float = 60.0, progress: bool = True) -> Path:
    """Download `url` to `dest` unless `dest` is already there, and verify it (size, md5, sha256 where given).

    An existing `dest` is verified, not fetched again. `retries` extra attempts each resume where the last stopped;
    when all fail the partial file stays as `<dest>.part`, and the next call resumes from it.

    Args:
        url: an http(s) or ftp address.
        dest: the file to create (its folder is created).
        md5: the expected md5, or None.
        sha256: the expected sha256, or None.
        size: the expected size in bytes, or None.
        retries: extra attempts after a dropped connection.
        timeout: seconds a connection may stall.
        progress: show a progress bar.

    Returns:
        `dest`.

    Raises:
        ConnectionError: the download failed: an HTTP error, or a connection that dropped on every attempt (the
            partial file is kept for the next call).
        ValueError: an existing `dest`, or the download, fails its checks (a failed download is deleted).
    """
    dest = Path(dest)
    if dest.exists():
        try:
            verify_file(dest, md5, sha256, size)
        except ValueError as err:
            raise ValueError(f"{err}; it is not the expected file: delete it to fetch it again") from None
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            _transfer(url, part, timeout, progress)
            break
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
            # HTTP errors other than a dropped connection will not heal by retrying.
            if isinstance(err, urllib.error.HTTPError) or attempt == retries:
                have = part.stat().st_size if part.exists() else 0
                raise ConnectionError(
                    f"{url}: download failed ({type(err).__name__}: {err}); {have} bytes kept in {part}, "
                    f"a new run resumes from there") from err
            log.warning("%s: %s; resuming (attempt %d of %d)", url, err, attempt + 2, retries + 1)
    try:
        verify_file(part, md5, sha256, size)
    except ValueError as err:
        part.unlink(missing_ok=True)
        raise ValueError(f"{url}: {err}; the download was deleted") from None
    os.replace(part, dest)
    return dest


# ------------------------------------------------------------------------------------------------- extraction

def _check_name(archive: Path, name: str) -> str:
    """The member's normalised relative path, or ValueError when it could land outside the target."""
    norm = name.replace("\\", "/")
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":") or ".." in norm.split("/"):
        raise ValueError(f"{archive}: member {name!r} would be written outside the target folder; refusing")
    return posixpath.normpath(norm)


def _check_link(archive: Path, name: str, target: str, hard: bool) -> None:
    # A symlink resolves relative to its own folder, a hard link relative to the archive root.
    base = "" if hard else posixpath.dirname(posixpath.normpath(name))
    t = target.replace("\\", "/")
    resolved = posixpath.normpath(posixpath.join(base, t))
    if t.startswith("/") or resolved == ".." or resolved.startswith("../"):
        raise ValueError(f"{archive}: link {name!r} -> {target!r} points outside the target folder; refusing")


def _safe_tar_members(archive: Path, tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    members = tar.getmembers()
    for m in members:
        _check_name(archive, m.name)
        if m.issym() or m.islnk():
            _check_link(archive, m.name, m.linkname, hard=m.islnk())
        elif not (m.isfile() or m.isdir()):
            raise ValueError(f"{archive}: member {m.name!r} is a device or pipe; refusing")
    return members


def _zip_link_target(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> str | None:
    mode = info.external_attr >> 16
    return zf.read(info).decode("utf-8", "replace") if stat.S_ISLNK(mode) else None


def extract(archive: Path, into: Path) -> list[Path]:
    """Unpack `archive` into `into` and return the top-level paths created.

    Everything is checked first and unpacked into a temporary folder inside `into`; only then are the top-level
    entries renamed into place, so a refused or broken archive leaves `into` as it was.

    Args:
        archive: a tar (any compression) or zip file.
        into: the target folder (created).

    Returns:
        The top-level paths created in `into`.

    Raises:
        ValueError: not an archive, a member that would land outside `into` (absolute path, ``..``, a link out,
            a device file), or a top-level entry that already exists.
    """
    archive, into = Path(archive), Path(into)
    into.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=into, prefix=".extract-"))
    try:
        if tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tar:
                members = _safe_tar_members(archive, tar)
                # The "data" filter (Python >= 3.11.4) re-checks every member as a second line of defence.
                kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(tmp, members=members, **kw)
        elif zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                infos = zf.infolist()
                for info in infos:
                    _check_name(archive, info.filename)
                    target = _zip_link_target(zf, info)
                    if target is not None:
                        _check_link(archive, info.filename, target, hard=False)
                zf.extractall(tmp)
        else:
            raise ValueError(f"{archive}: not a tar or zip archive")
        created = []
        for entry in sorted(tmp.iterdir()):
            final = into / entry.name
            if final.exists():
                raise ValueError(
                    f"{archive}: {final} already exists and is incomplete (the dataset's files are missing); "
                    f"move it away or complete it by hand")
            os.replace(entry, final)
            created.append(final)
        return created
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
