"""What the Retrieval tab shows, without Qt: a run's logged model, its test split embedded and ranked, one query's
top-k with thumbnails and captions. These run in the panel's background thread (gui/retrieval.py draws them).

    fetch_model_runs(uri, experiment)        the runs that logged a model, newest first
    open_session(root, run, tracking, ...)   the run's model loaded, its test split embedded and ranked
    Session.results(row, k)                  test query `row`'s top-k (its own copy left out where query = gallery)
    Session.results_for_image(path, k)       any image file's top-k, decoded within data.max_pixels
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml
from PIL import Image

from pipeline.figures import fit_thumbnail
from xbmcore.config import DataParams
from xbmcore.data import open_splits
from xbmcore.data.decode import decode_rgb
from xbmcore.data.index import read_meta
from xbmcore.data.prepare import params_recipe
from xbmcore.data.transforms import pil_transform
from xbmcore.evaluate import embed_split, eval_sets
from xbmcore.retrieval import first_relevant_rank, nearest, worst_first

from .stores import experiment_client, mlflow_metric

THUMB = 112          # px of a result tile's image
QUERY_THUMB = 196    # px of the query's image


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
    client, experiment_id = experiment_client(uri, experiment)
    newest: dict[str, Any] = {}
    for m in client.search_logged_models(experiment_ids=[experiment_id]):
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
        thumbs = [fit_thumbnail(gallery_set.image(int(j)), THUMB) for j in ids]
        captions = [f"#{n + 1}  {s:.3f}  class {gallery_set.class_ids[j]}" for n, (s, j) in enumerate(zip(sims, ids))]
        return Results(fit_thumbnail(query, QUERY_THUMB), caption, ids, sims, same, thumbs, captions, row)


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
