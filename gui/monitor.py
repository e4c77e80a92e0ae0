"""Live monitor: one run's curves, its phase and ETA.

Events arrive as batches (see tail.py) and are appended to numpy buffers at once; the curves are redrawn by a
timer, never per event, so a fast run or a large backlog costs one redraw per tick. The timer runs every
REDRAW_MS (100 ms) while a redraw is cheap and waits five times a redraw's cost (at most 1 s) when it is not. Each curve downsamples
to the pixels it covers (peak mode keeps spikes visible) and draws only the visible range, which keeps
100,000-point curves smooth.
"""
from __future__ import annotations

import math
import time

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, QTimer
from PySide6.QtGui import QTextOption
from PySide6.QtWidgets import QComboBox, QHBoxLayout, QLabel, QVBoxLayout, QWidget

from . import theme
from .series import EventBatch, RunData, moving_average
from .widgets import ElidedLabel

# Per-step curves that a moving average helps read (batch-to-batch noise); fill and evaluations are never smoothed.
SMOOTHED = {"loss", "loss_batch", "loss_memory", "drift", "drift_age", "images_per_s", "pos_pairs", "neg_pairs",
            "mem_pos_pairs", "mem_neg_pairs"}
# Drift exists only on steps where an image re-enters the memory while its previous embedding is still there.
SPARSE = {"drift", "drift_age"}
SMOOTHING_CHOICES = (("raw", 1), ("10 steps", 10), ("50 steps", 50), ("200 steps", 200))
PHASE_NAMES = {"warmup": "Warm-up", "memory_init": "Memory init", "xbm": "XBM", "baseline": "Baseline",
               "evaluate": "Evaluate"}


def fmt_duration(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "–"
    s = int(round(s))
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s}s"


def make_curve(name: str, color: str, width: float = 1.0, style=Qt.PenStyle.SolidLine,
               symbol: str | None = None) -> pg.PlotDataItem:
    # width 1 for dense curves: wider antialiased pens go through Qt's stroker, ~100x slower to paint
    c = pg.PlotDataItem(name=name, pen=pg.mkPen(color, width=width, style=style), connect="finite",
                        symbol=symbol, symbolSize=7, symbolBrush=color, symbolPen=None)
    c.setDownsampling(auto=True, method="peak")
    c.setClipToView(True)
    # peak mode draws a min and a max per sample: ~1.5 samples per pixel is already exact to the eye, and the
    # default (5) makes every repaint draw 3x more segments than the screen can show
    c.opts["autoDownsampleFactor"] = 1.5
    return c


def _height_only(label: pg.LabelItem, plot: pg.PlotItem | None = None) -> None:
    """pyqtgraph's LabelItem makes its text width the minimum width of the whole plot column: a title carrying a
    legend would then widen its column. Keep only the height constraint (the grid gives equal columns), and wrap
    the text at the column's width (centred), so that a long legend takes more lines instead of being cut off: the
    title row of `plot` (PlotItem.setTitle fixes it at 30 px) grows to the wrapped text's height."""
    hints = Qt.SizeHint
    option = QTextOption(Qt.AlignmentFlag.AlignHCenter)
    option.setWrapMode(QTextOption.WrapMode.WordWrap)
    label.item.document().setDefaultTextOption(option)

    def update_min() -> None:
        w = label.rect().width()
        if w > 0 and label.item.textWidth() != w:
            label.item.setTextWidth(w)  # wrap at the column's width
        h = label.itemRect().height()
        if plot is not None and h > 0:
            label.setMaximumHeight(h)
            plot.layout.setRowFixedHeight(0, h)
        label.setMinimumSize(0, h)
        label._sizeHint = {hints.MinimumSize: (0, h), hints.PreferredSize: (0, h), hints.MaximumSize: (-1, -1),
                           hints.MinimumDescent: (0, 0)}
        label.updateGeometry()

    label.updateMin = update_min


def _drift_title(d) -> str:
    """The drift plot's title with the last probe's directedness (1: random drift, 10: steady) and the share of the
    memory term's gradient that comes from entries written 100 steps ago or more."""
    parts = ["Embedding drift"]
    directed, old = d.evals.get("drift/directed"), d.evals.get("memory/grad_old")
    if directed is not None and math.isfinite(directed.last()):
        parts.append(f"directed ×{directed.last():.1f}")
    if old is not None and math.isfinite(old.last()):
        parts.append(f"grad from entries ≥100 steps old {old.last():.0%}")
    return " · ".join(parts)


