"""The Retrieval tab: what a run's model retrieves. Pick a run (default: the newest with a logged model), then a
query from its test split (the list puts the worst first: those whose first same-class result ranks lowest) or
any image file dropped on the window, and see the top-k results with their similarities, framed green (same class)
or red (another class).

The model is loaded from MLflow and the test split embedded on demand, in a background thread that reports its
progress; the window stays responsive. Everything slow (loading, embedding, search, decoding thumbnails) runs
there; the GUI thread only places pixmaps.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml
from PIL import Image
from PySide6.QtCore import QObject, Qt, Signal
from PySide6.QtGui import QImage, QPixmap
from PySide6.QtWidgets import (
    QAbstractItemView, QComboBox, QFileDialog, QFrame, QGridLayout, QHBoxLayout, QHeaderView, QLabel,
    QProgressBar, QPushButton, QScrollArea, QSpinBox, QSplitter, QTreeWidget, QTreeWidgetItem, QVBoxLayout,
    QWidget,
)

from xbmcore.config import DataParams
from xbmcore.data import open_splits
from xbmcore.data.decode import decode_rgb
from xbmcore.data.index import read_meta
from xbmcore.data.prepare import params_recipe
from xbmcore.data.transforms import pil_transform
from xbmcore.evaluate import embed_split, eval_sets
from pipeline.figures import OTHER, SAME
from xbmcore.retrieval import first_relevant_rank, nearest, worst_first

from . import theme
from .stores import StoreUnavailable, _client, check_store, describe_error, mlflow_metric
from .widgets import ElidedLabel
from .worker import BackgroundCalls

THUMB = 112          # px of a result tile's image
QUERY_THUMB = 196    # px of the query's image
LIST_ROWS = 10_000   # worst queries listed (10k rows fill a QTreeWidget in ~40 ms); the rest by number
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


# --- runs and models (no Qt: these run in the background thread) ----------------------------------------------

@dataclass
class ModelRun:
    """An MLflow run with a logged model (the evaluate stage logs one)."""

    run_id: str
    name: str
    start_time: float | None
    model_uri: str
    params: dict[str, str] = field(default_factory=dict)
    test_recall_at_1: float | None = None

    def label(self) -> str:
        when = datetime.fromtimestamp(self.start_time).strftime("%Y-%m-%d %H:%M") if self.start_time else "?"
        r1 = f" · test R@1 {self.test_recall_at_1 * 100:.1f}%" if self.test_recall_at_1 is not None else ""
        return f"{self.name} · {when}{r1}"


def fetch_model_runs(uri: str, experiment: str) -> list[ModelRun]:
    """Runs of `experiment` that logged a model, newest first."""
    check_store(uri, "tracking store")
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise StoreUnavailable(f"no experiment {experiment!r} in {uri} yet")
    newest: dict[str, Any] = {}
    for m in client.search_logged_models(experiment_ids=[exp.experiment_id]):
        if m.source_run_id and (m.source_run_id not in newest
                                or m.creation_timestamp > newest[m.source_run_id].creation_timestamp):
            newest[m.source_run_id] = m
    out = []
    for run_id, m in newest.items():
        r = client.get_run(run_id)
        out.append(ModelRun(run_id, r.info.run_name or run_id[:8],
                            r.info.start_time / 1000 if r.info.start_time else None, m.model_uri,
                            dict(r.data.params), r.data.metrics.get(mlflow_metric("test/recall@1"))))
    return sorted(out, key=lambda r: r.start_time or 0.0, reverse=True)


def _param_value(text: str) -> Any:
    # MLflow stores str(value): "16", "0.001", "True", "None", "[0.5, 1.0]"; YAML reads them back, bar None.
    return None if text == "None" else yaml.safe_load(text)


def section_params(flat: dict[str, str], section: str) -> dict[str, Any]:
    """One params.yaml section, nested again, from a run's flat MLflow params (data.synthetic.seed -> ...)."""
    out: dict[str, Any] = {}
    for key, text in flat.items():
        parts = key.split(".")
        if parts[0] != section:
            continue
        node = out
        for p in parts[1:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = _param_value(text)
    return out


class _ExportedModule(torch.nn.Module):
    """A torch.export graph (MLflow's pt2 format) as a module: its train/eval mode is fixed at export (eval)."""

    def __init__(self, graph: torch.nn.Module):
        super().__init__()
        self.graph = graph

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(x)

    def train(self, mode: bool = True) -> "_ExportedModule":
        return self


def load_run_model(model_uri: str, tracking: str) -> torch.nn.Module:
    """The embedding network of a logged model: the mlflow.pytorch flavour, or a pyfunc model that wraps the
    network (`python_model.embedder.model`). Inputs are normalised image batches B x 3 x S x S."""
    import mlflow
    import mlflow.pyfunc
    import mlflow.pytorch

    mlflow.set_tracking_uri(tracking)
    flavours = mlflow.models.get_model_info(model_uri).flavors
    if "pytorch" in flavours:
        model = mlflow.pytorch.load_model(model_uri, map_location="cpu")
        try:
            return model.eval()
        except NotImplementedError:  # a torch.export graph (the pt2 format): eval already, and fixed
            return _ExportedModule(model)
    inner = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    net = getattr(getattr(inner, "embedder", None), "model", None)
    if not isinstance(net, torch.nn.Module):
        raise ValueError(f"{model_uri}: flavours {sorted(flavours)}, and no embedding network inside; expected "
                         f"the model the evaluate stage logs")
    return net.cpu().eval()


@dataclass
class Results:
    """One query's top-k: gallery rows, similarities, same-class marks (None: the query has no label)."""

    query: Image.Image
    caption: str
    ids: np.ndarray
    sims: np.ndarray
    same: np.ndarray | None
    thumbs: list[Image.Image]
    captions: list[str]
    row: int | None = None  # the query's test row; None for an image file


@dataclass
class Session:
    """A run's model and its embedded test split (query set, and gallery set where the dataset has one)."""

    run: ModelRun
    data: DataParams
    model: torch.nn.Module
    device: torch.device
    query_set: Any
    gallery_set: Any
    query: np.ndarray
    query_labels: np.ndarray
    gallery: np.ndarray
    gallery_labels: np.ndarray
    own: bool          # the query set is its own gallery (its own copy left out of its results)
    ranks: np.ndarray  # first relevant rank per query (0: none)
    order: np.ndarray  # query rows, worst first

    def results(self, row: int, k: int) -> Results:
        if not 0 <= row < len(self.query):
            raise ValueError(f"query: expected a test query number in 0..{len(self.query) - 1}, got {row}")
        sims, ids = nearest(self.query[row], self.gallery, k, exclude=np.array([row]) if self.own else None)
        same = self.gallery_labels[ids[0]] == self.query_labels[row]
        cls = self.query_set.class_ids[row]
        return self._results(self.query_set.image(row), f"test query {row} · class {cls} · first match at rank "
                             f"{self.ranks[row] or 'none'}", sims[0], ids[0], same, row)

    def results_for_image(self, path: Path, k: int) -> Results:
        # A dropped file is the user's: decoded within data.max_pixels, straight to the sizes needed (the model's
        # test resize, the query tile), never whole.
        try:
            image = decode_rgb(path, self.data.test_resize, self.data.max_pixels)
            shown = decode_rgb(path, QUERY_THUMB, self.data.max_pixels)
        except (OSError, ValueError, SyntaxError) as err:
            raise ValueError(f"{path}: cannot decode image ({type(err).__name__}: {err})") from None
        x = pil_transform(self.data, train=False)(image)[None]
        with torch.inference_mode():
            emb = self.model(x.to(self.device)).float().cpu().numpy()
        sims, ids = nearest(emb, self.gallery, k)
        return self._results(shown, f"{Path(path).name} (not in the test split: no class)", sims[0], ids[0], None,
                             None)

    def _results(self, query: Image.Image, caption: str, sims, ids, same, row) -> Results:
        gallery_set = self.query_set if self.own else self.gallery_set
        thumbs = [_thumb(gallery_set.image(int(j)), THUMB) for j in ids]
        captions = [f"#{n + 1}  {s:.3f}  class {gallery_set.class_ids[j]}" for n, (s, j) in enumerate(zip(sims, ids))]
        return Results(_thumb(query, QUERY_THUMB), caption, ids, sims, same, thumbs, captions, row)


def _thumb(image: Image.Image, size: int) -> Image.Image:
    """Fit into size x size: nearest when enlarging (a 32 px image keeps its pixels), Lanczos when shrinking."""
    scale = size / max(image.size)
    resample = Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.LANCZOS
    return image.convert("RGB").resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                       resample)


