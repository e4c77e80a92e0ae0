"""Child processes of the window: a pipeline run, a study, the MLflow UI.

QProcess keeps them off the GUI thread (its pipes are read by the event loop), and the MLflow UI's port is probed
with QTcpSocket, whose connection attempt is answered in the event loop too: the GUI thread never waits on either. Each child starts in a new
session, so Stop reaches the whole process tree (`dvc` and the stage it runs) at once:

  1. SIGINT to the group, what Ctrl-C does in a terminal: DVC ignores it while its stage runs and waits for the
     stage; the stage finishes its step, keeps its checkpoint and exits; DVC then exits and releases its locks.
     (SIGTERM would end `dvc` itself at once, leaving the stage orphaned and DVC's lock state to clean up.)
  2. SIGTERM to the group after `grace_s`, for a child that ignored SIGINT.
  3. SIGKILL after another `grace_s`.
"""
from __future__ import annotations

import os
import shlex
import signal
import socket
import sys
import time
from collections import deque
from pathlib import Path

from PySide6.QtCore import QObject, QProcess, QProcessEnvironment, QTimer, QUrl, Signal
from PySide6.QtGui import QDesktopServices
from PySide6.QtNetwork import QTcpSocket

STDERR_TAIL_LINES = 20


def run_command(overrides: list[str]) -> list[str]:
    """A pipeline run with the form's overrides: `dvc exp run -S key=value ...` (DVC of this interpreter)."""
    return [sys.executable, "-m", "dvc", "exp", "run", *[a for o in overrides for a in ("-S", o)]]


def tune_command(overrides: list[str]) -> list[str]:
    """An Optuna study with the form's overrides as its fixed params."""
    return [sys.executable, "-m", "pipeline.tune", *[a for o in overrides for a in ("-S", o)]]


def format_command(argv: list[str]) -> str:
    """The command as a person would type it (`dvc ...`, `python -m ...`), for the log and the form."""
    if argv[0] == sys.executable:
        argv = ["dvc", *argv[3:]] if argv[1:3] == ["-m", "dvc"] else ["python", *argv[1:]]
    return shlex.join(argv)


