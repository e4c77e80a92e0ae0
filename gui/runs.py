"""Past runs from MLflow: a table (trials nested under their study's run) and an overlay of chosen runs' curves.

All store access happens in a background thread. A missing or locked store is said in the panel and retried
on a timer; the window never waits for it.
"""
from __future__ import annotations

import time
from datetime import datetime
from typing import Callable

import pyqtgraph as pg
from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import (
    QAbstractItemView, QComboBox, QHBoxLayout, QHeaderView, QLabel, QPushButton, QSplitter, QTreeWidget,
    QTreeWidgetItem, QVBoxLayout, QWidget,
)

from . import theme
from .monitor import SMOOTHING_CHOICES, make_curve
from .series import moving_average
from .stores import KEY_PARAMS, RunRow, describe_error, fetch_histories, fetch_runs, mlflow_metric
from .widgets import ElidedLabel
from .worker import PollingPanel

OVERLAY_METRICS = ("loss", "loss_batch", "loss_memory", "val/recall@1", "memory_fill", "drift", "drift_age",
                   "images_per_s", "lr")
COLUMNS = ("Run", "Status", "Started", "Dataset", "Loss", "Memory", "Batch", "LR", "XBM steps", "val R@1",
           "test R@1")


class _SortItem(QTreeWidgetItem):
    """Sorts numbers as numbers (the sort key is kept in UserRole)."""

    def __lt__(self, other: QTreeWidgetItem) -> bool:
        col = self.treeWidget().sortColumn() if self.treeWidget() else 0
        a, b = self.data(col, Qt.ItemDataRole.UserRole), other.data(col, Qt.ItemDataRole.UserRole)
        if a is not None and b is not None:
            return a < b
        return self.text(col) < other.text(col)


def _pct(v: float | None) -> str:
    return f"{v * 100:.1f}%" if v is not None else ""


def memory_text(p: dict[str, str]) -> str:
    if p.get("memory.enabled", "True").lower() == "false":
        return "off"
    return f"{p.get('memory.ratio', '?')} {p.get('memory.mode', '')}".strip()


