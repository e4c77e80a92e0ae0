"""Session-wide servers (slow to start, so one of each per test session): see servers.py. And the suite's numerics:
portable mode, as in every stage process the tests start."""
from __future__ import annotations

import sys

from xbmcore import portable

# The stages enter portable mode (train.portable's default) as processes; a test that compares a stage run in a
# subprocess with one run in this process needs the same kernels here. Nothing heavy is loaded yet, so this sets
# the switches (a library loaded already would have read them: stop rather than compare other kernels).
assert not {"torch", "numpy", "faiss"} & set(sys.modules), "tests/conftest.py must run before torch loads"
portable.enter(True)

import pytest  # noqa: E402

import servers  # noqa: E402


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    """A PostgreSQL server on 127.0.0.1 (password authentication over TCP); stopped after the session."""
    pytest.importorskip("pgserver", reason="pgserver (dev extra) ships the PostgreSQL binaries; CPython <= 3.12")
    pg, proc = servers.start_postgres(tmp_path_factory.mktemp("postgres"))
    yield pg
    servers.stop(proc)


@pytest.fixture(scope="session")
def mlflow_server(postgres, tmp_path_factory):
    """`mlflow server` on 127.0.0.1 with a PostgreSQL backend store and a local artifact destination."""
    backend = postgres.create_database("mlflow")
    server = servers.start_mlflow_server(backend, tmp_path_factory.mktemp("mlflow-server"))
    yield server
    servers.stop(server.proc)