def check_prepared(prepared: Path, data: DataParams, run: ModelRun) -> None:
    """The prepared dataset must be the one the run was evaluated on: same generator params / splits."""
    try:
        meta = read_meta(prepared)
    except FileNotFoundError:
        raise ValueError(f"{prepared}: no prepared dataset {data.name!r} here; prepare it with "
                         f"`python -m pipeline.download` (run {run.name} used it)") from None
    recipe = meta.get("recipe", {})
    for key, value in params_recipe(data).items():
        if recipe.get(key) != value:
            raise ValueError(f"{prepared}: prepared with data.{key} = {recipe.get(key)!r}, but run {run.name} "
                             f"used {value!r}; prepare the run's dataset (python -m pipeline.download -S ...)")


def open_session(root: Path, run: ModelRun, tracking: str, progress: Callable[[int, int], None] | None = None,
                 batch_size: int | None = None) -> Session:
    """Load the run's model, embed its test split with it (the evaluate stage's embeddings) and rank."""
    data = DataParams.model_validate(section_params(run.params, "data"))
    prepared = Path(root) / data.prepared / data.name
    check_prepared(prepared, data, run)
    splits = open_splits(prepared, data)
    model = load_run_model(run.model_uri, tracking)
    # an exported graph is traced for the CPU; a module moves to the GPU where there is one
    device = torch.device("cuda" if torch.cuda.is_available() and not isinstance(model, _ExportedModule)
                          else "cpu")
    model.to(device)
    bs = batch_size or int(_param_value(run.params.get("eval.batch_size", "256")))
    q, ql, g, gl = embed_split(model, splits, "test", bs, device, progress=progress)
    query_set, gallery_set = eval_sets(splits, "test")
    own = g is None
    ranks = first_relevant_rank(q, ql, g, gl)
    return Session(run, data, model, device, query_set, gallery_set, q, ql, q if own else g, ql if own else gl,
                   own, ranks, worst_first(ranks))


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
        self._items: dict[int, QTreeWidgetItem] = {}  # query row -> its line in the worst-queries list
        self._tokens = itertools.count(1)
        self._session_token = 0   # of the session being opened (0: none)
        self._opening: str | None = None  # its run id
        self._query_token = 0
        self._wanted: tuple[str, Any] | None = None  # the query asked for while the session was loading
        self._calls = BackgroundCalls("retrieval", self)
        self._progress = _Progress(self)
        self._progress.changed.connect(self._on_progress)
        self.setAcceptDrops(True)

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
        top.addWidget(self.refresh_button)
        top.addWidget(self.k_spin)
        top.addWidget(self.query_spin)
        top.addWidget(self.open_button)
        top.addWidget(self.progress)
        self.status = ElidedLabel("no run loaded yet")
        self.status.setObjectName("dimLabel")

        self.worst = QTreeWidget()
        self.worst.setColumnCount(3)
        self.worst.setHeaderLabels(["first match", "query", "class"])
        self.worst.setRootIsDecorated(False)
        self.worst.setAlternatingRowColors(True)
        self.worst.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.worst.header().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.worst.setToolTip("Test queries, worst first: the rank of their first same-class result")
        self.worst.currentItemChanged.connect(self._worst_clicked)
        left = QWidget()
        ll = QVBoxLayout(left)
        ll.setContentsMargins(0, 0, 0, 0)
        self.worst_label = ElidedLabel("Worst queries")  # long counts must not widen the list
        ll.addWidget(self.worst_label)
        ll.addWidget(self.worst, 1)

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

        split = QSplitter(Qt.Orientation.Horizontal)
        split.addWidget(left)
        split.addWidget(right)
        split.setSizes([300, 900])
        lay = QVBoxLayout(self)
        lay.addLayout(top)
        lay.addWidget(self.status)
        lay.addWidget(split, 1)

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
        self.worst.clear()
        self._items = {}
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
        self.worst.blockSignals(True)
        self.worst.clear()
        rows = session.order[:LIST_ROWS]
        items = []
        for i in rows:
            rank = int(session.ranks[i])
            it = QTreeWidgetItem([str(rank) if rank else "none", str(int(i)), str(session.query_set.class_ids[i])])
            it.setData(0, Qt.ItemDataRole.UserRole, int(i))
            it.setTextAlignment(0, Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            items.append(it)
        self.worst.addTopLevelItems(items)
        self._items = {int(i): it for i, it in zip(rows, items)}
        self.worst.blockSignals(False)
        more = f" ({len(rows)} of {len(session.order)})" if len(rows) < len(session.order) else ""
        self.worst_label.setText(f"Worst queries first{more}")

    def worst_rows(self) -> list[int]:
        """The listed query rows, top to bottom."""
        return [self.worst.topLevelItem(i).data(0, Qt.ItemDataRole.UserRole)
                for i in range(self.worst.topLevelItemCount())]

    def _worst_clicked(self, item: QTreeWidgetItem | None, _prev=None) -> None:
        if item is not None:
            self.show_query(int(item.data(0, Qt.ItemDataRole.UserRole)))

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
            item = self._items.get(res.row)
            self.worst.blockSignals(True)
            self.worst.setCurrentItem(item)
            if item is not None:
                self.worst.scrollToItem(item)
            self.worst.blockSignals(False)
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