class RunsPanel(PollingPanel):
    def __init__(self, uri_source: Callable[[], tuple[str, str]], retry_s: float = 10.0,
                 parent: QWidget | None = None):
        """uri_source() -> (tracking URI, experiment name), asked at each refresh (params.yaml can change)."""
        super().__init__("mlflow-runs", retry_s, parent)
        self._uri_source = uri_source
        self._rows: dict[str, RunRow] = {}
        self._signature: list | None = None
        self._uri = ""

        self.state_label = ElidedLabel("not loaded yet")
        self.state_label.setObjectName("dimLabel")
        self.refresh_button = QPushButton("Refresh")
        self.refresh_button.clicked.connect(self.refresh)
        top = QHBoxLayout()
        top.addWidget(self.state_label, 1)
        top.addWidget(self.refresh_button)

        self.tree = QTreeWidget()
        self.tree.setColumnCount(len(COLUMNS))
        self.tree.setHeaderLabels(COLUMNS)
        self.tree.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.tree.setSortingEnabled(True)
        self.tree.sortByColumn(2, Qt.SortOrder.DescendingOrder)
        self.tree.setAlternatingRowColors(True)
        self.tree.setRootIsDecorated(True)
        self.tree.header().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.tree.itemSelectionChanged.connect(self._selection_changed)

        self.metric_combo = QComboBox()
        self.metric_combo.addItems(OVERLAY_METRICS)
        self.metric_combo.currentTextChanged.connect(self._selection_changed)
        self.overlay_label = ElidedLabel("select runs above to overlay their curves (Ctrl/Shift for several)")
        self.overlay_label.setObjectName("dimLabel")
        bar = QHBoxLayout()
        self.smoothing = QComboBox()
        for text, w in SMOOTHING_CHOICES:
            self.smoothing.addItem(text, w)
        self.smoothing.setCurrentIndex(2)
        self.smoothing.setToolTip("Trailing moving average of per-step metrics (evaluations are never smoothed)")
        self.smoothing.currentIndexChanged.connect(lambda _: self._redraw_overlay())
        self._histories: tuple[dict, str] = ({}, "")
        bar.addWidget(QLabel("Overlay"))
        bar.addWidget(self.metric_combo)
        bar.addWidget(self.overlay_label, 1)
        bar.addWidget(QLabel("Smoothing"))
        bar.addWidget(self.smoothing)
        self.plot = pg.PlotWidget(background=theme.PLOT_BG)
        self.plot.showGrid(x=True, y=True, alpha=0.15)
        self.plot.setLabel("bottom", "step")
        for ax in ("left", "bottom"):
            self.plot.getAxis(ax).enableAutoSIPrefix(False)
        self.plot.getPlotItem().setDownsampling(auto=True, mode="peak")
        self.plot.getPlotItem().setClipToView(True)
        self.legend = self.plot.addLegend(offset=(-8, 8), labelTextColor=theme.FG, brush=theme.LEGEND_BG)
        lower = QWidget()
        ll = QVBoxLayout(lower)
        ll.setContentsMargins(0, 0, 0, 0)
        ll.addLayout(bar)
        ll.addWidget(self.plot, 1)

        split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(self.tree)
        split.addWidget(lower)
        split.setSizes([300, 400])
        lay = QVBoxLayout(self)
        lay.addLayout(top)
        lay.addWidget(split, 1)

        self._debounce = QTimer(self)
        self._debounce.setSingleShot(True)
        self._debounce.setInterval(250)
        self._debounce.timeout.connect(self._load_overlay)
        self._overlay_token = 0

    # --- runs table ---------------------------------------------------------------------------------------

    def refresh(self) -> None:
        if self._calls.busy():
            return
        self._uri, experiment = self._uri_source()
        self._calls.call(fetch_runs, (self._uri, experiment), self._show_runs, self._runs_failed)

    def _runs_failed(self, err: Exception) -> None:
        self.state_label.setText(f"Runs unavailable: {describe_error(err)} ({self._uri}). "
                                 f"Retrying every {self.retry_s:g} s.")
        self._set_error(True)

    def _set_error(self, on: bool) -> None:
        self.state_label.setProperty("error", on)
        self.state_label.style().unpolish(self.state_label)
        self.state_label.style().polish(self.state_label)

    def _show_runs(self, rows: list[RunRow]) -> None:
        self._set_error(False)
        signature = [(r.run_id, r.status, r.name, tuple(sorted(r.metrics.items()))) for r in rows]
        if signature == self._signature:  # nothing new: keep the table as the user left it (scroll, sort)
            self._say_loaded(rows)
            return
        self._signature = signature
        selected = set(self.selected_run_ids())
        self._rows = {r.run_id: r for r in rows}
        self.tree.blockSignals(True)  # re-selecting below must not reload the overlay
        self.tree.setSortingEnabled(False)
        self.tree.clear()
        items: dict[str, _SortItem] = {}
        for r in rows:
            items[r.run_id] = self._item(r)
        for r in rows:
            parent = items.get(r.parent_id) if r.parent_id else None
            if parent is not None:
                parent.addChild(items[r.run_id])
            else:
                self.tree.addTopLevelItem(items[r.run_id])
        for rid, it in items.items():
            if rid in selected:
                it.setSelected(True)
        self.tree.setSortingEnabled(True)
        self.tree.expandAll()
        self.tree.blockSignals(False)
        self._say_loaded(rows)
        if any(self._rows[r].status == "RUNNING" for r in selected if r in self._rows):
            self._debounce.start()  # a selected run is still training: its curves grew

    def _say_loaded(self, rows: list[RunRow]) -> None:
        ids = {r.run_id for r in rows}
        n_nested = sum(1 for r in rows if r.parent_id in ids)
        nested = f" ({n_nested} trials nested under their study)" if n_nested else ""
        self.state_label.setText(f"{len(rows)} runs{nested} · {self._uri} · updated "
                                 f"{time.strftime('%H:%M:%S')}")

    def _item(self, r: RunRow) -> _SortItem:
        p = r.params
        started = datetime.fromtimestamp(r.start_time).strftime("%Y-%m-%d %H:%M") if r.start_time else ""
        val, test = (r.metrics.get(mlflow_metric(m)) for m in ("val/recall@1", "test/recall@1"))
        texts = (r.name, r.status.lower(), started, p.get("data.name", ""), p.get("loss.name", ""),
                 memory_text(p), p.get("train.batch_size", ""), p.get("train.lr", ""),
                 p.get("train.xbm_steps", ""), _pct(val), _pct(test))
        it = _SortItem([str(t) for t in texts])
        it.setData(0, Qt.ItemDataRole.UserRole + 1, r.run_id)
        it.setData(2, Qt.ItemDataRole.UserRole, r.start_time or 0.0)
        for col, v in ((9, val), (10, test)):
            it.setData(col, Qt.ItemDataRole.UserRole, v if v is not None else -1.0)
            it.setTextAlignment(col, Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        color = {"FAILED": theme.ERROR, "RUNNING": theme.ACCENT, "FINISHED": theme.OK,
                 "KILLED": theme.WARN}.get(r.status)
        if color:
            it.setForeground(1, pg.mkColor(color))
        it.setToolTip(0, "\n".join([f"run id {r.run_id}", *(f"{k} = {p[k]}" for k in KEY_PARAMS if k in p)]))
        return it

    def selected_run_ids(self) -> list[str]:
        return [it.data(0, Qt.ItemDataRole.UserRole + 1) for it in self.tree.selectedItems()]

    # --- overlay ------------------------------------------------------------------------------------------

    def _selection_changed(self, *_) -> None:
        self._debounce.start()

    def _load_overlay(self) -> None:
        ids = self.selected_run_ids()[: len(theme.OVERLAY)]
        metric = self.metric_combo.currentText()
        self._overlay_token += 1
        token = self._overlay_token
        if not ids:
            self._draw_overlay({}, metric)
            return
        self.overlay_label.setText(f"loading {metric} for {len(ids)} run(s)…")
        self._calls.call(fetch_histories, (self._uri, ids, mlflow_metric(metric)),
                         lambda h: token == self._overlay_token and self._draw_overlay(h, metric),
                         lambda e: self.overlay_label.setText(f"could not load curves: {describe_error(e)}"))

    def _draw_overlay(self, histories: dict, metric: str) -> None:
        self._histories = (histories, metric)
        self._redraw_overlay()

    def _redraw_overlay(self) -> None:
        histories, metric = self._histories
        self.plot.clear()
        self.legend.clear()
        scale = 100.0 if metric.endswith("recall@1") or metric == "memory_fill" else 1.0
        evaluation = metric.startswith(("val/", "test/"))
        window = 1 if evaluation else int(self.smoothing.currentData())
        self.plot.setLabel("left", metric, units="%" if scale == 100.0 else None)
        for i, (rid, (x, y)) in enumerate(histories.items()):
            row = self._rows.get(rid)
            name = row.name if row else rid[:8]
            c = make_curve(name, theme.OVERLAY[i % len(theme.OVERLAY)], symbol="o" if evaluation else None)
            self.plot.addItem(c)  # before setData: clip-to-view needs the curve's view box
            c.setData(x, moving_average(y, window) * scale)
        empty = [self._rows[r].name for r, (x, _) in histories.items() if not len(x) and r in self._rows]
        text = f"{metric} for {len(histories)} run(s)" if histories else "select runs above to overlay their curves"
        if empty:
            text += f"; no {metric} logged by: {', '.join(empty)}"
        self.overlay_label.setText(text)