class _Plot:
    """A PlotItem whose title carries the legend (coloured keys never cover the data, unlike a legend box), with
    an optional second y axis on the right, and its curves keyed by data name."""

    def __init__(self, item: pg.PlotItem, title: str, ylabel: str, units: str | None = None):
        self.item = item
        self.title = title
        item.setLabel("left", ylabel, units=units)
        item.setLabel("bottom", "step")
        for ax in ("left", "bottom", "right"):
            item.getAxis(ax).enableAutoSIPrefix(False)  # no "(x0.001)" on losses and steps
        item.showGrid(x=True, y=True, alpha=0.15)
        # PlotItem.addItem imposes the plot's own downsampling mode on each curve, so set it here too
        item.setDownsampling(auto=True, mode="peak")
        item.setClipToView(True)
        self.curves: dict[str, pg.PlotDataItem] = {}
        self.right: pg.ViewBox | None = None
        self.markers: list[pg.InfiniteLine] = []
        _height_only(item.titleLabel, item)
        self.set_title(title)

    def set_title(self, title: str) -> None:
        self.title = title
        keys = []
        if len(self.curves) > 1:
            for c in self.curves.values():
                pen = c.opts["pen"]
                mark = {"o": "●", "s": "■"}.get(c.opts["symbol"]) or (
                    "┅" if pen.style() == Qt.PenStyle.DashLine else "━")
                name = c.name().replace(" ", "&nbsp;")  # a key never breaks; lines break between keys
                keys.append(f"<span style='color:{pen.color().name()}'>{mark}&nbsp;{name}</span>")
        html = f"<b>{title}</b>" + ("&nbsp;&nbsp; " + "&nbsp;&nbsp; ".join(keys) if keys else "")
        self.item.setTitle(html, color=theme.FG, size="10pt")

    def add(self, key: str, curve: pg.PlotDataItem, right: bool = False) -> None:
        self.curves[key] = curve
        (self.right if right else self.item).addItem(curve)
        self.set_title(self.title)

    def add_right_axis(self, label: str, units: str | None = None) -> None:
        vb = pg.ViewBox()
        self.item.showAxis("right")
        self.item.scene().addItem(vb)
        self.item.getAxis("right").linkToView(vb)
        self.item.getAxis("right").setLabel(label, units=units)
        self.item.getAxis("right").enableAutoSIPrefix(False)
        vb.setXLink(self.item.vb)
        self.right = vb

        def sync() -> None:
            vb.setGeometry(self.item.vb.sceneBoundingRect())
            vb.linkedViewChanged(self.item.vb, vb.XAxis)

        self.item.vb.sigResized.connect(sync)
        sync()

    def clear(self) -> None:
        for c in self.curves.values():
            c.setData([], [])
        for m in self.markers:
            self.item.removeItem(m)
        self.markers.clear()