class ChildProcess(QObject):
    """One child at a time, its output streamed line by line, its end reported with the exit code.

    finished(exit_code, stopped, stderr_tail): stopped is True when the user asked it to stop; exit_code is
    -signal when a signal ended it.
    """

    started = Signal(str)                 # the command line
    output = Signal(str, bool)            # text, is_stderr
    finished = Signal(int, bool, str)
    failed_to_start = Signal(str)

    def __init__(self, parent: QObject | None = None, grace_s: float = 30.0):
        super().__init__(parent)
        self.grace_s = grace_s
        self._proc: QProcess | None = None
        self._stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self._partial = {False: "", True: ""}
        self._stopping = False
        self._escalate = QTimer(self)
        self._escalate.setSingleShot(True)
        self._escalate.timeout.connect(self._next_signal)
        self._signals: list[int] = []
        self.command = ""

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.state() != QProcess.ProcessState.NotRunning

    def pid(self) -> int | None:
        return int(self._proc.processId()) if self.is_running() else None

    def start(self, argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> bool:
        if self.is_running():
            raise RuntimeError("a child process is already running; stop it first")
        if self._proc is not None:
            self._proc.deleteLater()  # the previous child's QProcess, finished
        proc = QProcess(self)
        proc.setWorkingDirectory(str(cwd))
        penv = QProcessEnvironment.systemEnvironment()
        penv.insert("PYTHONUNBUFFERED", "1")  # the log view shows lines as they are printed
        # DVC runs each stage's `python -m pipeline.<stage>` through the shell: put this interpreter's
        # environment first on PATH, as an activated virtualenv would (xbm-gui may start without one)
        bindir = os.path.dirname(sys.executable)
        penv.insert("PATH", os.pathsep.join([bindir, penv.value("PATH", os.defpath)]))
        if sys.prefix != sys.base_prefix:
            penv.insert("VIRTUAL_ENV", sys.prefix)
        for k, v in (env or {}).items():
            penv.insert(k, v)
        proc.setProcessEnvironment(penv)
        proc.setUnixProcessParameters(QProcess.UnixProcessFlag.CreateNewSession)  # its own process group
        proc.readyReadStandardOutput.connect(lambda: self._read(False))
        proc.readyReadStandardError.connect(lambda: self._read(True))
        proc.finished.connect(self._on_finished)
        proc.errorOccurred.connect(self._on_error)
        self._proc = proc
        self._stderr_tail.clear()
        self._partial = {False: "", True: ""}
        self._stopping = False
        self.command = format_command(argv)
        proc.start(argv[0], argv[1:])
        if not proc.waitForStarted(10_000):
            return False  # _on_error reported it
        self.started.emit(self.command)
        return True

    def stop(self) -> None:
        """Ask the child to stop cleanly, escalating after the grace period (see the module notes)."""
        if not self.is_running() or self._stopping:
            return
        self._stopping = True
        self._signals = [signal.SIGINT, signal.SIGTERM, signal.SIGKILL]
        self._next_signal()

    def _next_signal(self) -> None:
        if not self.is_running() or not self._signals:
            return
        sig = self._signals.pop(0)
        self._signal_group(sig)
        if self._signals:
            self._escalate.start(int(self.grace_s * 1000))

    def _signal_group(self, sig: int) -> None:
        pid = self.pid()
        if pid is None:
            return
        try:
            os.killpg(pid, sig)  # the child leads its own session, so its group is its whole tree
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def _read(self, is_err: bool) -> None:
        proc = self._proc
        raw = proc.readAllStandardError() if is_err else proc.readAllStandardOutput()
        text = self._partial[is_err] + bytes(raw.data()).decode("utf-8", errors="replace")
        # \r-redrawn progress lines count as lines too
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        *lines, self._partial[is_err] = text.split("\n")
        if is_err:
            self._stderr_tail.extend(ln for ln in lines if ln.strip())
        if lines:
            self.output.emit("\n".join(lines), is_err)

    def _flush_partial(self) -> None:
        for is_err in (False, True):
            rest = self._partial[is_err]
            if rest:
                self._partial[is_err] = ""
                if is_err:
                    self._stderr_tail.append(rest)
                self.output.emit(rest, is_err)

    def _on_finished(self, code: int, status: QProcess.ExitStatus) -> None:
        self._escalate.stop()
        self._read(False)
        self._read(True)
        self._flush_partial()
        if status == QProcess.ExitStatus.CrashExit:
            code = -abs(code) if code else -1  # on Unix QProcess gives the signal number; report -N like Popen
        self.finished.emit(int(code), self._stopping, "\n".join(self._stderr_tail))

    def _on_error(self, err: QProcess.ProcessError) -> None:
        if err == QProcess.ProcessError.FailedToStart:
            msg = f"could not start `{self.command}`: {self._proc.errorString()}"
            self.failed_to_start.emit(msg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlflow_ui_command(backend_store_uri: str, port: int) -> list[str]:
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", backend_store_uri,
            "--host", "127.0.0.1", "--port", str(port)]


class MlflowUi(QObject):
    """`mlflow ui` as a child of the window, on a free port; opens the browser once the server answers."""

    message = Signal(str)
    opened = Signal(str)  # the URL handed to the browser

    def __init__(self, parent: QObject | None = None, command=mlflow_ui_command, timeout_s: float = 60.0):
        super().__init__(parent)
        self._command = command
        self._timeout_s = timeout_s
        self._proc: QProcess | None = None
        self._port = 0
        self._last_output = ""
        self.url: str | None = None
        self._knock: QTcpSocket | None = None  # the connection attempt in flight
        self._probe = QTimer(self)
        self._probe.setInterval(300)
        self._probe.timeout.connect(self._check)
        self._started_at = 0.0

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.state() != QProcess.ProcessState.NotRunning

    def open(self, backend_store_uri: str, cwd: Path) -> None:
        if self.is_running():
            self._open_browser()
            return
        self._port = free_port()
        self.url = f"http://127.0.0.1:{self._port}"
        self._proc = QProcess(self)
        self._proc.setWorkingDirectory(str(cwd))
        self._proc.setProcessChannelMode(QProcess.ProcessChannelMode.MergedChannels)
        self._proc.readyReadStandardOutput.connect(self._drain)
        self._proc.finished.connect(self._on_finished)
        argv = self._command(backend_store_uri, self._port)
        self._proc.start(argv[0], argv[1:])
        self._started_at = time.monotonic()
        self._probe.start()
        self.message.emit(f"starting mlflow ui on {self.url} ({backend_store_uri})")

    def _drain(self) -> None:
        text = bytes(self._proc.readAllStandardOutput().data()).decode(errors="replace")
        self._last_output = (self._last_output + text)[-2000:]

    def _check(self) -> None:
        """Knock on the port without waiting: QTcpSocket connects in the event loop, and its answer (connected, or
        refused) comes back as a signal. One knock at a time."""
        if self._knock is not None:
            return
        self._knock = sock = QTcpSocket(self)
        sock.connected.connect(self._answered)
        sock.errorOccurred.connect(self._not_yet)
        sock.connectToHost("127.0.0.1", self._port)

    def _end_knock(self) -> None:
        sock, self._knock = self._knock, None
        if sock is not None:
            sock.abort()
            sock.deleteLater()

    def _answered(self) -> None:
        self._end_knock()
        if self._probe.isActive():
            self._probe.stop()
            self._open_browser()

    def _not_yet(self, _error=None) -> None:
        self._end_knock()
        if self._probe.isActive() and time.monotonic() - self._started_at > self._timeout_s:
            self._probe.stop()
            self.message.emit(f"mlflow ui did not answer within {self._timeout_s:g} s")

    def _open_browser(self) -> None:
        self.message.emit(f"mlflow ui at {self.url}")
        QDesktopServices.openUrl(QUrl(self.url))
        self.opened.emit(self.url)

    def _on_finished(self, code: int, _status) -> None:
        self._probe.stop()
        self._end_knock()
        tail = self._last_output.strip().splitlines()[-3:]
        self.message.emit(f"mlflow ui exited with code {code}" + (f": {' / '.join(tail)}" if tail else ""))

    def shutdown(self) -> None:
        if self.is_running():
            self._proc.terminate()
            if not self._proc.waitForFinished(3000):
                self._proc.kill()
                self._proc.waitForFinished(1000)
