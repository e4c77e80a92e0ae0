"""The Optuna study: its trials (state, value, params), the best params, and the value per trial.

Read from the study storage in a background thread; a missing or locked storage is said and retried.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QComboBox, QHBoxLayout, QHeaderView, QLabel, QPushButton, QSplitter, QTableWidget, QTableWidgetItem,
    QVBoxLayout, QWidget,
)

from . import theme
from .monitor import fmt_duration
from .stores import StudyInfo, describe_error, fetch_study
from .widgets import ElidedLabel
from .worker import PollingPanel

STATE_COLORS = {"COMPLETE": theme.OK, "PRUNED": theme.FG_DIM, "FAIL": theme.ERROR, "RUNNING": theme.ACCENT}


class _NumItem(QTableWidgetItem):
    """Shows formatted text, sorts by the number kept in UserRole."""

    def __lt__(self, other: QTableWidgetItem) -> bool:
        a, b = self.data(Qt.ItemDataRole.UserRole), other.data(Qt.ItemDataRole.UserRole)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            return a < b
        return self.text() < other.text()


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class StudyPanel(PollingPanel):
    use_params = Signal(dict)  # the best trial's params (dotted keys), for the launch form
    def __init__(self, storage_source: Callable[[], tuple[str | None, Path, str]], retry_s: float = 10.0,
                 parent: QWidget | None = None):
        """storage_source() -> (tune.storage, project root, tune.study_name), asked at each refresh."""
        super().__init__("optuna-study", retry_s, parent)
        self._source = storage_source
        self._chosen: str | None = None

        self.state_label = ElidedLabel("not loaded yet")
        self.state_label.setObjectName("dimLabel")
        self.study_combo = QComboBox()
        self.study_combo.setMinimumContentsLength(12)
        self.study_combo.textActivated.connect(self._choose)
        refresh = QPushButton("Refresh")
        refresh.clicked.connect(self.refresh)
        top = QHBoxLayout()
        top.addWidget(QLabel("Study"))
        top.addWidget(self.study_combo)
        top.addWidget(self.state_label, 1)
        top.addWidget(refresh)

        self.best_label = QLabel()
        self.best_label.setWordWrap(True)
        self.best_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.use_button = QPushButton("Use best params in the form")
        self.use_button.setToolTip("Copy the best trial's params into the launch form, to run them in full")
        self.use_button.setEnabled(False)
        self.use_button.clicked.connect(lambda: self._best and self.use_params.emit(dict(self._best.params)))
        self._best = None
        best_row = QHBoxLayout()
        best_row.addWidget(self.best_label, 1)
        best_row.addWidget(self.use_button)

        self.table = QTableWidget(0, 4)
        self.table.setSortingEnabled(True)
        self.table.setAlternatingRowColors(True)
        self.table.verticalHeader().hide()
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)

        self.plot = pg.PlotWidget(background=theme.PLOT_BG, title="Objective per trial")
        self.plot.showGrid(x=True, y=True, alpha=0.15)
        self.plot.setLabel("bottom", "trial")
        self.legend = self.plot.addLegend(offset=(-8, 8), labelTextColor=theme.FG, brush=theme.LEGEND_BG)
        self.points = pg.ScatterPlotItem(size=8, pen=None, brush=pg.mkBrush(theme.CURVES["val"]), name="trial")
        self.best_line = pg.PlotDataItem(pen=pg.mkPen(theme.OK, width=2), stepMode=None, name="best so far")
        self.plot.addItem(self.points)
        self.plot.addItem(self.best_line)

        split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(self.table)
        split.addWidget(self.plot)
        split.setSizes([350, 250])
        lay = QVBoxLayout(self)
        lay.addLayout(top)
        lay.addLayout(best_row)
        lay.addWidget(split, 1)


    def _choose(self, name: str) -> None:
        self._chosen = name
        self.refresh()

    def refresh(self) -> None:
        if self._calls.busy():
            return
        spec, root, default_name = self._source()
        self._calls.call(fetch_study, (spec, root, self._chosen or default_name), self._show, self._failed)

    def _failed(self, err: Exception) -> None:
        self.state_label.setText(f"Study unavailable: {describe_error(err)}. Retrying every {self.retry_s:g} s.")
        self.state_label.setProperty("error", True)
        self.state_label.style().polish(self.state_label)

    def _show(self, info: StudyInfo) -> None:
        self.state_label.setProperty("error", False)
        self.state_label.style().polish(self.state_label)
        if [self.study_combo.itemText(i) for i in range(self.study_combo.count())] != info.names:
            self.study_combo.clear()
            self.study_combo.addItems(info.names)
        self.study_combo.setCurrentText(info.name)
        counts: dict[str, int] = {}
        for t in info.trials:
            counts[t.state] = counts.get(t.state, 0) + 1
        summary = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
        self.state_label.setText(f"{len(info.trials)} trials ({summary}) · {info.direction} · {info.storage} · "
                                 f"updated {time.strftime('%H:%M:%S')}")
        self._best = info.best
        self.use_button.setEnabled(info.best is not None)
        if info.best is not None:
            params = ", ".join(f"{k} = {_fmt(v)}" for k, v in sorted(info.best.params.items()))
            self.best_label.setText(f"<b>Best:</b> trial {info.best.number}, value {info.best.value:.4f}"
                                    f"<br><b>Params:</b> {params}")
        else:
            self.best_label.setText("No complete trial yet.")

        names = sorted({k for t in info.trials for k in t.params})
        headers = ["Trial", "State", "Value", "Duration", *names]
        self.table.setSortingEnabled(False)
        self.table.clear()
        self.table.setColumnCount(len(headers))
        self.table.setHorizontalHeaderLabels(headers)
        self.table.setRowCount(len(info.trials))
        for row, t in enumerate(info.trials):
            cells = [t.number, t.state.lower(), t.value, fmt_duration(t.duration_s) if t.duration_s else "",
                     *(t.params.get(n) for n in names)]
            for col, v in enumerate(cells):
                it = _NumItem("" if v is None else _fmt(v))
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    it.setData(Qt.ItemDataRole.UserRole, v)
                if col == 1:
                    it.setForeground(pg.mkColor(STATE_COLORS.get(t.state, theme.FG)))
                if info.best is not None and t.number == info.best.number:
                    f = it.font()
                    f.setBold(True)
                    it.setFont(f)
                self.table.setItem(row, col, it)
        self.table.setSortingEnabled(True)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)

        done = [t for t in info.trials if t.value is not None]
        x = np.array([t.number for t in done], float)
        y = np.array([t.value for t in done], float)
        self.points.setData(x, y)
        acc = np.maximum.accumulate if info.direction == "maximize" else np.minimum.accumulate
        complete = [t for t in done if t.state == "COMPLETE"]
        if complete:
            bx = np.array([t.number for t in complete], float)
            self.best_line.setData(bx, acc(np.array([t.value for t in complete], float)))
        else:
            self.best_line.setData([], [])
        self.plot.setLabel("left", "objective")

