"""Follow a run's events.jsonl from a worker thread, so a large file or a slow disk never blocks the window.

The worker polls `xbmcore.events.EventReader` on a timer, turns what it read into `EventBatch`es (the per-event
Python work), and hands them to the GUI thread through queued signals. It follows either one events file, or
`<runs_dir>/LATEST` (the run key of the most recently started stage), switching files when LATEST changes.
"""
from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QObject, QThread, QTimer, Signal, Slot

from xbmcore.events import EventReader

from .series import EventBatch

EVENTS_FILE = "events.jsonl"
LATEST_FILE = "LATEST"
CHUNK = 20_000  # events per batch: a huge backlog reaches the plots in slices, not one long stall


def resolve_latest(runs_dir: Path) -> Path | None:
    """events.jsonl of the run named in runs_dir/LATEST, or None while there is none."""
    try:
        key = (runs_dir / LATEST_FILE).read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return runs_dir / key / EVENTS_FILE if key else None


def events_path(target: Path) -> Path:
    """A run folder or an events file, as picked by the user -> the events file."""
    return target / EVENTS_FILE if target.is_dir() else target


class PollingWorker(QObject):
    """A worker-thread object that calls `poll` every `interval_ms` (the event-file and tracking-server tails)."""

    def __init__(self, interval_ms: int):
        super().__init__()
        self._interval_ms = interval_ms
        self._timer: QTimer | None = None

    @Slot()
    def start(self) -> None:
        self._timer = QTimer(self)  # created here so it lives in the worker thread
        self._timer.timeout.connect(self.poll)
        self._timer.start(self._interval_ms)

    @Slot()
    def stop(self) -> None:
        if self._timer is not None:
            self._timer.stop()

    def poll(self) -> None:
        raise NotImplementedError


class _TailWorker(PollingWorker):
    switched = Signal(str)       # now reading this file (the plots restart)
    batch = Signal(object)       # EventBatch
    bad_lines = Signal(int)      # malformed lines skipped so far in this file
    waiting = Signal(str)        # nothing to read yet, and why

    def __init__(self, interval_ms: int):
        super().__init__(interval_ms)
        self._runs_dir: Path | None = None   # following LATEST when set
        self._file: Path | None = None       # following one file when set
        self._reader: EventReader | None = None
        self._phase: str | None = None
        self._bad = 0
        self._waiting_for: str | None = None

    @Slot(str)
    def follow_latest(self, runs_dir: str) -> None:
        self._runs_dir, self._file = Path(runs_dir), None
        self._open(None)
        self.poll()

    @Slot(str)
    def follow_file(self, path: str) -> None:
        self._runs_dir, self._file = None, Path(path)
        self._open(None)
        self.poll()

    def _open(self, path: Path | None) -> None:
        self._reader = EventReader(path) if path is not None else None
        self._phase = None
        self._bad = 0
        if path is not None:
            self.switched.emit(str(path))
            self.bad_lines.emit(0)

    def _wait(self, text: str) -> None:
        if text != self._waiting_for:  # say it once, not at every poll
            self._waiting_for = text
            self.waiting.emit(text)

    @Slot()
    def poll(self) -> None:
        target = self._file if self._file is not None else (
            resolve_latest(self._runs_dir) if self._runs_dir is not None else None)
        if target is None:
            if self._runs_dir is not None:
                self._wait(f"waiting for a run: no {self._runs_dir / LATEST_FILE} yet")
            return
        if self._reader is None or self._reader.path != target:
            self._open(target)
        try:
            size = target.stat().st_size
        except FileNotFoundError:
            self._wait(f"waiting for {target}")
            return
        self._waiting_for = None
        if size < self._reader.offset:  # file replaced or truncated: start over
            self._open(target)
        events = self._reader.poll()
        for i in range(0, len(events), CHUNK):
            b = EventBatch.from_events(events[i:i + CHUNK], self._phase)
            self._phase = b.last_phase
            self.batch.emit(b)
        if self._reader.bad_lines != self._bad:
            self._bad = self._reader.bad_lines
            self.bad_lines.emit(self._bad)


class EventTail(QObject):
    """GUI-thread handle on the tail worker: call follow_latest / follow_file, connect to the signals."""

    switched = Signal(str)
    batch = Signal(object)
    bad_lines = Signal(int)
    waiting = Signal(str)
    _follow_latest = Signal(str)
    _follow_file = Signal(str)
    _stop = Signal()

    def __init__(self, interval_ms: int = 200, parent: QObject | None = None):
        super().__init__(parent)
        self._thread = QThread()
        self._thread.setObjectName("event-tail")
        self._worker = _TailWorker(interval_ms)
        self._worker.moveToThread(self._thread)
        self._thread.started.connect(self._worker.start)
        self._thread.finished.connect(self._worker.deleteLater)
        for name in ("switched", "batch", "bad_lines", "waiting"):
            getattr(self._worker, name).connect(getattr(self, name))
        self._follow_latest.connect(self._worker.follow_latest)
        self._follow_file.connect(self._worker.follow_file)
        self._stop.connect(self._worker.stop)
        self._thread.start()

    def follow_latest(self, runs_dir: Path) -> None:
        self._follow_latest.emit(str(runs_dir))

    def follow_file(self, path: Path) -> None:
        self._follow_file.emit(str(events_path(Path(path))))

    def shutdown(self) -> None:
        if self._thread.isRunning():
            self._stop.emit()
            self._thread.quit()
            self._thread.wait(5000)