class MonitorPanel(QWidget):
    """Header (phase, progress, ETA, speed, status) above a grid of linked plots."""

    REDRAW_MS = 100

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.data = RunData()
        self._dirty = False
        self._marked_phases = -1
        self._last_event_wall: float | None = None

        self.phase_label = QLabel("no run")
        self.phase_label.setObjectName("phaseBadge")
        self.progress_label = QLabel()
        self.eta_label = QLabel()
        self.speed_label = QLabel()
        self.status_label = ElidedLabel()
        self.source_label = ElidedLabel("–", Qt.TextElideMode.ElideLeft)
        self.source_label.setObjectName("dimLabel")
        self.source_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        header = QHBoxLayout()
        header.addWidget(self.phase_label)
        for w in (self.progress_label, self.eta_label, self.speed_label, self.status_label):
            w.setObjectName("statLabel")
            header.addWidget(w)
        header.setStretchFactor(self.status_label, 3)
        header.addWidget(self.source_label, 2)
        self.smoothing = QComboBox()
        for text, w in SMOOTHING_CHOICES:
            self.smoothing.addItem(text, w)
        self.smoothing.setCurrentIndex(2)
        self.smoothing.setToolTip("Trailing moving average of the per-step curves (loss, drift, throughput, pairs)")
        self.smoothing.currentIndexChanged.connect(self._smoothing_changed)
        header.addWidget(QLabel("Smoothing"))
        header.addWidget(self.smoothing)

        self.graphics = pg.GraphicsLayoutWidget()
        self.graphics.setBackground(theme.PLOT_BG)
        g = self.graphics
        self.loss = _Plot(g.addPlot(row=0, col=0), "Loss", "loss")
        self.fill = _Plot(g.addPlot(row=0, col=1), "Memory fill", "fill", units="%")
        self.drift = _Plot(g.addPlot(row=0, col=2), "Embedding drift", "mean ‖Δf‖²")
        self.recall = _Plot(g.addPlot(row=1, col=0), "Recall@1", "Recall@1", units="%")
        self.speed = _Plot(g.addPlot(row=1, col=1), "Throughput", "training images/s")
        self.pairs = _Plot(g.addPlot(row=1, col=2), "Active pairs", "pairs per step")
        self.plots = (self.loss, self.fill, self.drift, self.recall, self.speed, self.pairs)
        for col in range(3):  # equal columns, whatever the length of each title
            g.ci.layout.setColumnStretchFactor(col, 1)
            g.ci.layout.setColumnPreferredWidth(col, 1)
        for p in self.plots[1:]:
            p.item.setXLink(self.loss.item)

        c = theme.CURVES
        self.loss.add("loss", make_curve("total", c["loss"]))
        self.loss.add("loss_batch", make_curve("batch", c["loss_batch"]))
        self.loss.add("loss_memory", make_curve("memory", c["loss_memory"]))
        self.fill.add("memory_fill", make_curve("fill", c["memory_fill"]))
        self.fill.item.setYRange(0, 100, padding=0.02)
        self.fill.item.enableAutoRange(axis="y", enable=False)
        self.drift.add_right_axis("age", units="steps")
        self.drift.add("drift", make_curve("drift", c["drift"]))
        self.drift.add("drift_age", make_curve("age", c["drift_age"], style=Qt.PenStyle.DashLine), right=True)
        self.recall.add("val/recall@1", make_curve("val", c["val"], 2.0, symbol="o"))
        self.recall.add("test/recall@1", make_curve("test", c["test"], 2.0, symbol="s"))
        self.speed.add("images_per_s", make_curve("images/s", c["images_per_s"]))
        self.pairs.item.setLogMode(y=True)
        self.pairs.add("neg_pairs", make_curve("neg", c["neg_pairs"]))
        self.pairs.add("pos_pairs", make_curve("pos", c["pos_pairs"]))
        self.pairs.add("mem_neg_pairs", make_curve("mem neg", c["neg_pairs"], style=Qt.PenStyle.DashLine))
        self.pairs.add("mem_pos_pairs", make_curve("mem pos", c["pos_pairs"], style=Qt.PenStyle.DashLine))

        lay = QVBoxLayout(self)
        lay.setContentsMargins(6, 6, 6, 6)
        lay.addLayout(header)
        lay.addWidget(self.graphics, 1)

        self._timer = QTimer(self)
        self._timer.timeout.connect(self.redraw)
        self._timer.start(self.REDRAW_MS)

    # --- data in ------------------------------------------------------------------------------------------

    def reset(self, source: str) -> None:
        """A new events file: forget the old run's points."""
        self.data = RunData()
        for p in self.plots:
            p.clear()
        self.fill.set_title("Memory fill")
        self.source_label.setText(source)
        self._marked_phases = -1
        self._last_event_wall = None
        self._dirty = True

    def add_batch(self, batch: EventBatch) -> None:
        self.data.add(batch)
        self._last_event_wall = time.time()
        self._dirty = True

    def _smoothing_changed(self, *_) -> None:
        self._dirty = True
        self.redraw()

    def set_waiting(self, text: str) -> None:
        if self.data.events == 0:
            self.phase_label.setText("waiting")
            self.status_label.setText(text)

    # --- drawing ------------------------------------------------------------------------------------------

    def redraw(self) -> None:
        d = self.data
        if self._dirty:
            self._dirty = False
            t0 = time.perf_counter()
            window = int(self.smoothing.currentData())
            for p in (self.loss, self.fill, self.drift, self.speed, self.pairs):
                for key, curve in p.curves.items():
                    if key not in d.curves:  # the drift probe's curves, drawn below
                        continue
                    s = d.curves[key]
                    y = s.y * 100 if key == "memory_fill" else s.y
                    x = s.x
                    if key.endswith("pairs"):  # log axis: a zero count is "none", not -inf
                        y = np.where(y > 0, y, np.nan)
                    if key in SPARSE:  # measured on some steps only: join the measurements
                        keep = np.isfinite(y)
                        x, y = x[keep], y[keep]
                    if key in SMOOTHED:
                        y = moving_average(y, window)
                    curve.setData(x, y)
            size, fill = d.curves["memory_size"].last(), d.curves["memory_fill"].last()
            if size and fill and math.isfinite(size / fill):  # a remote run has no memory_size (NaN)
                self.fill.set_title(f"Memory fill (K = {round(size / fill):,})")
            for key, curve in self.recall.curves.items():
                s = d.evals.get(key)
                if s is not None:
                    curve.setData(s.x, s.y * 100)
            probe = sorted((k for k in d.evals if k.startswith("drift/D_")), key=lambda k: int(k[8:]))
            for i, key in enumerate(probe):  # D(t; dt) of the drift probe, one curve per dt as they appear
                if key not in self.drift.curves:
                    colour = theme.OVERLAY[(i + 2) % len(theme.OVERLAY)]
                    self.drift.add(key, make_curve(f"D(t; {key[8:]})", colour, 2.0, symbol="o"))
                self.drift.curves[key].setData(d.evals[key].x, d.evals[key].y)
                back = f"drift/backbone_{key[8:]}"  # the backbone's D beside the head's, dashed
                if back in d.evals:
                    if back not in self.drift.curves:
                        self.drift.add(back, make_curve(f"backbone D(t; {key[8:]})", colour, 1.5,
                                                        style=Qt.PenStyle.DashLine))
                    self.drift.curves[back].setData(d.evals[back].x, d.evals[back].y)
            age = d.evals.get("memory/active_neg_age")  # how old the negatives that still push are
            if age is not None:
                if "active_neg_age" not in self.drift.curves:
                    self.drift.add("active_neg_age", make_curve("active negatives' age", theme.CURVES["drift_age"],
                                                                2.0, symbol="t"), right=True)
                keep = np.isfinite(age.y)
                self.drift.curves["active_neg_age"].setData(age.x[keep], age.y[keep])
            title = _drift_title(d)
            if title != self.drift.title:
                self.drift.set_title(title)
            self._draw_phase_markers()
            # Space redraws by their cost: 10 Hz while cheap, slower for huge runs, so the window never takes
            # more than a small share of a core from the training it watches.
            cost_ms = (time.perf_counter() - t0) * 1000
            self._timer.setInterval(int(min(1000, max(self.REDRAW_MS, 5 * cost_ms))))
        self._update_header()

    def _draw_phase_markers(self) -> None:
        if self._marked_phases == len(self.data.phases):
            return
        self._marked_phases = len(self.data.phases)
        # phases that start at one step (memory init takes no optimiser step) share one marker, named by the last
        starts: dict[int, str] = {}
        for step, phase in self.data.phases:
            starts[step] = phase
        for p in self.plots:
            for m in p.markers:
                p.item.removeItem(m)
            p.markers.clear()
            for step, phase in starts.items():
                color = theme.PHASES.get(phase, theme.FG_DIM)
                line = pg.InfiniteLine(
                    pos=step, angle=90, movable=False, pen=pg.mkPen(color, width=1, style=Qt.PenStyle.DashLine),
                    label=PHASE_NAMES.get(phase, phase) if p in (self.loss, self.fill) else None,
                    labelOpts={"position": 0.95, "color": color, "anchors": [(0, 0.5), (0, 0.5)]},
                )
                line.setZValue(-10)
                p.item.addItem(line, ignoreBounds=True)
                p.markers.append(line)

    def _update_header(self) -> None:
        d = self.data
        about = [self.source_label.text()]
        if d.run_id:
            about.append(f"MLflow run {d.run_id}")
        if d.params:
            keys = ("data.name", "loss.name", "memory.enabled", "memory.mode", "memory.ratio", "train.batch_size",
                    "train.lr", "train.warmup_steps", "train.xbm_steps", "train.seed")
            about += [f"{k} = {d.params[k]}" for k in keys if k in d.params]
        if d.checkpoint:
            about.append(f"last checkpoint {d.checkpoint}")
        self.source_label.setToolTip("\n".join(about))  # what a run started elsewhere is
        phase = d.phase
        if phase:
            self.phase_label.setText(PHASE_NAMES.get(phase, phase))
            self.phase_label.setStyleSheet(f"background:{theme.PHASES.get(phase, theme.FG_DIM)};")
        if d.last_step is not None:
            total = f" / {d.total_steps:,}" if d.total_steps else ""
            self.progress_label.setText(f"step {d.last_step:,}{total}")
        rate = d.steps_per_s()
        ips = d.curves["images_per_s"].last()
        speed = []
        if rate:
            speed.append(f"{rate:.1f} steps/s")
        if ips is not None and math.isfinite(ips):
            speed.append(f"{ips:,.0f} img/s")
        self.speed_label.setText(" · ".join(speed))
        if d.status:
            self.eta_label.setText("")
            # each stage ends with "finished" ("warmup done"): say what ended, the run may go on with the next
            text = d.message if d.status == "finished" and d.message else \
                f"{d.status}: {d.message}" if d.message else d.status
            self.status_label.setText(text)
        elif d.events:
            eta = d.eta_s()
            self.eta_label.setText(f"ETA {fmt_duration(eta)}" if eta is not None else "")
            quiet = time.time() - self._last_event_wall if self._last_event_wall else 0
            best = d.evals.get("val/recall@1")
            parts = []
            if best is not None and best.n:
                parts.append(f"best val R@1 {np.nanmax(best.y) * 100:.1f}%")
            if quiet > 30:
                parts.append(f"no new events for {fmt_duration(quiet)}")
            self.status_label.setText(" · ".join(parts))
