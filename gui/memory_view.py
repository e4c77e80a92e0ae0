"""The Memory tab: what the memory hands the loss. Each probe anchor's thumbnail beside its hardest
memory negatives (similarity, age as the frame's colour, ● where the negative shares the anchor's super-class),
the age histogram of the active negatives over the run (stacked shares per age bin, the same colours), and the
share of the active negatives from the anchor's super-class.

It reads the `memory_view` events (xbmcore.memory_view) from the same event tail as the Live tab, so it follows a
live run and opens a finished one; for a run on a tracking server, the views its MLflowSink logged as artifacts
(at each evaluation and at the end; gui.remote). The GUI thread only draws: the thumbnails are read from the
run's prepared dataset and scaled to THUMB px in a background thread (`load_thumbnails`), only those of the view
on screen.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyqtgraph as pg
from PIL import Image
from PySide6.QtCore import Qt
from PySide6.QtGui import QPixmap
from PySide6.QtWidgets import (
    QComboBox, QFrame, QGridLayout, QHBoxLayout, QLabel, QScrollArea, QSplitter, QVBoxLayout, QWidget,
)

from . import theme
from .worker import BackgroundCalls

THUMB = 72  # px of a tile's image
# Age colours, fresh to stale, one per bin of the event's age_edges (interpolated).
_AGE_MAP = pg.ColorMap(np.linspace(0.0, 1.0, 6), ["#4cc9f0", "#90be6d", "#f9c74f", "#f8961e", "#f94144", "#c77dff"])
_SPLITS: dict[tuple[str, str], Any] = {}  # (prepared folder, data params) -> train split; the worker thread's


def age_colour(age: float, edges: list[float]) -> str:
    """The frame colour of an entry of this age: its bin of `edges` (the last open) on a fresh-to-stale map.

    Args:
        age: the entry's age in steps.
        edges: the age histogram's bin edges (the event's age_edges).

    Returns:
        A "#rrggbb" colour.
    """
    b = max(0, int(np.searchsorted(edges, age, side="right")) - 1)
    return _AGE_MAP.map(b / max(len(edges) - 1, 1), mode="qcolor").name()


def bin_names(edges: list[float]) -> list[str]:
    """The age bins' names: "0-10", ..., "5000+"."""
    return [f"{a}-{b}" for a, b in zip(edges, edges[1:])] + [f"{edges[-1]}+"]


def load_thumbnails(root: str, params: dict[str, Any], indices: list[int], size: int = THUMB
                    ) -> dict[int, Image.Image]:
    """The training split's images at `indices` as size-px thumbnails (runs in the panel's worker thread).

    Args:
        root: the project folder (its data.prepared holds the run's dataset).
        params: the run's flat params (its `start` event): the data section says which dataset.
        indices: positions in the training split (the events' dataset indices).
        size: the thumbnails' longer side in px.

    Returns:
        index -> thumbnail.
    """
    from gui.retrieval_logic import section_params
    from pipeline.figures import fit_thumbnail
    from xbmcore.config import DataParams
    from xbmcore.data import open_splits

    data = DataParams.model_validate(section_params({k: str(v) for k, v in params.items()}, "data"))
    folder = Path(root) / data.prepared / data.name
    key = (str(folder), data.model_dump_json())
    if key not in _SPLITS:
        _SPLITS[key] = open_splits(folder, data).train
    train = _SPLITS[key]
    return {i: fit_thumbnail(train.image(i), size) for i in indices}


def _pixmap(image: Image.Image) -> QPixmap:
    from .retrieval import _pixmap as pixmap

    return pixmap(image)


