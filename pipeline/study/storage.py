"""Where a study lives: an RDB URL (SQLite by default, PostgreSQL for a team) or a journal file, resolved
against the project root.

Paths are made absolute because `dvc exp run --temp/--queue` and several workers run from other directories,
and a relative SQLite URL would silently open a fresh, empty study there.
"""
from __future__ import annotations

import contextlib
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend

from pipeline.filelock import file_lock
from pipeline.tracking import redact

# Key of the PostgreSQL advisory lock that serialises the workers' count-then-ask: any 64-bit number would do,
# one derived from a name says what holds it (pg_locks shows the number).
_BUDGET_LOCK_KEY = zlib.crc32(b"xbm.tune.budget")


class StorageError(ValueError):
    """The study storage cannot be opened (server down, wrong password, missing driver): said before any trial."""


def _is_postgres(url: str) -> bool:
    return url.startswith(("postgresql:", "postgresql+", "postgres:"))


@dataclass(frozen=True)
class StudyStorage:
    url: str                 # what optuna-dashboard and `-S tune.storage=` accept
    lock_path: Path | None   # local file next to the storage; None for server databases

    def open(self) -> BaseStorage:
        if "://" not in self.url:
            return JournalStorage(JournalFileBackend(self.url))
        # A generous SQLite timeout: workers write while others hold the lock for a moment.
        kw = {"connect_args": {"timeout": 60}} if self.url.startswith("sqlite:") else None
        with self._explained():
            return RDBStorage(self.url, engine_kwargs=kw)

    @contextlib.contextmanager
    def _explained(self) -> Iterator[None]:
        """A connection failure as one line naming the storage (password hidden), not a driver traceback."""
        import sqlalchemy.exc

        try:
            yield
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError) as err:
            reason = str(getattr(err, "orig", None) or err).strip().splitlines()
            reason = next((line.strip() for line in reason if "FATAL" in line), reason[0] if reason else "")
            raise StorageError(f"tune.storage: cannot connect to {redact(self.url)}: {reason}") from None
        except (ImportError, sqlalchemy.exc.NoSuchModuleError, sqlalchemy.exc.ArgumentError) as err:
            raise StorageError(f"tune.storage: {redact(self.url)} cannot be opened ({err}); a postgresql:// "
                               "URL needs the psycopg driver (pip install 'psycopg[binary]')") from None

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive across the study's workers for the count-then-ask of the budget: a file lock for local
        storages (one host), a PostgreSQL advisory lock for a server (any host; released by the server if the
        worker dies). Other server databases have no such lock: workers there can overshoot the budget by at
        most one trial each in a race at its very end (optuna numbers trials atomically, so none is done twice).
        """
        if self.lock_path is None:
            if _is_postgres(self.url):
                with self._advisory_lock():
                    yield
            else:
                yield
            return
        with file_lock(self.lock_path):
            yield


    @contextlib.contextmanager
    def _advisory_lock(self) -> Iterator[None]:
        import sqlalchemy
        from sqlalchemy.pool import NullPool

        with self._explained():
            engine = sqlalchemy.create_engine(self.url, poolclass=NullPool)
            conn = engine.connect()
        try:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": _BUDGET_LOCK_KEY})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": _BUDGET_LOCK_KEY})
        finally:
            conn.close()
            engine.dispose()


def resolve_storage(spec: str | None, root: Path) -> StudyStorage:
    """None -> sqlite:///<root>/optuna.db; "sqlite:///rel.db" -> absolute; "x://..." as is; a path (optionally
    written journal:path or journal:///abs/path) -> a journal file."""
    root = Path(root).resolve()
    if spec is None:
        spec = f"sqlite:///{root / 'optuna.db'}"
    if spec.startswith("journal:"):
        rest = spec[len("journal:"):]
        if rest.startswith("//"):  # journal:///abs/file (URL style) -> /abs/file
            rest = "/" + rest.lstrip("/")
        return _journal(rest, root)
    if spec.startswith("sqlite:///"):
        rest = spec[len("sqlite:///"):]
        if rest in ("", ":memory:"):
            raise ValueError(f"tune.storage: expected a file database for a persistent study, got {spec!r}")
        db = Path(rest.split("?", 1)[0])
        db = db if db.is_absolute() else root / db
        db.parent.mkdir(parents=True, exist_ok=True)
        query = rest[len(rest.split("?", 1)[0]):]
        return StudyStorage(f"sqlite:///{db}{query}", Path(f"{db}.lock"))
    if "://" in spec:
        return StudyStorage(spec, None)
    if spec.endswith((".db", ".sqlite", ".sqlite3")):
        raise ValueError(f"tune.storage: {spec!r} looks like a SQLite file; write it as sqlite:///{spec} "
                         "(a plain path means a journal file)")
    return _journal(spec, root)


def _journal(spec: str, root: Path) -> StudyStorage:
    if not spec:
        raise ValueError("tune.storage: a journal storage needs a file path, e.g. journal:artifacts/tune/xbm.journal")
    path = Path(spec).expanduser()
    path = path if path.is_absolute() else root / path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not "<file>.lock": JournalFileBackend uses that name for its own per-write lock.
    return StudyStorage(str(path), Path(f"{path}.budget.lock"))


def objective_name(metric: str) -> str:
    """The name of a study's objective, `tune.metric` on the validation split: val_recall@1, val_map@r."""
    return f"val_{metric}"


def load_or_create(storage: StudyStorage, name: str, metric: str, sampler=None, pruner=None) -> optuna.Study:
    """The study `name` (created if missing) maximising the validation `metric`, its objective named after it
    (optuna-dashboard and trials_dataframe show the name instead of "Objective 0")."""
    study = optuna.create_study(storage=storage.open(), study_name=name, direction="maximize",
                                sampler=sampler, pruner=pruner, load_if_exists=True)
    with warnings.catch_warnings():  # experimental since Optuna 3.2, and stable in use: no warning at every start
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([objective_name(metric)])
    return study
