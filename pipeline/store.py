"""An embedded image collection on disk: embeddings in shards, image paths and labels, a faiss index, a manifest.

    <dir>/shards/<c>.npy     chunk c's embeddings: the images of the collection's rows [c S, (c + 1) S) that
                             decoded, float32 or float16 (half the size; 11 significant bits per component)
    <dir>/shards/<c>.json    chunk c's record (rows skipped, with the reason), written after its .npy: the chunk
                             is finished when this file exists
    <dir>/shards/plan.json   what the chunks are computed from (model, collection, S, dtype, batch size): a run
                             reuses finished chunks only under the same plan
    <dir>/items.csv          row,path,label,class: path relative to meta's `root`; label -1 / class empty when
                             the layout has none
    <dir>/index.faiss        hnsw: IndexHNSWFlat; ivfpq: IndexIVFPQ; exact: none
    <dir>/meta.json          the manifest, written last (a folder without it is incomplete): count, dim, dtype,
                             the shards and their rows, the index kind and its parameters, the model's card, root,
                             classes, images skipped

A chunk is a fixed range of the collection whoever computes it, so one process and the ranks of a torchrun job
write the same files, and a killed run of any size resumes from the chunks that finished. Every file goes
through a temporary name, an fsync and a rename (xbmcore.atomic.atomic_path).

Search opens the shards memory-mapped and never loads the whole matrix:
  exact  no index: each shard in turn scored against the queries (xbmcore.knn), the top k merged;
  hnsw   a graph over the full float32 vectors, in RAM (4 D + 8 M bytes per item);
  ivfpq  inverted lists of product-quantised codes, in RAM (code_bytes + 8 bytes per item): the top R
         candidates by code, re-ranked by their exact inner products read from the shards.
Near-duplicates: the pairs above a similarity threshold (exact: faiss range search per shard; hnsw, ivfpq: among
each item's R nearest by the same search), grouped into connected components (scipy).
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xbmcore.atomic import atomic_path
from xbmcore.blas import load_faiss
from xbmcore.knn import exact_knn
from pipeline.embedding_store import ModelCard

faiss = load_faiss()
log = logging.getLogger(__name__)

FORMAT = 2
META, ITEMS, INDEX, SHARDS, PLAN = "meta.json", "items.csv", "index.faiss", "shards", "plan.json"
INDEX_KINDS = ("exact", "hnsw", "ivfpq")
# Images per chunk: the unit of work a killed run loses at most (a minute on one GPU, minutes on CPU cores) and
# the shard size search streams over (8 MB at D = 128 in float32).
CHUNK_ROWS = 16384
# HNSW graph degree M, build beam and search beam, from python -m bench.search on 2M x 128 clustered embeddings
# (1,000 queries, k = 10, 2 cores): efSearch 32 found 97.7% of the exact top 10 at 73x the exact queries/s (16:
# 89.8% at 132x; 64: 99.9% at 46x). Each vector costs 4 D + 8 M bytes for its vector and level-0 links (768 at
# D = 128); faiss's upper levels and bookkeeping bring the measured figure to 784 B per item.
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 32
# IVF-PQ: nlist = 4 sqrt(N) lists (faiss's guideline), k-means trained on a sample of 50 points per list (faiss
# warns under 39); one byte per sub-vector, so code_bytes must divide D. nprobe and R from bench.search on 2M x 128
# (32-byte codes): nprobe 32, R 100 found 95.4% of the exact top 10 at 47x the exact queries/s (nprobe 16: 92.5%
# at 83x; 64: 97.5% at 31x); R 200 found no more, the codes alone 52.9%.
IVF_LISTS_PER_SQRT_N = 4
IVF_TRAIN_PER_LIST = 50
PQ_CODE_BYTES = 32
IVF_NPROBE = 32
RERANK = 100
# Queries per block of a dedup pass: bounds the memory of the result lists when many pairs pass.
QUERY_BLOCK = 4096


# ---- index kinds and their parameters (recorded in the manifest; search reads them back) ----

def index_spec(kind: str, n: int, dim: int, code_bytes: int = PQ_CODE_BYTES) -> dict[str, Any]:
    """The index's kind and parameters for n items of dimension dim; ValueError names the flag at fault."""
    if kind not in INDEX_KINDS:
        raise ValueError(f"--index {kind}: expected one of {', '.join(INDEX_KINDS)}")
    if kind == "exact":
        return {"kind": "exact"}
    if kind == "hnsw":
        return {"kind": "hnsw", "M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION, "ef_search": HNSW_EF_SEARCH}
    check_code_bytes(code_bytes, dim)
    nlist = max(1, min(round(IVF_LISTS_PER_SQRT_N * math.sqrt(n)), n // 39))
    train = min(n, max(IVF_TRAIN_PER_LIST * nlist, 1 << 16))
    # Each sub-quantiser is a k-means of 2^nbits centroids: a small collection has too few points for 256.
    nbits = min(8, max(1, int(math.log2(train))))
    return {"kind": "ivfpq", "nlist": nlist, "code_bytes": code_bytes, "nbits": nbits, "train_size": train,
            "nprobe": min(IVF_NPROBE, nlist), "rerank": RERANK}


def check_code_bytes(code_bytes: int, dim: int) -> None:
    if code_bytes < 1 or dim % code_bytes:
        divisors = [m for m in range(1, dim + 1) if dim % m == 0 and m <= 64]
        raise ValueError(f"--code-bytes {code_bytes}: expected a divisor of the embedding dimension {dim} (one byte "
                         f"per sub-vector of D / code_bytes components), e.g. {', '.join(map(str, divisors))}")


def build_index(shards: list[np.ndarray], spec: dict[str, Any], seed: int = 0):
    """The faiss index of `spec` over the shards (added one shard at a time), or None for exact search."""
    kind = spec["kind"]
    if kind == "exact":
        return None
    dim = shards[0].shape[1]
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, spec["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = spec["ef_construction"]
        index.hnsw.efSearch = spec["ef_search"]
    else:
        quantizer = faiss.IndexFlatIP(dim)  # the lists' centroids; the IVF index keeps a reference to it
        index = faiss.IndexIVFPQ(quantizer, dim, spec["nlist"], spec["code_bytes"], spec["nbits"],
                                 faiss.METRIC_INNER_PRODUCT)
        offsets = np.cumsum([0] + [len(s) for s in shards])
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(offsets[-1], spec["train_size"], replace=False))
        index.train(take_rows(shards, offsets, sample))
        index.nprobe = spec["nprobe"]
    for s in shards:
        index.add(np.ascontiguousarray(s, dtype=np.float32))
    return index


def take_rows(shards: list[np.ndarray], offsets: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """len(rows) x D float32: the given rows of the concatenated shards, read shard by shard (from a memory map,
    only the pages that hold them)."""
    rows = np.asarray(rows, dtype=np.int64).ravel()
    out = np.empty((len(rows), shards[0].shape[1]), dtype=np.float32)
    order = np.argsort(rows, kind="stable")
    ordered = rows[order]
    bounds = np.searchsorted(ordered, offsets)
    for s, shard in enumerate(shards):
        a, b = bounds[s], bounds[s + 1]
        if a < b:
            out[order[a:b]] = shard[ordered[a:b] - offsets[s]]
    return out


def _top_k(sims: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, 1), np.take_along_axis(ids, order, 1)


# ---- the store, read back ----

@dataclass
class EmbeddingStore:
    shards: list[np.ndarray]  # each n_s x D float32 | float16, memory-mapped; rows in order
    names: list[str]
    labels: np.ndarray | None
    classes: list[str] | None
    model: ModelCard
    root: str = ""
    spec: dict[str, Any] = field(default_factory=lambda: {"kind": "exact"})  # index kind and parameters
    index: Any = None  # faiss index (None for exact)
    skipped: list[list[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])  # shard s holds rows offsets[s]:offsets[s+1]
        if self.offsets[-1] != len(self.names):
            raise ValueError(f"embeddings: the shards hold {self.offsets[-1]} rows, expected {len(self.names)} "
                             f"(one per image)")

    def __len__(self) -> int:
        return len(self.names)

    @property
    def index_kind(self) -> str:
        return self.spec["kind"]

    @property
    def dim(self) -> int:
        return self.shards[0].shape[1]

    @property
    def embeddings(self) -> np.ndarray:
        """The whole N x D matrix in memory, in the stored dtype: for small collections and tests (search reads
        shards and rows, never this)."""
        return np.concatenate(self.shards)

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """The embeddings of the given rows, float32, read from the shards."""
        return take_rows(self.shards, self.offsets, rows)

    def search(self, queries: np.ndarray, k: int, device: str | torch.device = "cpu", ef_search: int | None = None,
               nprobe: int | None = None, rerank: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(n x k similarities, n x k rows), best first; rows -1 where an approximate index found fewer than k.
        exact: shard by shard on `device`; hnsw: the graph (efSearch = ef_search, else the manifest's); ivfpq:
        the top `rerank` by code from `nprobe` lists (else the manifest's), re-ranked exactly."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries: expected n x {self.dim}, got {q.shape}")
        k = min(k, len(self))
        if self.index_kind == "exact":
            best = None
            for s, shard in enumerate(self.shards):
                sims, ids = exact_knn(q, np.asarray(shard, dtype=np.float32), min(k, len(shard)), device)
                found = (sims, ids + self.offsets[s])
                best = found if best is None else _top_k(*(np.hstack(p) for p in zip(best, found)), k)
            return best
        if self.index_kind == "hnsw":
            self.index.hnsw.efSearch = max(ef_search or self.spec["ef_search"], k)
            return self.index.search(q, k)
        self.index.nprobe = min(nprobe or self.spec["nprobe"], self.spec["nlist"])
        r = min(max(rerank or self.spec["rerank"], k), len(self))
        sims, ids = [], []
        for a in range(0, len(q), QUERY_BLOCK):  # bounds the gathered candidates: block x R x D floats
            _, cand = self.index.search(q[a:a + QUERY_BLOCK], r)  # rows by code; -1 past the probed lists' items
            s, i = self.rerank(q[a:a + QUERY_BLOCK], cand, k)
            sims.append(s)
            ids.append(i)
        return np.concatenate(sims), np.concatenate(ids)

    def rerank(self, q: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The top k of each query's candidate rows (n x R, -1 for none) by exact inner product."""
        n, r = cand.shape
        valid = cand >= 0
        vecs = self.rows(np.where(valid, cand, 0)).reshape(n, r, self.dim)
        sims = np.einsum("nrd,nd->nr", vecs, q)  # n x R (3x faster than a batched matmul here)
        sims[~valid] = -np.inf
        sims, ids = _top_k(sims, np.where(valid, cand, -1), min(k, r))
        return sims, ids

    def duplicate_groups(self, threshold: float, rerank: int | None = None) -> list[np.ndarray]:
        """Groups (arrays of rows, largest group first) of the connected components of the graph whose edges are
        the pairs with similarity > threshold; singletons left out. exact: every pair (faiss range search, one
        shard at a time); hnsw and ivfpq: each item's `rerank` nearest by `search` (R from the manifest, 100 for
        hnsw), so an item with more near-duplicates than that reaches the rest through its group."""
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"threshold: expected a cosine similarity in [-1, 1], got {threshold}")
        n = len(self)
        rows, cols = [], []
        blocks = [(a, min(a + QUERY_BLOCK, n)) for a in range(0, n, QUERY_BLOCK)]
        if self.index_kind == "exact":
            for s, shard in enumerate(self.shards):
                flat = faiss.IndexFlatIP(self.dim)
                flat.add(np.ascontiguousarray(shard, dtype=np.float32))
                for a, b in blocks:
                    lims, _, ids = flat.range_search(self.rows(np.arange(a, b)), threshold)  # sims > threshold
                    rows.append(a + np.repeat(np.arange(b - a), np.diff(lims).astype(np.int64)))
                    cols.append(ids + self.offsets[s])
        else:
            r = min(rerank or self.spec.get("rerank", RERANK), n)
            for a, b in blocks:
                sims, ids = self.search(self.rows(np.arange(a, b)), r, rerank=r)
                hit = (sims > threshold) & (ids >= 0)
                rows.append(a + np.nonzero(hit)[0])
                cols.append(ids[hit])
        r, c = np.concatenate(rows), np.concatenate(cols)
        keep = r != c  # an image is not its own duplicate
        graph = coo_matrix((np.ones(int(keep.sum()), dtype=np.int8), (r[keep], c[keep])), shape=(n, n))
        _, comp = connected_components(graph, directed=True, connection="weak")
        order = np.argsort(comp, kind="stable")
        groups = np.split(order, np.flatnonzero(np.diff(comp[order])) + 1)
        groups = [g for g in groups if len(g) > 1]
        return sorted(groups, key=lambda g: (-len(g), g[0]))

    @classmethod
    def load(cls, folder: str | Path) -> "EmbeddingStore":
        folder = Path(folder)
        if not (folder / META).is_file():
            raise ValueError(f"{folder}: not an embedded collection (no {META}; build one with "
                             f"python -m pipeline.embed, or it was interrupted: run it again to resume)")
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT:
            raise ValueError(f"{folder / META}: format {meta.get('format')!r}, expected {FORMAT} (sharded); "
                             f"embed the images again with python -m pipeline.embed")
        shards = [np.load(folder / s["file"], mmap_mode="r") for s in meta["shards"]]
        for s, x in zip(meta["shards"], shards):
            if x.shape != (s["rows"], meta["dim"]) or str(x.dtype) != meta["dtype"]:
                raise ValueError(f"{folder / s['file']}: holds {x.shape} {x.dtype}, {META} says {s['rows']} x "
                                 f"{meta['dim']} {meta['dtype']}: embed the images again")
        with open(folder / ITEMS, newline="", encoding="utf-8") as f:
            items = list(csv.DictReader(f))
        if len(items) != meta["count"]:
            raise ValueError(f"{folder / ITEMS}: {len(items)} rows, {META} says {meta['count']}: embed again")
        labels = np.array([int(r["label"]) for r in items], dtype=np.int64)
        spec = meta["index"]
        index = None if spec["kind"] == "exact" else faiss.read_index(str(folder / INDEX))
        if index is not None and (index.ntotal != meta["count"] or index.d != meta["dim"]):
            raise ValueError(f"{folder / INDEX}: holds {index.ntotal} x {index.d}, expected {meta['count']} x "
                             f"{meta['dim']}: embed the images again")
        return cls(shards, [r["path"] for r in items], None if (labels < 0).all() else labels,
                   meta.get("classes"), ModelCard(**meta["model"]), meta.get("root", ""), spec, index,
                   meta.get("skipped", []))


# ---- writing, chunk by chunk ----

def items_digest(names: list[str], labels: np.ndarray | None) -> str:
    """sha256 of the collection's listing: a resumed run must embed the same items in the same order."""
    h = hashlib.sha256()
    for i, name in enumerate(names):
        h.update(f"{name}\t{-1 if labels is None else int(labels[i])}\n".encode())
    return h.hexdigest()


class ChunkWriter:
    """The folder of a store being written. Chunk c holds the collection's rows [c S, min((c + 1) S, count)).

    `start` (one process: rank 0, before anyone writes) keeps the finished chunks of the same plan and returns
    the others; each process `write`s its chunks; `finish` (rank 0, after every chunk) writes items, index and
    manifest."""

    def __init__(self, folder: str | Path, plan: dict[str, Any]):
        self.folder, self.plan = Path(folder), {"format": FORMAT, **plan}
        self.dir = self.folder / SHARDS
        self.count, self.chunk_rows = int(plan["count"]), int(plan["chunk_rows"])
        if self.chunk_rows < 1:
            raise ValueError(f"--chunk-size {self.chunk_rows}: expected >= 1")
        self.n_chunks = -(-self.count // self.chunk_rows)

    def bounds(self, c: int) -> tuple[int, int]:
        return c * self.chunk_rows, min((c + 1) * self.chunk_rows, self.count)

    def _file(self, c: int, suffix: str) -> Path:
        return self.dir / f"{c:06d}{suffix}"

    def done(self, c: int) -> bool:
        return self._file(c, ".json").is_file()

    def start(self) -> list[int]:
        """Prepare the folder; the chunks still to compute."""
        (self.folder / META).unlink(missing_ok=True)  # incomplete until the manifest is back
        self.dir.mkdir(parents=True, exist_ok=True)
        for tmp in self.dir.glob(".*.tmp"):  # a write that a kill interrupted: never renamed, never read
            tmp.unlink()
        plan_file = self.dir / PLAN
        old = json.loads(plan_file.read_text(encoding="utf-8")) if plan_file.is_file() else None
        if old != self.plan:
            stale = sorted(self.dir.glob("*.json")) + sorted(self.dir.glob("*.npy"))
            if old is not None and stale:
                changed = sorted(k for k in set(old) | set(self.plan) if old.get(k) != self.plan.get(k))
                log.warning("%s: %d finished chunks of another plan (%s changed) are discarded", self.dir,
                            len([p for p in stale if p.suffix == ".json"]) - 1, ", ".join(changed))
            for p in stale:
                p.unlink()
            with atomic_path(plan_file) as tmp:
                tmp.write_text(json.dumps(self.plan, indent=1) + "\n", encoding="utf-8")
        todo = [c for c in range(self.n_chunks) if not self.done(c)]
        if len(todo) < self.n_chunks:
            log.warning("%s: resuming: %d of %d chunks already finished", self.dir, self.n_chunks - len(todo),
                        self.n_chunks)
        return todo

    def write(self, c: int, emb: np.ndarray, skipped_rows: list[int], skipped: list[tuple[str, str]]) -> None:
        """Chunk c: the embeddings of its rows that decoded, the positions in it of those that did not."""
        a, b = self.bounds(c)
        if len(emb) + len(skipped_rows) != b - a:
            raise ValueError(f"chunk {c}: {len(emb)} embeddings + {len(skipped_rows)} skipped, expected {b - a}")
        with atomic_path(self._file(c, ".npy")) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(emb, dtype=self.plan["dtype"]))
        record = {"rows": [a, b], "skipped_rows": [int(i) for i in skipped_rows], "skipped": [list(s) for s in skipped]}
        with atomic_path(self._file(c, ".json")) as tmp:  # last: the chunk's completion mark
            tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")

    def finish(self, names: list[str], labels: np.ndarray | None, classes: list[str] | None, card: ModelCard,
               root: str, kind: str, code_bytes: int = PQ_CODE_BYTES) -> dict[str, Any]:
        """items.csv, the index and the manifest from the finished chunks; returns the manifest."""
        missing = [c for c in range(self.n_chunks) if not self.done(c)]
        if missing:
            raise ValueError(f"{self.dir}: chunks {missing[:5]} not finished; run the embed again to resume")
        kept, skipped, shards = [], [], []
        for c in range(self.n_chunks):
            a, b = self.bounds(c)
            record = json.loads(self._file(c, ".json").read_text(encoding="utf-8"))
            rows = np.delete(np.arange(a, b), record["skipped_rows"])
            skipped += record["skipped"]
            if len(rows):  # a chunk whose images all failed has no shard (numpy cannot map an empty file)
                kept.append(rows)
                shards.append({"file": f"{SHARDS}/{c:06d}.npy", "rows": len(rows)})
        if not kept:
            raise ValueError(f"none of the {self.count} images could be decoded (first: {skipped[0][0]}: "
                             f"{skipped[0][1]})")
        kept = np.concatenate(kept)
        with atomic_path(self.folder / ITEMS) as tmp:
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f, lineterminator="\n")
                w.writerow(["row", "path", "label", "class"])
                for i, src in enumerate(kept.tolist()):
                    label = -1 if labels is None else int(labels[src])
                    w.writerow([i, names[src], label, "" if label < 0 or classes is None else classes[label]])
        arrays = [np.load(self.folder / s["file"], mmap_mode="r") for s in shards]
        spec = index_spec(kind, len(kept), arrays[0].shape[1], code_bytes)
        t = time.perf_counter()
        index = build_index(arrays, spec)
        if index is not None:
            with atomic_path(self.folder / INDEX) as tmp:
                faiss.write_index(index, str(tmp))
            log.info("%s index over %d items built in %.1f s", kind, len(kept), time.perf_counter() - t)
        else:
            (self.folder / INDEX).unlink(missing_ok=True)
        meta = {"format": FORMAT, "count": len(kept), "dim": int(arrays[0].shape[1]), "dtype": self.plan["dtype"],
                "shards": shards, "chunk_rows": self.chunk_rows, "index": spec, "root": root,
                "model": asdict(card), "classes": classes, "skipped": skipped}
        with atomic_path(self.folder / META) as tmp:
            tmp.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        return meta


def save_arrays(folder: str | Path, chunks, count: int, card: ModelCard, kind: str = "exact",
                names: list[str] | None = None, labels: np.ndarray | None = None, classes: list[str] | None = None,
                chunk_rows: int = CHUNK_ROWS, dtype: str = "float32", code_bytes: int = PQ_CODE_BYTES) -> Path:
    """A store from embeddings already computed: `chunks` yields consecutive arrays of chunk_rows rows (the last
    one shorter), `count` rows in all, so the whole matrix never has to be in memory (bench.search, tests)."""
    names = names if names is not None else [str(i) for i in range(count)]
    writer = ChunkWriter(folder, {"count": count, "chunk_rows": chunk_rows, "dtype": dtype, "model": card.digest,
                                  "items": items_digest(names, labels)})
    writer.start()
    for c, x in enumerate(chunks):
        writer.write(c, x, [], [])
    writer.finish(names, labels, classes, card, "", kind, code_bytes)
    return Path(folder)
