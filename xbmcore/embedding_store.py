"""An embedded image collection on disk: embeddings, image paths, labels, a faiss index and the model's identity.

    <dir>/embeddings.npy   N x D, float32 or float16 (half the size; similarities change by ~1e-3)
    <dir>/items.csv        row,path,label,class: path relative to meta's `root`; label -1 / class empty when
                           the layout has none
    <dir>/index.faiss      exact: IndexFlatIP over the stored embeddings; hnsw: IndexHNSWFlat (inner product)
    <dir>/meta.json        written last (a folder without it is incomplete): format, count, dim, dtype, index kind
                           and parameters, the model (sha256 digest of its weights, input size, source), root,
                           images skipped

Every file goes through a temporary name and a rename, and meta.json is removed before anything else is
rewritten, so a killed write never leaves a folder that passes for complete.

Exact search goes through xbmcore.knn.exact_knn (faiss on the CPU, torch on a GPU) on the stored embeddings;
the HNSW index answers approximate queries. Near-duplicates: pairs above a similarity threshold from faiss range
search, grouped into connected components (scipy).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from xbmcore.collection import embed_files, load_rgb
from xbmcore.config import DataParams, ModelParams
from xbmcore.data.index import atomic_path
from xbmcore.data.transforms import pil_transform
from xbmcore.knn import exact_knn
from xbmcore.models import build_model

FORMAT = 1
META, EMBEDDINGS, ITEMS, INDEX = "meta.json", "embeddings.npy", "items.csv", "index.faiss"
INDEX_KINDS = ("exact", "hnsw")
# HNSW graph degree M and build beam: M = 32 with efConstruction 80 reached recall@10 >= 0.95 at efSearch 64 on
# 1M x 128 clustered embeddings (python -m bench.search); a larger M costs memory (M x 8 bytes per vector).
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 64
# Range-search queries per faiss call: bounds the memory of the result lists when many pairs pass.
RANGE_CHUNK = 4096


def model_digest(model: torch.nn.Module) -> str:
    """sha256 of the model's weights (names, dtypes, shapes, bytes, in state_dict order): the same network
    whatever file or MLflow model it was read from."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class ModelCard:
    """What a query must match to search an index: the same weights, input size and embedding dimension."""

    digest: str
    embedding_dim: int
    test_resize: int  # shorter side before the centre crop
    test_size: int  # centre crop: the network's input size
    source: str = ""  # where it was loaded from (model.pt path or MLflow URI), to load it again

    def check_compatible(self, other: "ModelCard", where: str) -> None:
        """Refuse a model that cannot query an index built with `self`, naming both."""
        for name in ("embedding_dim", "test_size", "test_resize"):
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                raise ValueError(f"{where}: built with {name} {a} (model {self.source}), the model "
                                 f"{other.source} has {name} {b}; embed the images again with that model")
        if self.digest != other.digest:
            raise ValueError(f"{where}: built by another model (weights sha256 {self.digest[:12]}..., "
                             f"{self.source}) than {other.source} (sha256 {other.digest[:12]}...); its similarities "
                             f"would be meaningless: query with the model that built it, or embed again")


class Embedder:
    """A trained embedding network with its test transform (resize, centre crop, normalise) and its ModelCard."""

    def __init__(self, model: torch.nn.Module, model_params: dict[str, Any], test_resize: int, test_size: int,
                 source: str = "", device: str | torch.device = "cpu"):
        self.model_params = dict(model_params)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.transform = pil_transform(DataParams(test_resize=test_resize, test_size=test_size), train=False)
        self.card = ModelCard(model_digest(model), int(model.embedding_dim), test_resize, test_size, source)

    @classmethod
    def from_state(cls, state: dict[str, Any], source: str = "", device: str | torch.device = "cpu") -> "Embedder":
        """From `state()`'s dict, or a train_xbm model.pt (model, model_params) plus test_resize and test_size."""
        p = ModelParams(**state["model_params"]).model_copy(update={"pretrained": "none"})  # weights follow
        model = build_model(p)
        model.load_state_dict(state["model"])
        return cls(model, state["model_params"], int(state["test_resize"]), int(state["test_size"]), source, device)

    def state(self) -> dict[str, Any]:
        """Everything `from_state` needs (tensors, numbers and strings: torch.load(weights_only=True) reads it)."""
        return {"model": {k: v.cpu() for k, v in self.model.state_dict().items()},
                "model_params": self.model_params, "test_resize": self.card.test_resize,
                "test_size": self.card.test_size}

    def embed_files(self, paths: list[Path], **kwargs) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
        """collection.embed_files with this model and transform."""
        return embed_files(self.model, paths, self.transform, device=self.device, **kwargs)

    def embed_images(self, images: list, batch_size: int = 64) -> np.ndarray:
        """PIL images (any mode) or encoded image bytes -> n x D float32."""
        out = []
        with torch.inference_mode():
            for s in range(0, len(images), batch_size):
                batch = [load_rgb(io.BytesIO(im)) if isinstance(im, (bytes, bytearray)) else im.convert("RGB")
                         for im in images[s:s + batch_size]]
                x = torch.stack([self.transform(im) for im in batch]).to(self.device)
                out.append(self.model(x).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.card.embedding_dim), np.float32)


