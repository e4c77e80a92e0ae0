"""Run slow calls (MLflow, Optuna, their database files, a model's embeddings) in a background thread of their own
(one per BackgroundCalls), results back in the GUI thread."""
from __future__ import annotations

import itertools
import traceback
from typing import Any, Callable

from PySide6.QtCore import QObject, QThread, QTimer, Signal, Slot
from PySide6.QtWidgets import QWidget


class _Runner(QObject):
    done = Signal(int, object, object)  # token, result, error (an exception or None)

    @Slot(int, object)
    def run(self, token: int, call: Any) -> None:
        fn, args = call
        try:
            self.done.emit(token, fn(*args), None)
        except Exception as err:  # reported to the caller's on_error; the thread keeps serving
            err.__traceback_text__ = traceback.format_exc()
            self.done.emit(token, None, err)


class BackgroundCalls(QObject):
    """Calls run one at a time, in order, in a thread of their own (a SQLite store then sees one reader)."""

    _submit = Signal(int, object)

    def __init__(self, name: str, parent: QObject | None = None):
        super().__init__(parent)
        self._thread = QThread()
        self._thread.setObjectName(name)
        self._runner = _Runner()
        self._runner.moveToThread(self._thread)
        self._thread.finished.connect(self._runner.deleteLater)
        self._submit.connect(self._runner.run)
        self._runner.done.connect(self._done)
        self._pending: dict[int, tuple[Callable, Callable]] = {}
        self._tokens = itertools.count()
        self._thread.start()

    def busy(self) -> bool:
        return bool(self._pending)

    def call(self, fn: Callable, args: tuple, on_done: Callable[[Any], None],
             on_error: Callable[[Exception], None]) -> None:
        token = next(self._tokens)
        self._pending[token] = (on_done, on_error)
        self._submit.emit(token, (fn, args))

    @Slot(int, object, object)
    def _done(self, token: int, result: Any, error: Any) -> None:
        on_done, on_error = self._pending.pop(token)
        if error is None:
            on_done(result)
        else:
            on_error(error)

    def shutdown(self) -> None:
        if self._thread.isRunning():
            self._thread.quit()
            self._thread.wait(10_000)


class PollingPanel(QWidget):
    """A panel that reads a store through its own BackgroundCalls: `refresh()` now, then every `retry_s`
    (a live view, and a retry while the store is missing or locked). Subclasses implement `refresh`."""

    def __init__(self, thread_name: str, retry_s: float, parent: QWidget | None = None):
        super().__init__(parent)
        self.retry_s = retry_s
        self._calls = BackgroundCalls(thread_name, self)
        self._timer = QTimer(self)
        self._timer.timeout.connect(self.refresh)

    def refresh(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self.refresh()
        self._timer.start(int(self.retry_s * 1000))

    def shutdown(self) -> None:
        self._timer.stop()
        self._calls.shutdown()

    def closeEvent(self, event) -> None:  # shown on its own (tests, a floating panel)
        self.shutdown()
        super().closeEvent(event)
