"""The main window: launch form (left), live monitor / runs / study / retrieval (centre), the child's log (bottom).

The GUI thread only draws: events are read and parsed by the tail's thread, the stores by each panel's background
calls, the tracking server by the remote poller's thread; params.yaml is read once per change of the file."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from PySide6.QtCore import QSettings, Qt, QTimer, QUrl
from PySide6.QtGui import QAction, QCloseEvent, QDesktopServices
from PySide6.QtWidgets import (
    QComboBox, QDockWidget, QFileDialog, QFrame, QInputDialog, QLabel, QLineEdit, QMainWindow, QMessageBox,
    QPlainTextEdit, QScrollArea, QTabWidget, QToolBar, QVBoxLayout, QWidget,
)

from xbmcore.config import Params

from . import process, theme
from .launch import LaunchForm, format_value, load_base
from .memory_view import MemoryPanel
from .monitor import MonitorPanel
from .retrieval import RetrievalPanel
from .remote import RemoteTail, is_server
from .runs import RunsPanel
from .stores import tracking_uri
from .study import StudyPanel
from .tail import EventTail
from .widgets import ErrorBanner

LOG_LINES = 20_000  # the log view keeps the last lines only, so a chatty child never grows the window's memory


class MainWindow(QMainWindow):
    def __init__(
        self,
        root: Path,
        settings: QSettings | None = None,
        run_command: Callable[[list[str]], list[str]] = process.run_command,
        tune_command: Callable[[list[str]], list[str]] = process.tune_command,
        grace_s: float = 30.0,
        retry_s: float = 10.0,
        follow: Path | None = None,
        remote: RemoteTail | None = None,
    ):
        """root: the project folder (holds params.yaml). run_command / tune_command turn the form's overrides
        into the child's argv (the defaults: `dvc exp run -S ...`, `python -m pipeline.tune -S ...`). remote: the
        tracking-server poller (default: every 2 s)."""
        super().__init__()
        self.root = Path(root).resolve()
        self.settings = settings if settings is not None else QSettings()
        self.run_command, self.tune_command = run_command, tune_command
        self._quit_when_child_ends = False
        self._what = "run"  # what the current child is: "run" or "study"
        self.setWindowTitle(f"XBM — {self.root}")

        self._build_form_dock()
        self._build_centre(retry_s)
        self._build_log_dock()
        self._build_toolbar()
        self._build_status_bar()
        self._build_children(grace_s)
        self._build_followers(remote)

        self._restore()
        if follow is not None:
            self.follow_run(follow)
        else:
            self.follow_action.setChecked(self.settings.value("monitor/follow_latest", True, type=bool))
            if not self.follow_action.isChecked():
                self._follow_toggled(False)
        self.runs.start()
        self.study.start()

    # --- the window's parts (built once, by __init__) ------------------------------------------------------

    def _build_form_dock(self) -> None:
        """The launch form, in a scrollable dock on the left."""
        self.form = LaunchForm(self.root / "params.yaml")
        self.form.run_requested.connect(lambda ov: self.launch(self.run_command(ov), "run"))
        self.form.tune_requested.connect(lambda ov: self.launch(self.tune_command(ov), "study"))
        self.form.stop_requested.connect(self.stop)
        scroll = QScrollArea()
        scroll.setWidget(self.form)
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        self.form_dock = self._dock("Launch", scroll, Qt.DockWidgetArea.LeftDockWidgetArea)

    def _build_centre(self, retry_s: float) -> None:
        """The error banner above the tabs: Live, Runs, Study, Retrieval, Memory."""
        self.banner = ErrorBanner()
        self.monitor = MonitorPanel()
        self.runs = RunsPanel(self._tracking, retry_s=retry_s)
        self.study = StudyPanel(self._study_storage, retry_s=retry_s)
        self.study.use_params.connect(self._use_params)
        self.tabs = QTabWidget()
        self.tabs.addTab(self.monitor, "Live")
        self.tabs.addTab(self.runs, "Runs")
        self.tabs.addTab(self.study, "Study")
        self.retrieval = RetrievalPanel(self.root, self._tracking)
        self.tabs.addTab(self.retrieval, "Retrieval")
        self.memory = MemoryPanel(self.root)  # the memory_view events of the run the Live tab follows
        self.tabs.addTab(self.memory, "Memory")
        self.setAcceptDrops(True)  # an image file dropped anywhere on the window is a Retrieval query
        centre = QWidget()
        cl = QVBoxLayout(centre)
        cl.setContentsMargins(4, 4, 4, 0)
        cl.addWidget(self.banner)
        cl.addWidget(self.tabs, 1)
        self.setCentralWidget(centre)

    def _build_log_dock(self) -> None:
        """The child's log at the bottom, appended once per tick (see _flush_log)."""
        self.log = QPlainTextEdit()
        self.log.setObjectName("logView")
        self.log.setReadOnly(True)
        self.log.setMaximumBlockCount(LOG_LINES)
        self.log.setLineWrapMode(QPlainTextEdit.LineWrapMode.NoWrap)
        self.log_dock = self._dock("Log", self.log, Qt.DockWidgetArea.BottomDockWidgetArea)
        self._log_buffer: list[str] = []
        self._log_timer = QTimer(self)
        self._log_timer.timeout.connect(self._flush_log)
        self._log_timer.start(100)

    def _build_toolbar(self) -> None:
        """Follow latest, open a run folder, the tracking server's runs, the MLflow UI."""
        tb = QToolBar("Main")
        tb.setObjectName("mainToolbar")
        tb.setMovable(False)
        self.addToolBar(tb)
        self.follow_action = QAction("Follow latest run", self, checkable=True)
        self.follow_action.setToolTip("Show the run named in runs/LATEST, whoever started it (e.g. dvc repro)")
        self.follow_action.toggled.connect(self._follow_toggled)
        self.open_action = QAction("Open run folder…", self)
        self.open_action.triggered.connect(self._pick_run)
        self.mlflow_action = QAction("MLflow UI", self)
        self.mlflow_action.setToolTip("Start `mlflow ui` on this project's tracking store and open it")
        self.mlflow_action.triggered.connect(self.open_mlflow_ui)
        for a in (self.follow_action, self.open_action):
            tb.addAction(a)
        tb.addSeparator()
        # A run on another machine, through the tracking server (MLFLOW_TRACKING_URI or "Tracking server…").
        self.server_runs = QComboBox()
        self.server_runs.setMinimumContentsLength(36)
        self.server_runs.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.server_runs.setToolTip("The tracking server's active runs: pick one to follow it live in the Live tab")
        self.server_runs.activated.connect(self._server_run_picked)
        self.server_action = QAction("Tracking server…", self)
        self.server_action.setToolTip("Address of the team's MLflow tracking server (http://host:port), for the "
                                      "Live and Runs tabs; empty: MLFLOW_TRACKING_URI or the project's store")
        self.server_action.triggered.connect(self._ask_server)
        tb.addWidget(QLabel(" Server run "))
        tb.addWidget(self.server_runs)
        tb.addAction(self.server_action)
        tb.addSeparator()
        tb.addAction(self.mlflow_action)

    def _build_status_bar(self) -> None:
        self.child_status = QLabel("idle")
        self.events_status = QLabel()
        self.bad_status = QLabel("malformed lines: 0")
        self.server_status = QLabel()
        self.statusBar().addWidget(self.child_status, 1)
        self.statusBar().addPermanentWidget(self.server_status)
        self.statusBar().addPermanentWidget(self.events_status)
        self.statusBar().addPermanentWidget(self.bad_status)

    def _build_children(self, grace_s: float) -> None:
        """The pipeline run or study the form starts, and `mlflow ui`."""
        self.child = process.ChildProcess(self, grace_s=grace_s)
        self.child.started.connect(lambda cmd: self._log_line(f"$ {cmd}"))
        self.child.output.connect(lambda text, _err: self._log_buffer.append(text))
        self.child.finished.connect(self._child_finished)
        self.child.failed_to_start.connect(self._child_failed_to_start)
        self.mlflow_ui = process.MlflowUi(self)
        self.mlflow_ui.message.connect(lambda m: self.statusBar().showMessage(m, 10_000))

    def _build_followers(self, remote: RemoteTail | None) -> None:
        """The event tail (a local run) and the server poller (a remote run): the Live tab shows one."""
        self._source = "local"
        self._remote_choice: str = ""        # the server run followed ("" = the newest active one)
        self._server_listed: list = []       # the server's active runs, as last listed
        self.tail = EventTail(parent=self)
        self.tail.switched.connect(lambda path: self._source == "local" and self._switched(path))
        self.tail.batch.connect(lambda b: self._source == "local" and self.monitor.add_batch(b))
        self.tail.batch.connect(lambda b: self._source == "local" and self.memory.add_batch(b))
        self.tail.bad_lines.connect(self._bad_lines)
        self.tail.waiting.connect(lambda text: self._source == "local" and self.monitor.set_waiting(text))
        self.remote = remote if remote is not None else RemoteTail()
        self.remote.setParent(self)
        self.remote.runs.connect(self._server_runs_listed)
        self.remote.switched.connect(lambda what: self._source == "remote" and self._switched(what))
        self.remote.batch.connect(lambda b: self._source == "remote" and self.monitor.add_batch(b))
        self.remote.batch.connect(lambda b: self._source == "remote" and self.memory.add_batch(b))
        self.remote.health.connect(self._server_health)
        self.remote.set_server(self.server_uri())
        self._set_server_combo([])

    def _dock(self, title: str, widget: QWidget, area: Qt.DockWidgetArea) -> QDockWidget:
        dock = QDockWidget(title, self)
        dock.setObjectName(f"dock{title}")
        dock.setWidget(widget)
        dock.setFeatures(QDockWidget.DockWidgetFeature.DockWidgetMovable
                         | QDockWidget.DockWidgetFeature.DockWidgetFloatable)
        self.addDockWidget(area, dock)
        return dock

    # --- params and stores --------------------------------------------------------------------------------

    def params(self) -> Params:
        return load_base(self.root / "params.yaml")[1]

    def runs_dir(self) -> Path:
        return self.root / self.params().tracking.runs_dir

    def _tracking(self) -> tuple[str, str]:
        p = self.params()
        return self.settings.value("remote/uri", "") or tracking_uri(p, self.root), p.tracking.experiment

    def server_uri(self) -> str | None:
        """The tracking server to list and follow runs on: the one set in the window, else MLFLOW_TRACKING_URI
        or tracking.uri when it is a server (http/https)."""
        uri = self.settings.value("remote/uri", "") or os.environ.get("MLFLOW_TRACKING_URI") or \
            self.params().tracking.uri
        return uri if is_server(uri) else None

    def _study_storage(self) -> tuple[str | None, Path, str]:
        p = self.params()
        return p.tune.storage, self.root, p.tune.study_name

    def _use_params(self, params: dict) -> None:
        self.form.set_values({k: format_value(v) for k, v in params.items()})
        self.form_dock.show()
        self.statusBar().showMessage(f"launch form: {len(params)} params from the best trial", 10_000)

    # --- following runs -----------------------------------------------------------------------------------

    def _follow_toggled(self, on: bool) -> None:
        if on:
            self._follow_local()
            self.tail.follow_latest(self.runs_dir())
            self.events_status.setText(f"following {self.runs_dir() / 'LATEST'}")

    def follow_run(self, path: Path) -> None:
        """Show one run folder (or events file) instead of the latest run."""
        self.follow_action.blockSignals(True)
        self.follow_action.setChecked(False)
        self.follow_action.blockSignals(False)
        self._follow_local()
        self.tail.follow_file(Path(path))
        self.tabs.setCurrentWidget(self.monitor)

    def _follow_local(self) -> None:
        if self._source == "remote":
            self._source = "local"
            self.remote.unfollow()
            self.server_runs.setCurrentIndex(0)

    # --- following a run through the tracking server ------------------------------------------------------

    def follow_remote(self, run_id: str = "") -> None:
        """Show a run of the tracking server ("" follows the newest active run) instead of a local one."""
        if self.remote.uri is None:
            self.statusBar().showMessage("no tracking server: set MLFLOW_TRACKING_URI or use Tracking server…",
                                         10_000)
            return
        self.follow_action.blockSignals(True)
        self.follow_action.setChecked(False)
        self.follow_action.blockSignals(False)
        self._source, self._remote_choice = "remote", run_id
        self.remote.follow(run_id)
        self._set_server_combo(self._server_listed)
        self.tabs.setCurrentWidget(self.monitor)

    def _server_run_picked(self, index: int) -> None:
        run_id = self.server_runs.itemData(index)
        if run_id is None:  # "local runs"
            self.follow_action.setChecked(True)
        else:
            self.follow_remote(run_id)

    def _set_server_combo(self, runs: list) -> None:
        current = self._remote_choice if self._source == "remote" else None
        self.server_runs.blockSignals(True)
        self.server_runs.clear()
        self.server_runs.addItem("— local runs (runs/LATEST) —", None)
        if self.remote.uri:
            self.server_runs.addItem(f"newest active run on {self.remote.uri}", "")
        for r in runs:
            self.server_runs.addItem(r.label(), r.run_id)
        known = [self.server_runs.itemData(i) for i in range(self.server_runs.count())]
        if current and current not in known:  # the followed run ended: keep it selected
            self.server_runs.addItem(f"run {current} (not active)", current)
            known.append(current)
        self.server_runs.setCurrentIndex(known.index(current) if current in known else 0)
        self.server_runs.setEnabled(self.remote.uri is not None)
        self.server_runs.blockSignals(False)

    def _server_runs_listed(self, runs: list) -> None:
        self._server_listed = runs
        self._set_server_combo(runs)

    def _server_health(self, ok: bool, text: str) -> None:
        self.server_status.setText(text if ok else "⚠ " + text)
        self.server_status.setStyleSheet("" if ok else f"color: {theme.WARN};")

    def _ask_server(self) -> None:
        uri, ok = QInputDialog.getText(self, "Tracking server", "MLflow tracking server (http://host:port); "
                                       "empty: MLFLOW_TRACKING_URI or the project's store",
                                       QLineEdit.EchoMode.Normal, self.settings.value("remote/uri", ""))
        if ok:
            self.set_server(uri.strip())

    def set_server(self, uri: str) -> None:
        if uri and not is_server(uri):
            self.statusBar().showMessage(f"not a server address: {uri!r} (expected http://host:port)", 10_000)
            return
        self.settings.setValue("remote/uri", uri.rstrip("/"))
        self.remote.set_server(self.server_uri())
        self._set_server_combo([])
        if self.remote.uri is None:
            self.server_status.setText("")
            if self._source == "remote":
                self.follow_action.setChecked(True)
        self.runs.refresh()

    def _pick_run(self) -> None:
        start = str(self.runs_dir() if self.runs_dir().is_dir() else self.root)
        folder = QFileDialog.getExistingDirectory(self, "Open a run folder (holds events.jsonl)", start)
        if folder:
            self.follow_run(Path(folder))

    def _switched(self, path: str) -> None:
        self.monitor.reset(path)
        self.memory.reset(path)
        self.events_status.setText(f"events: {path}")

    def _bad_lines(self, n: int) -> None:
        self.bad_status.setText(f"malformed lines: {n}")
        self.bad_status.setStyleSheet(f"color: {theme.WARN};" if n else "")
        self.bad_status.setToolTip("Lines of events.jsonl that are not valid events were skipped"
                                   if n else "")

    # --- children -----------------------------------------------------------------------------------------

    def launch(self, argv: list[str], what: str) -> bool:
        if self.child.is_running():
            self.statusBar().showMessage("a child is already running: stop it first", 5000)
            return False
        self.save_settings()
        self.banner.hide()
        self._what = what
        if not self.child.start(argv, self.root):
            return False
        self.form.set_running(True)
        self.child_status.setText(f"{what} running (pid {self.child.pid()}): {self.child.command}")
        if what == "run" and self.follow_action.isChecked():
            self.tabs.setCurrentWidget(self.monitor)
        return True

    def stop(self) -> None:
        if self.child.is_running():
            self._log_line(f"# stop requested: SIGINT now, SIGTERM after {self.child.grace_s:g} s, then SIGKILL")
            self.child_status.setText(f"stopping {self._what}: the current step finishes and its checkpoint is kept")
            self.child.stop()

    def _child_finished(self, code: int, stopped: bool, stderr_tail: str) -> None:
        self._flush_log()
        self.form.set_running(False)
        what = self._what
        if stopped:
            text = f"{what} stopped (exit code {code})"
        elif code == 0:
            text = f"{what} finished"
        else:
            text = f"{what} failed with exit code {code}"
            self.banner.show_error(f"`{self.child.command}` exited with code {code}",
                                   stderr_tail or "(nothing on stderr)")
        self.child_status.setText(text)
        self._log_line(f"# {text}")
        self.runs.refresh()
        self.retrieval.refresh()  # a finished run has logged its model
        if self._quit_when_child_ends:
            self.close()

    def _child_failed_to_start(self, message: str) -> None:
        self.form.set_running(False)
        self.banner.show_error("Could not start the child process", message)
        self.child_status.setText("idle")

    def open_mlflow_ui(self) -> None:
        uri = self._tracking()[0]
        if is_server(uri):  # a tracking server serves its own UI
            QDesktopServices.openUrl(QUrl(uri))
            self.statusBar().showMessage(f"opened {uri}", 10_000)
            return
        self.mlflow_ui.open(uri, self.root)

    def dragEnterEvent(self, event) -> None:  # noqa: N802 (a drop outside the tab: the tab takes it)
        self.retrieval.dragEnterEvent(event)

    def dropEvent(self, event) -> None:  # noqa: N802
        self.tabs.setCurrentWidget(self.retrieval)
        self.retrieval.dropEvent(event)

    # --- log ----------------------------------------------------------------------------------------------

    def _log_line(self, line: str) -> None:
        self._log_buffer.append(line)

    def _flush_log(self) -> None:
        if self._log_buffer:
            # one append per tick, whatever the child prints
            text = "\n".join(self._log_buffer)
            self._log_buffer.clear()
            self.log.appendPlainText(text)

    # --- settings -----------------------------------------------------------------------------------------

    def _values_key(self) -> str:
        return "launch/" + str(self.root).replace("/", "|")  # QSettings treats / as a group separator

    def _restore(self) -> None:
        geometry = self.settings.value("window/geometry")
        if geometry is not None:
            self.restoreGeometry(geometry)
        else:
            self.resize(1500, 950)
        state = self.settings.value("window/state")
        if state is not None:
            self.restoreState(state)
        else:
            self.resizeDocks([self.form_dock], [330], Qt.Orientation.Horizontal)
            self.resizeDocks([self.log_dock], [170], Qt.Orientation.Vertical)
        self.tabs.setCurrentIndex(int(self.settings.value("window/tab", 0)))
        self.monitor.smoothing.setCurrentIndex(int(self.settings.value("monitor/smoothing", 2)))
        values = self.settings.value(self._values_key())
        if values:
            try:
                self.form.set_values(json.loads(values))
            except (ValueError, TypeError):
                pass  # settings from an older version: keep params.yaml's values

    def save_settings(self) -> None:
        self.settings.setValue("window/geometry", self.saveGeometry())
        self.settings.setValue("window/state", self.saveState())
        self.settings.setValue("window/tab", self.tabs.currentIndex())
        self.settings.setValue("monitor/follow_latest", self.follow_action.isChecked())
        self.settings.setValue("monitor/smoothing", self.monitor.smoothing.currentIndex())
        self.settings.setValue(self._values_key(), json.dumps(self.form.state()))
        self.settings.sync()

    def closeEvent(self, event: QCloseEvent) -> None:
        if self.child.is_running() and not self._quit_when_child_ends:
            answer = QMessageBox.question(
                self, "A child is running",
                f"{self.child.command}\n\nStop it and quit? It finishes its step and keeps its checkpoint.",
            )
            if answer == QMessageBox.StandardButton.Yes:
                self._quit_when_child_ends = True
                self.stop()
            event.ignore()
            return
        self.save_settings()
        self.tail.shutdown()
        self.remote.shutdown()
        self.runs.shutdown()
        self.study.shutdown()
        self.retrieval.shutdown()
        self.memory.shutdown()
        self.mlflow_ui.shutdown()
        super().closeEvent(event)
