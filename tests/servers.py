"""Real servers for tests, on 127.0.0.1: PostgreSQL (the binaries shipped by the `pgserver` wheel) and
`mlflow server` with that database as its backend store.

pgserver's own start-up listens on a Unix socket only, with trust authentication; a team's database is reached
over TCP with a password, so the cluster is made here with its binaries: `initdb` with scram-sha-256 for TCP
clients, `postgres -h 127.0.0.1 -p <free port>`. PostgreSQL refuses to run as root; as root (CI containers) the
cluster runs as the unprivileged user pgserver creates for the same reason.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

PG_USER, PG_PASSWORD = "xbm", "xbm-test-password"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Postgres:
    port: int
    data: Path
    run_as: str | None

    def url(self, database: str, password: str = PG_PASSWORD, driver: str = "postgresql") -> str:
        return f"{driver}://{PG_USER}:{password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        # autocommit: CREATE DATABASE cannot run in a transaction
        with psycopg.connect(host="127.0.0.1", port=self.port, user=PG_USER, password=PG_PASSWORD,
                             dbname="postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def _pg_bin() -> Path:
    from pgserver._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


def start_postgres(base: Path) -> tuple[Postgres, subprocess.Popen]:
    base.mkdir(parents=True, exist_ok=True)
    run_as = None
    if os.geteuid() == 0:
        from pgserver.utils import ensure_prefix_permissions, ensure_user_exists

        run_as = "pgserver"
        ensure_user_exists(run_as)
        ensure_prefix_permissions(base)
        shutil.chown(base, run_as)
        ensure_prefix_permissions(_pg_bin())
    data, sock = base / "data", base / "sock"
    pwfile = base / "pw"
    pwfile.write_text(PG_PASSWORD + "\n")
    sock.mkdir(exist_ok=True)
    if run_as:
        for p in (pwfile, sock):
            shutil.chown(p, run_as)
    kw = {"user": run_as} if run_as else {}
    subprocess.run([str(_pg_bin() / "initdb"), "-D", str(data), "-U", PG_USER, f"--pwfile={pwfile}",
                    "--auth-host=scram-sha-256", "--auth-local=trust", "--encoding=UTF8", "--no-sync"],
                   check=True, capture_output=True, text=True, **kw)
    port = free_port()
    log = open(base / "postgres.log", "w")
    proc = subprocess.Popen([str(_pg_bin() / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port),
                             "-k", str(sock), "-c", "fsync=off", "-c", "max_connections=100"],
                            stdout=log, stderr=subprocess.STDOUT, **kw)
    pg = Postgres(port, data, run_as)
    deadline = time.monotonic() + 60
    while True:
        ready = subprocess.run([str(_pg_bin() / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                               capture_output=True)
        if ready.returncode == 0:
            return pg, proc
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"PostgreSQL did not start:\n{(base / 'postgres.log').read_text()[-3000:]}")
        time.sleep(0.2)


def stop(proc: subprocess.Popen, timeout: float = 10) -> None:
    if proc.poll() is None:
        proc.terminate()  # SIGTERM: PostgreSQL's smart shutdown, mlflow's graceful stop
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class MlflowServer:
    uri: str
    backend: str
    artifacts: Path
    proc: subprocess.Popen
    log: Path


def start_mlflow_server(backend: str, base: Path, port: int | None = None) -> MlflowServer:
    base.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    artifacts = base / "artifacts"
    log_path = base / "mlflow-server.log"
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
         "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env, cwd=base)
    uri = f"http://127.0.0.1:{port}"
    if not wait_http(f"{uri}/health", proc):
        stop(proc)
        raise RuntimeError(f"mlflow server did not start:\n{log_path.read_text()[-3000:]}")
    return MlflowServer(uri, backend, artifacts, proc, log_path)


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 180) -> bool:
    """Whether `url` answers 200 before `proc` exits or `timeout` seconds pass. A server says it is ready only by
    answering, so this polls: the 0.5 s sleep is the interval between checks of that condition."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


class Gate:
    """A TCP port in front of a real server, to play an outage: `down` (connections refused, open ones cut),
    `slow` (accepted, never answered) or `up` (forwarded)."""

    def __init__(self, target_port: int):
        self.target = target_port
        self.port = free_port()
        self.mode = "down"
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []

    def set(self, mode: str) -> None:
        self.mode = mode
        if mode == "down":
            self._close_all()
        elif self._listener is None:
            self._listener = socket.create_server(("127.0.0.1", self.port))
            threading.Thread(target=self._serve, args=(self._listener,), daemon=True).start()

    def _serve(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            self._conns.append(conn)
            if self.mode == "slow":
                continue
            up = socket.create_connection(("127.0.0.1", self.target))
            self._conns.append(up)
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _close_all(self) -> None:
        if self._listener is not None:
            try:  # wakes the accept() in flight (close alone leaves it listening until the next connection)
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        for s in self._conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self._conns.clear()

    def close(self) -> None:
        self._close_all()
