"""The Retrieval tab: what a run's model retrieves. Pick a run (default: the newest with a logged model), then a
query from its test split (the list puts the worst first: those whose first same-class result ranks lowest) or
any image file dropped on the window, and see the top-k results with their similarities, framed green (same class)
or red (another class).

The model is loaded from MLflow and the test split embedded on demand, in a background thread that reports its
progress; the window stays responsive. Everything slow (loading, embedding, search, decoding thumbnails: see
retrieval_logic.py) runs there; the GUI thread only places pixmaps, and the worst-queries list is a model whose
rows the view fetches as it scrolls, so a test split of any size lists at once.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image
from PySide6.QtCore import QAbstractTableModel, QModelIndex, QObject, Qt, Signal
from PySide6.QtGui import QImage, QPixmap
from PySide6.QtWidgets import (
    QAbstractItemView, QComboBox, QFileDialog, QFrame, QGridLayout, QHBoxLayout, QHeaderView, QLabel,
    QProgressBar, QPushButton, QScrollArea, QSpinBox, QSplitter, QTreeView, QVBoxLayout, QWidget,
)

from pipeline.figures import OTHER, SAME
from xbmcore.data.decode import IMAGE_SUFFIXES

from . import theme
from .retrieval_logic import QUERY_THUMB, ModelRun, Results, Session, fetch_model_runs, open_session
from .stores import describe_error
from .widgets import ElidedLabel
from .worker import BackgroundCalls

# --- the panel -------------------------------------------------------------------------------------------------

def image_paths(mime) -> list[Path]:
    """Local image files in a drag's mime data."""
    if not mime.hasUrls():
        return []
    return [Path(u.toLocalFile()) for u in mime.urls()
            if u.isLocalFile() and Path(u.toLocalFile()).suffix.lower() in IMAGE_SUFFIXES]


def _pixmap(image: Image.Image) -> QPixmap:
    data = image.convert("RGB").tobytes()
    qimg = QImage(data, image.width, image.height, 3 * image.width, QImage.Format.Format_RGB888)
    return QPixmap.fromImage(qimg.copy())  # copy: the bytes object goes away


def _rgb(c: tuple[int, int, int]) -> str:
    return "#%02x%02x%02x" % c


class _Progress(QObject):
    """Lives in the GUI thread: the background thread emits, the slot runs in the GUI thread (queued)."""

    changed = Signal(int, int, int)  # token, done, total


class _Tile(QFrame):
    def __init__(self, pixmap: QPixmap, caption: str, colour: str | None, mark: str):
        super().__init__()
        self.setObjectName("retrievalTile")
        self.mark = mark  # "correct", "incorrect" or "" (no label): what the frame says, for tests
        border = colour or theme.FG_DIM
        self.setStyleSheet(f"QFrame#retrievalTile {{ border: 4px solid {border}; border-radius: 3px; }}")
        image = QLabel()
        image.setPixmap(pixmap)
        image.setAlignment(Qt.AlignmentFlag.AlignCenter)
        symbol = {"correct": "✓ ", "incorrect": "✗ "}.get(mark, "")
        self.caption = QLabel(symbol + caption)
        self.caption.setAlignment(Qt.AlignmentFlag.AlignCenter)
        if colour:
            self.caption.setStyleSheet(f"color: {colour};")
        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)
        lay.setSpacing(2)
        lay.addWidget(image)
        lay.addWidget(self.caption)