@dataclass
class EmbeddingStore:
    embeddings: np.ndarray  # N x D float32 | float16
    names: list[str]
    labels: np.ndarray | None
    classes: list[str] | None
    model: ModelCard
    root: str = ""
    index_kind: str = "exact"
    index: Any = None  # faiss index, built by build_index or read by load
    skipped: list[list[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.embeddings.ndim != 2 or len(self.embeddings) != len(self.names):
            raise ValueError(f"embeddings: expected {len(self.names)} x D (one row per image), "
                             f"got {self.embeddings.shape}")
        if self.index_kind not in INDEX_KINDS:
            raise ValueError(f"index: expected one of {', '.join(INDEX_KINDS)}, got {self.index_kind!r}")

    def __len__(self) -> int:
        return len(self.names)

    def float32(self) -> np.ndarray:
        return np.ascontiguousarray(self.embeddings, dtype=np.float32)

    # ---- the faiss index ----

    def build_index(self) -> None:
        x = self.float32()
        d = x.shape[1]
        if self.index_kind == "exact":
            self.index = faiss.IndexFlatIP(d)
        else:
            self.index = faiss.IndexHNSWFlat(d, HNSW_M, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            self.index.hnsw.efSearch = HNSW_EF_SEARCH
        self.index.add(x)

    def search(self, queries: np.ndarray, k: int, device: str | torch.device = "cpu",
               ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(n x k similarities, n x k rows), best first: exact (xbmcore.knn) or through the HNSW index."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.embeddings.shape[1]:
            raise ValueError(f"queries: expected n x {self.embeddings.shape[1]}, got {q.shape}")
        k = min(k, len(self))
        if self.index_kind == "exact":
            return exact_knn(q, self.float32(), k, device)
        if ef_search is not None:
            self.index.hnsw.efSearch = max(ef_search, k)
        return self.index.search(q, k)

    def duplicate_groups(self, threshold: float) -> list[np.ndarray]:
        """Groups (arrays of rows, largest group first) of the connected components of the graph whose edges are
        the pairs with similarity > threshold, found by faiss range search on the index; singletons left out."""
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"threshold: expected a cosine similarity in [-1, 1], got {threshold}")
        x = self.float32()
        n = len(x)
        rows, cols = [], []
        for s in range(0, n, RANGE_CHUNK):
            lims, _, ids = self.index.range_search(x[s:s + RANGE_CHUNK], threshold)  # sims > threshold
            src = s + np.repeat(np.arange(len(lims) - 1), np.diff(lims).astype(np.int64))
            keep = ids != src  # an image is not its own duplicate
            rows.append(src[keep])
            cols.append(ids[keep])
        r, c = np.concatenate(rows), np.concatenate(cols)
        graph = coo_matrix((np.ones(len(r), dtype=np.int8), (r, c)), shape=(n, n))
        _, comp = connected_components(graph, directed=True, connection="weak")
        order = np.argsort(comp, kind="stable")
        groups = np.split(order, np.flatnonzero(np.diff(comp[order])) + 1)
        groups = [g for g in groups if len(g) > 1]
        return sorted(groups, key=lambda g: (-len(g), g[0]))

    # ---- files ----

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / META).unlink(missing_ok=True)  # the folder is incomplete until meta.json is back
        if self.index is None:
            self.build_index()
        with atomic_path(folder / EMBEDDINGS) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, self.embeddings)
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["row", "path", "label", "class"])
        for i, name in enumerate(self.names):
            label = -1 if self.labels is None else int(self.labels[i])
            w.writerow([i, name, label, "" if label < 0 or self.classes is None else self.classes[label]])
        with atomic_path(folder / ITEMS) as tmp:
            tmp.write_text(buf.getvalue(), encoding="utf-8")
        with atomic_path(folder / INDEX) as tmp:
            faiss.write_index(self.index, str(tmp))
        meta = {"format": FORMAT, "count": len(self), "dim": int(self.embeddings.shape[1]),
                "dtype": str(self.embeddings.dtype), "index": self.index_kind, "root": self.root,
                "model": asdict(self.model), "skipped": self.skipped, "classes": self.classes}
        if self.index_kind == "hnsw":
            meta["hnsw"] = {"M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION, "ef_search": HNSW_EF_SEARCH}
        with atomic_path(folder / META) as tmp:
            tmp.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "EmbeddingStore":
        folder = Path(folder)
        if not (folder / META).is_file():
            raise ValueError(f"{folder}: not an embedded collection (no {META}; build one with "
                             f"python -m pipeline.embed, or it was interrupted: run it again)")
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT:
            raise ValueError(f"{folder / META}: format {meta.get('format')!r}, expected {FORMAT}")
        emb = np.load(folder / EMBEDDINGS, mmap_mode="r")
        with open(folder / ITEMS, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if emb.shape != (meta["count"], meta["dim"]) or len(rows) != meta["count"]:
            raise ValueError(f"{folder}: {EMBEDDINGS} holds {emb.shape} and {ITEMS} {len(rows)} rows, {META} says "
                             f"{meta['count']} x {meta['dim']}: embed the images again")
        labels = np.array([int(r["label"]) for r in rows], dtype=np.int64)
        store = cls(np.asarray(emb), [r["path"] for r in rows], None if (labels < 0).all() else labels,
                    meta.get("classes"), ModelCard(**meta["model"]), meta.get("root", ""), meta["index"],
                    faiss.read_index(str(folder / INDEX)), meta.get("skipped", []))
        if store.index.ntotal != len(store) or store.index.d != meta["dim"]:
            raise ValueError(f"{folder / INDEX}: holds {store.index.ntotal} x {store.index.d}, expected "
                             f"{meta['count']} x {meta['dim']}: embed the images again")
        return store
