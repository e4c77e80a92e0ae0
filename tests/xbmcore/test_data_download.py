"""Downloads against a local HTTP server on 127.0.0.1, and safe archive extraction."""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from xbmcore.data.download import extract, fetch

PAYLOAD = bytes(range(256)) * 400  # 102,400 bytes: several read chunks would be needed at 1 KiB, one at 1 MiB


class _Server:
    """Serves `files` with HTTP Range support. `drop_after[path] = n`: the first request for path sends the full
    Content-Length but only n bytes, then closes the connection. `ignore_range` answers every request with 200."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.drop_after: dict[str, int] = {}
        self.ignore_range = False
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                if rng and not server.ignore_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                cut = server.drop_after.pop(self.path, None)
                if cut is not None:
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def server():
    with _Server() as s:
        s.files["/data.bin"] = PAYLOAD
        yield s


def _md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


def test_good_file_is_fetched_verified_and_renamed(server, tmp_path):
    dest = tmp_path / "sub" / "data.bin"
    got = fetch(server.url + "/data.bin", dest, md5=_md5(PAYLOAD), sha256=hashlib.sha256(PAYLOAD).hexdigest(),
                size=len(PAYLOAD), progress=False)
    assert got == dest and dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "sub" / "data.bin.part").exists()
    # Present and valid: verified, not fetched again.
    n = len(server.requests)
    fetch(server.url + "/data.bin", dest, md5=_md5(PAYLOAD), progress=False)
    assert len(server.requests) == n


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    dest = tmp_path / "data.bin"
    with pytest.raises(ValueError, match=r"md5 mismatch, expected 0{32}, got " + _md5(PAYLOAD)):
        fetch(server.url + "/data.bin", dest, md5="0" * 32, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_existing_file_with_wrong_checksum_is_reported(server, tmp_path):
    dest = tmp_path / "data.bin"
    dest.write_bytes(b"something else")
    with pytest.raises(ValueError, match="delete it to fetch it again"):
        fetch(server.url + "/data.bin", dest, md5=_md5(PAYLOAD), progress=False)
    assert server.requests == []


def test_interrupted_transfer_resumes_with_range(server, tmp_path):
    dest = tmp_path / "data.bin"
    server.drop_after["/data.bin"] = 30_000
    with pytest.raises(ConnectionError, match="30000 bytes kept"):
        fetch(server.url + "/data.bin", dest, md5=_md5(PAYLOAD), retries=0, progress=False)
    part = tmp_path / "data.bin.part"
    assert part.stat().st_size == 30_000 and not dest.exists()
    fetch(server.url + "/data.bin", dest, md5=_md5(PAYLOAD), retries=0, progress=False)
    assert dest.read_bytes() == PAYLOAD and not part.exists()
    assert server.requests == [("/data.bin", None), ("/data.bin", "bytes=30000-")]


def test_interruption_is_retried_within_one_call(server, tmp_path):
    server.drop_after["/data.bin"] = 12_345
    dest = fetch(server.url + "/data.bin", tmp_path / "data.bin", md5=_md5(PAYLOAD), retries=2, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert [r for _, r in server.requests] == [None, "bytes=12345-"]


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    (tmp_path / "data.bin.part").write_bytes(b"\xff" * 5000)  # stale bytes that must not survive
    server.ignore_range = True
    dest = fetch(server.url + "/data.bin", tmp_path / "data.bin", md5=_md5(PAYLOAD), progress=False)
    assert dest.read_bytes() == PAYLOAD


def test_complete_part_file_is_finished_without_refetch(server, tmp_path):
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD)  # killed between the last byte and the rename
    dest = fetch(server.url + "/data.bin", tmp_path / "data.bin", md5=_md5(PAYLOAD), progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests == [("/data.bin", f"bytes={len(PAYLOAD)}-")]


def test_http_error_is_reported_with_url(server, tmp_path):
    with pytest.raises(ConnectionError, match=r"/missing.bin: download failed \(HTTPError"):
        fetch(server.url + "/missing.bin", tmp_path / "missing.bin", retries=3, progress=False)
    assert len(server.requests) == 1  # a 404 does not heal by retrying


# ------------------------------------------------------------------------------------------------- extraction

def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _link(name: str, target: str, kind=tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def test_tar_and_zip_extract(tmp_path):
    arc = _tar(tmp_path / "good.tgz", [_file("top/a.txt", b"A"), _file("top/sub/b.txt", b"B"),
                                       _link("top/sub/link", "../a.txt")])
    out = tmp_path / "out"
    assert extract(arc, out) == [out / "top"]
    assert (out / "top" / "sub" / "b.txt").read_bytes() == b"B"
    assert (out / "top" / "sub" / "link").read_bytes() == b"A"  # in-tree link kept
    with zipfile.ZipFile(tmp_path / "good.zip", "w") as zf:
        zf.writestr("z/c.txt", "C")
    assert extract(tmp_path / "good.zip", out) == [out / "z"]
    assert (out / "z" / "c.txt").read_text() == "C"
    assert sorted(p.name for p in out.iterdir()) == ["top", "z"]  # no temporary folder left


@pytest.mark.parametrize("members, what", [
    ([_file("ok.txt"), _file("../evil.txt")], "outside the target folder"),
    ([_file("a/../../evil.txt")], "outside the target folder"),
    ([_file("/tmp/evil.txt")], "outside the target folder"),
    ([_file("ok.txt"), _link("link", "/etc/passwd")], "points outside"),
    ([_link("a/link", "../../etc")], "points outside"),
    ([_file("ok.txt"), _link("hard", "../ok.txt", tarfile.LNKTYPE)], "points outside"),
])
def test_tar_members_escaping_the_target_are_refused(tmp_path, members, what):
    arc = _tar(tmp_path / "bad.tgz", members)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=what):
        extract(arc, out)
    assert list(out.iterdir()) == []  # refused before anything was written
    assert not (tmp_path / "evil.txt").exists()


def test_zip_members_escaping_the_target_are_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "bad.zip", "w") as zf:
        zf.writestr("ok.txt", "fine")
        zf.writestr("../evil.txt", "evil")
    with pytest.raises(ValueError, match="outside the target folder"):
        extract(tmp_path / "bad.zip", tmp_path / "out")
    link = zipfile.ZipInfo("link")
    link.external_attr = (0o120777 << 16)  # a symlink entry, as `zip --symlinks` stores it
    with zipfile.ZipFile(tmp_path / "link.zip", "w") as zf:
        zf.writestr(link, "../../etc/passwd")
    with pytest.raises(ValueError, match="points outside"):
        extract(tmp_path / "link.zip", tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []
    assert not (tmp_path / "evil.txt").exists()


def test_not_an_archive(tmp_path):
    (tmp_path / "x.tgz").write_bytes(b"plain bytes")
    with pytest.raises(ValueError, match="not a tar or zip archive"):
        extract(tmp_path / "x.tgz", tmp_path / "out")


def test_existing_incomplete_target_is_not_overwritten(tmp_path):
    arc = _tar(tmp_path / "a.tgz", [_file("top/a.txt", b"A")])
    (tmp_path / "out" / "top").mkdir(parents=True)
    (tmp_path / "out" / "top" / "mine.txt").write_text("user data")
    with pytest.raises(ValueError, match="already exists"):
        extract(arc, tmp_path / "out")
    assert os.listdir(tmp_path / "out" / "top") == ["mine.txt"]