class WorstQueries(QAbstractTableModel):
    """The test queries, worst first (first match rank, query row, class), as rows the view fetches as it
    scrolls (`canFetchMore` / `fetchMore`, PAGE rows at a time): a split of any size lists at once."""

    PAGE = 256
    HEADERS = ("first match", "query", "class")

    def __init__(self, parent: QObject | None = None):
        super().__init__(parent)
        self.rows = np.zeros(0, dtype=np.int64)   # query rows, worst first
        self._ranks = np.zeros(0, dtype=np.int64)
        self._classes: Any = ()
        self._position = np.zeros(0, dtype=np.int64)  # query row -> its line
        self._loaded = 0

    def set_session(self, session: Session | None) -> None:
        self.beginResetModel()
        if session is None:
            self.rows = np.zeros(0, dtype=np.int64)
            self._ranks, self._classes = np.zeros(0, dtype=np.int64), ()
        else:
            self.rows = np.asarray(session.order, dtype=np.int64)
            self._ranks, self._classes = session.ranks, session.query_set.class_ids
        self._position = np.empty(len(self.rows), dtype=np.int64)
        self._position[self.rows] = np.arange(len(self.rows))
        self._loaded = min(self.PAGE, len(self.rows))
        self.endResetModel()

    def line_of(self, row: int) -> int | None:
        """The line of query `row`, fetched first if the view has not come that far yet."""
        if not 0 <= row < len(self._position):
            return None
        line = int(self._position[row])
        if line >= self._loaded:
            self._grow(line + 1)
        return line

    def query_at(self, index: QModelIndex) -> int | None:
        return int(self.rows[index.row()]) if index.isValid() else None

    def _grow(self, n: int) -> None:
        n = min(len(self.rows), n)
        if n > self._loaded:
            self.beginInsertRows(QModelIndex(), self._loaded, n - 1)
            self._loaded = n
            self.endInsertRows()

    def rowCount(self, parent: QModelIndex = QModelIndex()) -> int:  # noqa: N802, B008
        return 0 if parent.isValid() else self._loaded

    def columnCount(self, parent: QModelIndex = QModelIndex()) -> int:  # noqa: N802, B008
        return 0 if parent.isValid() else len(self.HEADERS)

    def canFetchMore(self, parent: QModelIndex) -> bool:  # noqa: N802
        return not parent.isValid() and self._loaded < len(self.rows)

    def fetchMore(self, parent: QModelIndex) -> None:  # noqa: N802
        if not parent.isValid():
            self._grow(self._loaded + self.PAGE)

    def headerData(self, section: int, orientation: Qt.Orientation, role: int = Qt.ItemDataRole.DisplayRole):  # noqa: N802
        if orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.DisplayRole:
            return self.HEADERS[section]
        return None

    def data(self, index: QModelIndex, role: int = Qt.ItemDataRole.DisplayRole):
        if not index.isValid():
            return None
        row = int(self.rows[index.row()])
        if role == Qt.ItemDataRole.DisplayRole:
            if index.column() == 0:
                rank = int(self._ranks[row])
                return str(rank) if rank else "none"
            return str(row) if index.column() == 1 else str(self._classes[row])
        if role == Qt.ItemDataRole.UserRole:
            return row
        if role == Qt.ItemDataRole.TextAlignmentRole and index.column() == 0:
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        return None