class Tile(QFrame):
    """One image: its thumbnail (once decoded), a caption, a frame in its age colour."""

    def __init__(self, caption: str, colour: str, tip: str):
        super().__init__()
        self.setObjectName("memoryTile")
        self.setStyleSheet(f"QFrame#memoryTile {{ border: 3px solid {colour}; border-radius: 3px; }}")
        self.setToolTip(tip)
        self.image = QLabel("…")
        self.image.setFixedSize(THUMB, THUMB)
        self.image.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.caption = QLabel(caption)
        self.caption.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.caption.setStyleSheet(f"color: {theme.FG}; font-size: 8pt;")
        lay = QVBoxLayout(self)
        lay.setContentsMargins(3, 3, 3, 3)
        lay.setSpacing(1)
        lay.addWidget(self.image, 0, Qt.AlignmentFlag.AlignCenter)
        lay.addWidget(self.caption)

    def set_image(self, pixmap: QPixmap) -> None:
        self.image.setPixmap(pixmap)


class MemoryPanel(QWidget):
    """The Memory tab. `add_batch` takes the event tail's batches, `reset` starts a new run.

    Args:
        root: the project folder (the prepared datasets the thumbnails come from).
        loader: ``loader(root, params, indices) -> {index: PIL image}``, run in a background thread.
    """

    def __init__(self, root: Path | str, loader: Callable = load_thumbnails, parent: QWidget | None = None):
        super().__init__(parent)
        self.root, self._loader = str(root), loader
        self.views: list[dict[str, Any]] = []
        self.params: dict[str, Any] = {}
        self.thumbs: dict[int, QPixmap] = {}
        self.tiles: dict[int, list[Tile]] = {}  # dataset index -> tiles showing it
        self.rows: list[list[Tile]] = []  # per anchor: its tile, then its negatives'
        self.shown: dict[str, Any] | None = None
        self._calls = BackgroundCalls("memory-thumbnails", self)
        self._wanted: set[int] = set()
        self._gen = 0  # the run's generation: thumbnails of a run switched away from are dropped
        self._build()

    # ---- layout ----

    def _build(self) -> None:
        top = QHBoxLayout()
        top.addWidget(QLabel("View at step"))
        self.pick = QComboBox()
        self.pick.setMinimumContentsLength(12)
        self.pick.currentIndexChanged.connect(self._picked)
        top.addWidget(self.pick)
        self.summary = QLabel("No memory view yet: the trainer records one every train.memory_view_every steps "
                              "of the XBM phase, and at its end.")
        self.summary.setWordWrap(True)
        top.addWidget(self.summary, 1)
        self.legend = QLabel()
        top.addWidget(self.legend)
        self.grid_host = QWidget()
        self.grid = QGridLayout(self.grid_host)
        self.grid.setSpacing(4)
        self.grid.setAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop)
        scroll = QScrollArea()
        scroll.setWidget(self.grid_host)
        scroll.setWidgetResizable(True)
        self.plots = pg.GraphicsLayoutWidget()
        self.plots.setBackground(theme.PLOT_BG)
        self.age_plot = self.plots.addPlot(row=0, col=0)
        self.age_plot.setTitle("Age of the active negatives (share per age bin, steps)", color=theme.FG)
        self.age_plot.setLabel("bottom", "step")
        self.age_plot.setYRange(0, 1)
        self.share_plot = self.plots.addPlot(row=0, col=1)
        self.share_plot.setTitle("Negatives from the anchor's super-class", color=theme.FG)
        self.share_plot.setLabel("bottom", "step")
        self.share_plot.setYRange(0, 1)
        self.share_legend = self.share_plot.addLegend(offset=(5, 5), labelTextColor=theme.FG,
                                                      brush=pg.mkBrush(*theme.LEGEND_BG))
        self.share_curve = self.share_plot.plot([], [], name="active negatives", pen=pg.mkPen(theme.ACCENT, width=2),
                                                symbol="o", symbolBrush=theme.ACCENT, symbolSize=6)
        self.topk_curve = self.share_plot.plot([], [], name="hardest k", pen=pg.mkPen(theme.WARN, width=2),
                                               symbol="s", symbolBrush=theme.WARN, symbolSize=6)
        self._bars: list[pg.BarGraphItem] = []
        split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(scroll)
        split.addWidget(self.plots)
        split.setSizes([600, 260])
        lay = QVBoxLayout(self)
        lay.addLayout(top)
        lay.addWidget(split, 1)

    # ---- events ----

    def reset(self, path: str = "") -> None:
        """A new run: forget the views."""
        self.views, self.params, self.thumbs, self.shown = [], {}, {}, None
        self._wanted, self._gen = set(), self._gen + 1
        self.pick.blockSignals(True)
        self.pick.clear()
        self.pick.blockSignals(False)
        self._clear_rows()
        self._draw_history()

    def add_batch(self, batch) -> None:
        """The tail's batch (gui.series.EventBatch): its start (the run's params) and memory_view events."""
        self.add_events(batch.others)

    def add_events(self, events: list[dict[str, Any]]) -> None:
        """Take events in file order: `start` (params), `phase` (a resume drops later views), `memory_view`."""
        new = False
        for ev in events:
            kind = ev.get("kind")
            if kind == "start":
                self.params.update(ev.get("params") or {})
            elif kind == "phase" and ev.get("resume_from") is not None:
                keep = [v for v in self.views if v["step"] <= ev["resume_from"]]
                new |= len(keep) != len(self.views)
                self.views = keep
            elif kind == "memory_view":  # in step order (a server's artifacts may come late); one per step
                self.views = sorted([v for v in self.views if v["step"] != ev["step"]] + [ev], key=lambda v: v["step"])
                new = True
        if not new:
            return
        follow = self.pick.currentIndex() in (-1, 0)  # "latest" is the first entry
        self.pick.blockSignals(True)
        self.pick.clear()
        self.pick.addItem(f"latest ({self.views[-1]['step']:,})" if self.views else "latest")
        for v in reversed(self.views):
            self.pick.addItem(f"{v['step']:,} ({v.get('phase', '')})", v["step"])
        self.pick.blockSignals(False)
        if follow:
            self.pick.setCurrentIndex(0)
        self._draw_history()
        self._picked()

    def _picked(self, *_: Any) -> None:
        if not self.views:
            return
        step = self.pick.currentData()
        view = self.views[-1] if step is None else next((v for v in self.views if v["step"] == step), self.views[-1])
        if view is not self.shown:
            self.show_view(view)

    # ---- drawing ----

    def _clear_rows(self) -> None:
        while self.grid.count():
            w = self.grid.takeAt(0).widget()
            if w is not None:
                w.deleteLater()
        self.rows, self.tiles = [], {}

    def show_view(self, view: dict[str, Any]) -> None:
        """Draw one memory_view event: a row per anchor, the summary line; ask for the missing thumbnails."""
        self.shown = view
        self._clear_rows()
        edges = view["age_edges"]
        q = view.get("age_quantiles") or {}
        ages = "/".join("–" if q.get(k) is None else f"{q[k]:.0f}" for k in ("p10", "p50", "p90"))
        share = view.get("super_share")
        topk = view.get("topk_super_share")
        sup = "no super-classes" if share is None else \
            f"from the anchor's super-class: {share:.0%} of the active negatives" + \
            ("" if topk is None else f", {topk:.0%} of the hardest {view['k']}")
        self.summary.setText(f"step {view['step']:,} · memory {view['memory_size']:,} entries · "
                             f"{view['active_negatives']:,} active negatives, age p10/p50/p90 {ages} steps · {sup}")
        self.legend.setText("age: " + " ".join(f"<span style='color:{age_colour(a, edges)}'>■</span>{n}"
                                               for a, n in zip(edges, bin_names(edges))))
        self.grid.addWidget(self._header("anchor"), 0, 0)
        for j in range(view["k"]):
            self.grid.addWidget(self._header(f"hardest #{j + 1}"), 0, j + 1)
        for r, a in enumerate(view["anchors"], start=1):
            sup = "" if a.get("super") is None else f" · super {a['super']}"
            anchor = Tile(f"#{a['index']} · class {a['label']}{sup}", theme.FG_DIM,
                          f"probe anchor: dataset index {a['index']}, class {a['label']}{sup}")
            row = [anchor]
            self._place(anchor, a["index"], r, 0)
            for j, n in enumerate(a["negatives"]):
                mark = "● " if n.get("same_super") else ""
                t = Tile(f"{mark}{n['sim']:.3f} · {n['age']} st", age_colour(n["age"], edges),
                         f"dataset index {n['index']}, class {n['label']}: similarity {n['sim']:.4f}, written "
                         f"{n['age']} steps ago" + ("; same super-class as the anchor" if n.get("same_super")
                                                    else ""))
                t.entry = n
                row.append(t)
                self._place(t, n["index"], r, j + 1)
            self.rows.append(row)
        self._request([i for i in self.tiles if i not in self.thumbs])

    def _header(self, text: str) -> QLabel:
        h = QLabel(text)
        h.setStyleSheet(f"color: {theme.FG_DIM};")
        h.setAlignment(Qt.AlignmentFlag.AlignCenter)
        return h

    def _place(self, tile: Tile, index: int, r: int, c: int) -> None:
        tile.index = index
        self.grid.addWidget(tile, r, c)
        self.tiles.setdefault(index, []).append(tile)
        if index in self.thumbs:
            tile.set_image(self.thumbs[index])

    def _request(self, indices: list[int]) -> None:
        indices = [i for i in indices if i not in self._wanted]
        if not indices or not self.params:
            return
        self._wanted.update(indices)
        gen = self._gen
        self._calls.call(self._loader, (self.root, dict(self.params), indices),
                         lambda images: gen == self._gen and self._thumbs_loaded(images),
                         lambda err: gen == self._gen and self._thumbs_failed(indices, err))

    def _thumbs_loaded(self, images: dict[int, Image.Image]) -> None:
        for i, img in images.items():  # QPixmaps in the GUI thread; the decoding and scaling happened elsewhere
            self._wanted.discard(i)
            self.thumbs[i] = _pixmap(img)
            for t in self.tiles.get(i, []):
                t.set_image(self.thumbs[i])

    def _thumbs_failed(self, indices: list[int], err: Exception) -> None:
        self._wanted.difference_update(indices)
        for i in indices:
            for t in self.tiles.get(i, []):
                t.image.setText("no image")
                t.image.setToolTip(f"{type(err).__name__}: {err}")

    def _draw_history(self) -> None:
        for b in self._bars:
            self.age_plot.removeItem(b)
        self._bars = []
        views = self.views
        steps = np.array([v["step"] for v in views], dtype=float)
        share = np.array([np.nan if v.get("super_share") is None else v["super_share"] for v in views], float)
        topk = np.array([np.nan if v.get("topk_super_share") is None else v["topk_super_share"] for v in views],
                        float)
        self.share_curve.setData(steps, share, connect="finite")
        self.topk_curve.setData(steps, topk, connect="finite")
        if not views:
            return
        edges = views[-1]["age_edges"]
        hist = np.array([v["age_hist"] for v in views if len(v["age_hist"]) == len(edges)], float)
        steps = np.array([v["step"] for v in views if len(v["age_hist"]) == len(edges)], float)
        totals = hist.sum(1, keepdims=True)
        shares = np.divide(hist, totals, out=np.zeros_like(hist), where=totals > 0)
        gaps = np.diff(steps)
        width = 0.8 * (gaps[gaps > 0].min() if (gaps > 0).any() else 1.0)
        y0 = np.zeros(len(steps))
        for b, name in enumerate(bin_names(edges)):
            colour = age_colour(edges[b], edges)
            bar = pg.BarGraphItem(x=steps, height=shares[:, b], y0=y0.copy(), width=width, brush=colour,
                                  pen=pg.mkPen(theme.PLOT_BG), name=name)
            self.age_plot.addItem(bar)
            self._bars.append(bar)
            y0 += shares[:, b]
        self.age_shares = shares  # what the bars show, for tests

    def shutdown(self) -> None:
        """Stop the thumbnail thread."""
        self._calls.shutdown()

    def closeEvent(self, event) -> None:  # noqa: N802 (shown on its own: tests)
        self.shutdown()
        super().closeEvent(event)
