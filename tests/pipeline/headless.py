"""Headless Chromium for tests that look at a page as a reader would (Debian's `chromium`; `make setup` installs it
when run as root). Every request the page makes beyond the loopback goes to a local proxy that answers nothing
and records it, so a test both cuts the network off and sees what the page tried to load."""
from __future__ import annotations

import shutil
import socket
import socketserver
import subprocess
import tempfile
import threading

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed "
                                    "(apt-get install chromium; `make setup` installs it when run as root)")


class _Recorder(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        line = self.rfile.readline(4096).decode("latin-1").strip()  # "CONNECT cdn.example:443 HTTP/1.1"
        if line:
            with self.server.lock:
                self.server.requests.append(line)
        # Closing without an answer: the page's request fails at once, as it would offline.


class DeadProxy:
    """A proxy on 127.0.0.1 that records the first line of every request and answers none (a context manager)."""

    def __init__(self) -> None:
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Recorder)
        self.server.daemon_threads = True
        self.server.requests, self.server.lock = [], threading.Lock()
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def requests(self) -> list[str]:
        with self.server.lock:
            return list(self.server.requests)

    def __enter__(self) -> "DeadProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def chromium(url: str, *args: str, proxy_port: int, loopback_direct: bool = False, budget_ms: int = 20_000,
             timeout_s: float = 180) -> subprocess.CompletedProcess:
    """Run headless Chromium on `url` with `args` (--dump-dom, --screenshot=...) after `budget_ms` of virtual
    time: the clock skips ahead whenever the page is idle, so scripts, timers and renders have run by then.

    Every request goes to the proxy on `proxy_port`, loopback ones too unless `loopback_direct` (a local server
    under test). Flags: --no-sandbox because CI runs as root; the background services off, so the proxy sees
    the page's requests only."""
    if CHROMIUM is None:
        pytest.skip("headless Chromium is not installed")
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-default-apps", "--disable-extensions", "--disable-domain-reliability",
               f"--user-data-dir={profile}", f"--proxy-server=127.0.0.1:{proxy_port}",
               *([] if loopback_direct else ["--proxy-bypass-list=<-loopback>"]),
               f"--virtual-time-budget={budget_ms}", *args, url]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if out.returncode:
        raise AssertionError(f"chromium failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