class RetrievalPanel(QWidget):
    """Runs from `source()` -> (tracking URI, experiment); datasets under `root`. The session (model + embedded
    test split) is opened when the panel is visible and a run is picked."""

    session_ready = Signal()
    results_shown = Signal()

    def __init__(self, root: Path, source: Callable[[], tuple[str, str]], parent: QWidget | None = None,
                 batch_size: int | None = None):
        super().__init__(parent)
        self.root = Path(root)
        self._source = source
        self.batch_size = batch_size
        self.session: Session | None = None
        self.results: Results | None = None
        self.tiles: list[_Tile] = []
        self._runs: list[ModelRun] = []
        self._tokens = itertools.count(1)
        self._session_token = 0   # of the session being opened (0: none)
        self._opening: str | None = None  # its run id
        self._query_token = 0
        self._wanted: tuple[str, Any] | None = None  # the query asked for while the session was loading
        self._calls = BackgroundCalls("retrieval", self)
        self._progress = _Progress(self)
        self._progress.changed.connect(self._on_progress)
        self.setAcceptDrops(True)

        self.status = ElidedLabel("no run loaded yet")
        self.status.setObjectName("dimLabel")
        split = QSplitter(Qt.Orientation.Horizontal)
        split.addWidget(self._build_list())
        split.addWidget(self._build_results())
        split.setSizes([300, 900])
        lay = QVBoxLayout(self)
        lay.addLayout(self._build_toolbar())
        lay.addWidget(self.status)
        lay.addWidget(split, 1)

    def _build_toolbar(self) -> QHBoxLayout:
        """Run picker, refresh, k, query number, image file, embedding progress."""
        self.run_combo = QComboBox()
        # long run labels must not widen the window: the combo shows ~24 characters at least, more when room
        self.run_combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.run_combo.setMinimumContentsLength(24)
        self.run_combo.setToolTip("MLflow runs with a logged model, newest first")
        self.run_combo.currentIndexChanged.connect(lambda _: self._open_if_visible())
        self.refresh_button = QPushButton("Refresh runs")
        self.refresh_button.clicked.connect(self.refresh)
        self.k_spin = QSpinBox()
        self.k_spin.setRange(1, 50)
        self.k_spin.setValue(10)
        self.k_spin.setPrefix("top ")
        self.k_spin.valueChanged.connect(lambda _: self._requery())
        self.query_spin = QSpinBox()
        self.query_spin.setPrefix("query #")
        self.query_spin.setEnabled(False)
        self.query_spin.editingFinished.connect(lambda: self.show_query(self.query_spin.value()))
        self.open_button = QPushButton("Image file…")
        self.open_button.setToolTip("Search with any image file (or drop one on the window)")
        self.open_button.clicked.connect(self._pick_file)
        self.progress = QProgressBar()
        self.progress.setMaximumWidth(220)
        self.progress.setFormat("embedding %v / %m")
        self.progress.hide()
        top = QHBoxLayout()
        top.addWidget(QLabel("Run"))
        top.addWidget(self.run_combo, 1)
        for w in (self.refresh_button, self.k_spin, self.query_spin, self.open_button, self.progress):
            top.addWidget(w)
        return top

    def _build_list(self) -> QWidget:
        """The worst queries: a view on WorstQueries, rows fetched as it scrolls."""
        self.worst_model = WorstQueries(self)
        self.worst = QTreeView()
        self.worst.setModel(self.worst_model)
        self.worst.setRootIsDecorated(False)
        self.worst.setUniformRowHeights(True)  # rows are never measured one by one
        self.worst.setAlternatingRowColors(True)
        self.worst.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        # widths from the widest values (_fill_worst), not ResizeToContents, which asks every fetched row again
        self.worst.header().setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        self.worst.setToolTip("Test queries, worst first: the rank of their first same-class result")
        self.worst.selectionModel().currentRowChanged.connect(self._worst_clicked)
        left = QWidget()
        ll = QVBoxLayout(left)
        ll.setContentsMargins(0, 0, 0, 0)
        self.worst_label = ElidedLabel("Worst queries")  # long counts must not widen the list
        ll.addWidget(self.worst_label)
        ll.addWidget(self.worst, 1)
        return left

    def _build_results(self) -> QWidget:
        """The query (image, caption, summary) above the grid of result tiles."""
        self.query_image = QLabel()
        self.query_image.setFixedSize(QUERY_THUMB + 8, QUERY_THUMB + 8)
        self.query_image.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.query_image.setStyleSheet(f"border: 4px solid {theme.FG_DIM}; border-radius: 3px;")
        self.query_caption = QLabel("Pick a query on the left, type its number, or drop an image file here.")
        self.query_caption.setWordWrap(True)
        self.summary = QLabel()
        self.summary.setObjectName("dimLabel")
        qbox = QVBoxLayout()
        qbox.addWidget(self.query_caption)
        qbox.addWidget(self.summary)
        qbox.addStretch(1)
        qrow = QHBoxLayout()
        qrow.addWidget(self.query_image)
        qrow.addLayout(qbox, 1)
        self.grid_host = QWidget()
        self.grid = QGridLayout(self.grid_host)
        self.grid.setAlignment(Qt.AlignmentFlag.AlignTop | Qt.AlignmentFlag.AlignLeft)
        self.scroll = scroll = QScrollArea()
        scroll.setWidget(self.grid_host)
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)  # tiles wrap to the width
        right = QWidget()
        rl = QVBoxLayout(right)
        rl.setContentsMargins(0, 0, 0, 0)
        rl.addLayout(qrow)
        rl.addWidget(scroll, 1)
        return right

    # --- runs ---------------------------------------------------------------------------------------------

    def refresh(self) -> None:
        uri, experiment = self._source()
        self._calls.call(fetch_model_runs, (uri, experiment), self._show_runs,
                         lambda e: self._say(f"Runs unavailable: {describe_error(e)} ({uri})", error=True))

    def _show_runs(self, runs: list[ModelRun]) -> None:
        current = self.selected_run()
        newest = self.run_combo.currentIndex() <= 0  # on the newest run (the default): move to a newer one
        self._runs = runs
        self.run_combo.blockSignals(True)
        self.run_combo.clear()
        for r in runs:
            self.run_combo.addItem(r.label(), r.run_id)
        keep = self.run_combo.findData(current.run_id) if current and not newest else -1
        self.run_combo.setCurrentIndex(keep if keep >= 0 else 0)
        self.run_combo.blockSignals(False)
        if not runs:
            self._say("no run with a logged model yet: the evaluate stage logs one")
        elif self.session is None or self.session.run.run_id != self.selected_run().run_id:
            self._open_if_visible()

    def selected_run(self) -> ModelRun | None:
        i = self.run_combo.currentIndex()
        return self._runs[i] if 0 <= i < len(self._runs) else None

    def showEvent(self, event) -> None:  # noqa: N802: embeddings are computed when they are looked at
        super().showEvent(event)
        if not self._runs:
            self.refresh()
        else:
            self._open_if_visible()

    def _open_if_visible(self) -> None:
        run = self.selected_run()
        if run is None or not self.isVisible():
            return
        if self.session is not None and self.session.run.run_id == run.run_id:
            return
        if self._session_token and self._opening == run.run_id:
            return  # already being opened
        self.open_run(run)

    def open_run(self, run: ModelRun) -> None:
        token = next(self._tokens)
        self._session_token, self._opening = token, run.run_id
        self.session = None
        self.query_spin.setEnabled(False)
        self.worst_model.set_session(None)
        self.progress.setRange(0, 0)
        self.progress.show()
        self._say(f"loading the model of {run.name} and embedding its test split…")
        uri, _ = self._source()
        progress = lambda done, total: self._progress.changed.emit(token, done, total)  # noqa: E731
        self._calls.call(open_session, (self.root, run, uri, progress, self.batch_size),
                         lambda s: self._session_opened(token, s), lambda e: self._session_failed(token, e))

    def _on_progress(self, token: int, done: int, total: int) -> None:
        if token == self._session_token:
            self.progress.setRange(0, total)
            self.progress.setValue(done)

    def _session_failed(self, token: int, err: Exception) -> None:
        if token != self._session_token:
            return
        self._session_token, self._opening = 0, None
        self.progress.hide()
        self._say(f"Could not open the run: {describe_error(err)}", error=True)

    def _session_opened(self, token: int, session: Session) -> None:
        if token != self._session_token:
            return  # another run was picked meanwhile
        self._session_token, self._opening = 0, None
        self.session = session
        self.progress.hide()
        n = len(session.query)
        found = session.ranks[session.ranks > 0]
        r1 = float((session.ranks == 1).mean())
        self._say(f"{session.run.name}: {n} test queries against {len(session.gallery)} images "
                  f"({'query = gallery' if session.own else 'query vs gallery'}); first match at rank 1 for "
                  f"{r1 * 100:.1f}%, median rank {int(np.median(found)) if len(found) else '-'}")
        self.query_spin.setRange(0, n - 1)
        self.query_spin.setEnabled(True)
        self._fill_worst(session)
        self.session_ready.emit()
        wanted, self._wanted = self._wanted, None
        if wanted is not None:
            (self.show_query if wanted[0] == "row" else self.query_file)(wanted[1])
        elif n:
            self.show_query(int(session.order[0]))

    def _fill_worst(self, session: Session) -> None:
        self.worst.selectionModel().blockSignals(True)
        self.worst_model.set_session(session)
        self.worst.selectionModel().blockSignals(False)
        fm, header = self.worst.fontMetrics(), self.worst.header()
        widest = (str(int(session.ranks.max(initial=0)) or "none"), str(len(session.query) - 1),
                  max(map(str, np.unique(np.asarray(session.query_set.class_ids))), key=len, default=""))
        for col, (title, text) in enumerate(zip(WorstQueries.HEADERS, widest)):
            header.resizeSection(col, max(fm.horizontalAdvance(text), header.fontMetrics().horizontalAdvance(title))
                                 + 24)
        self.worst_label.setText(f"Worst queries first ({len(session.order):,})")

    def worst_rows(self) -> list[int]:
        """The listed query rows, top to bottom (all of them, fetched or not yet)."""
        return [int(r) for r in self.worst_model.rows]

    def _worst_clicked(self, current: QModelIndex, _previous: QModelIndex | None = None) -> None:
        row = self.worst_model.query_at(current)
        if row is not None:
            self.show_query(row)

    # --- queries ------------------------------------------------------------------------------------------

    def show_query(self, row: int) -> None:
        """Show the top-k of test query `row`."""
        if self.session is None:
            self._wanted = ("row", row)
            return
        self._query(self.session.results, row)

    def query_file(self, path: Path) -> None:
        """Search the run's test gallery with an image file."""
        if self.session is None:
            self._wanted = ("file", Path(path))
            self._say(f"{Path(path).name}: searched once the run is loaded")
            self._open_if_visible()
            return
        self._query(self.session.results_for_image, Path(path))

    def _requery(self) -> None:
        if self.results is not None and self.session is not None:
            if self.results.row is not None:
                self.show_query(self.results.row)

    def _query(self, fn: Callable, arg: Any) -> None:
        self._query_token = token = next(self._tokens)
        self._calls.call(fn, (arg, self.k_spin.value()), lambda r: self._show_results(token, r),
                         lambda e: token == self._query_token and self._say(describe_error(e), error=True))

    def _show_results(self, token: int, res: Results) -> None:
        if token != self._query_token:
            return
        self.results = res
        while self.grid.count():
            w = self.grid.takeAt(0).widget()
            if w is not None:
                w.deleteLater()
        self.tiles = []
        self.query_image.setPixmap(_pixmap(res.query))
        self.query_caption.setText(res.caption)
        for n, (thumb, caption) in enumerate(zip(res.thumbs, res.captions)):
            if res.same is None:
                colour, mark = None, ""
            else:
                colour, mark = (_rgb(SAME), "correct") if res.same[n] else (_rgb(OTHER), "incorrect")
            self.tiles.append(_Tile(_pixmap(thumb), caption, colour, mark))
        self._place_tiles()
        if res.same is not None:
            self.summary.setText(f"{int(res.same.sum())} of {len(res.same)} results share the query's class")
        else:
            self.summary.setText("an image from outside the test split: similarities only")
        if res.row is not None:  # the list and the number box follow the query shown
            self.query_spin.blockSignals(True)
            self.query_spin.setValue(res.row)
            self.query_spin.blockSignals(False)
            line = self.worst_model.line_of(res.row)
            selection = self.worst.selectionModel()
            selection.blockSignals(True)
            if line is None:
                self.worst.setCurrentIndex(QModelIndex())
            else:
                index = self.worst_model.index(line, 0)
                self.worst.setCurrentIndex(index)
                self.worst.scrollTo(index)
            selection.blockSignals(False)
        self.results_shown.emit()

    def _place_tiles(self) -> None:
        """As many tiles per row as the results area's width holds."""
        if not self.tiles:
            return
        step = self.tiles[0].sizeHint().width() + self.grid.horizontalSpacing()
        columns = max(1, (self.scroll.viewport().width() - 2 * self.grid.contentsMargins().left()) // step)
        while self.grid.count():  # the tiles stay; only their cells change
            self.grid.takeAt(0)
        for n, tile in enumerate(self.tiles):
            self.grid.addWidget(tile, n // columns, n % columns)

    def resizeEvent(self, event) -> None:  # noqa: N802
        super().resizeEvent(event)
        self._place_tiles()

    # --- files --------------------------------------------------------------------------------------------

    def _pick_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Search with an image", str(self.root),
                                              "Images (" + " ".join(f"*{s}" for s in IMAGE_SUFFIXES) + ")")
        if path:
            self.query_file(Path(path))

    def dragEnterEvent(self, event) -> None:  # noqa: N802
        if image_paths(event.mimeData()):
            event.acceptProposedAction()

    def dropEvent(self, event) -> None:  # noqa: N802
        paths = image_paths(event.mimeData())
        if paths:
            event.acceptProposedAction()
            self.query_file(paths[0])

    # --- misc ---------------------------------------------------------------------------------------------

    def _say(self, text: str, error: bool = False) -> None:
        self.status.setText(text)
        self.status.setProperty("error", error)
        self.status.style().unpolish(self.status)
        self.status.style().polish(self.status)

    def shutdown(self) -> None:
        self._calls.shutdown()

    def closeEvent(self, event) -> None:  # noqa: N802
        self.shutdown()
        super().closeEvent(event)
