"""Retrieval evaluation: Recall@K, MAP@R, R-precision (Musgrave et al., "A Metric Learning Reality Check",
ECCV 2020) and NMI, on L2-normalised embeddings searched exactly by inner product = cosine (xbmcore.knn: faiss on
the CPU, torch on a GPU).

Two protocols: query = gallery with the query itself excluded (SOP, CUB, Cars: `gallery=None`), and separate
query and gallery sets (In-Shop, VehicleID).
"""
from __future__ import annotations

from typing import Callable, Literal, Sequence

import faiss
import numpy as np
import torch
from sklearn.metrics import normalized_mutual_info_score
from torch.utils.data import DataLoader, Dataset

from xbmcore.data.batch import collate_for, to_device

from xbmcore.knn import iter_exact_knn

NMI_SEED = 0
NMI_NITER = 20


def compute_embeddings(
    model: torch.nn.Module, dataset: Dataset, batch_size: int = 256, device: str | torch.device = "cpu",
    num_workers: int = 0, progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Embed a dataset whose items are (image, label, index): returns (N x D float32, N int64 labels).

    Runs in eval mode without gradients and restores the model's train/eval mode afterwards. The model must
    already be on `device`. progress(done, total) is called after each batch (a window's progress bar; it may
    raise to stop early).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_for(device))
    was_training = model.training
    model.eval()
    feats, labels = [], []
    try:
        with torch.inference_mode():
            for batch in loader:
                imgs, y, _ = to_device(batch, device)  # a cached batch gets the test view on the device
                feats.append(model(imgs).float().cpu().numpy())
                labels.append(y.cpu().numpy().astype(np.int64, copy=False))
                if progress is not None:
                    progress(sum(map(len, labels)), len(dataset))
    finally:
        model.train(was_training)
    if not feats:
        raise ValueError("compute_embeddings: the dataset is empty")
    return np.ascontiguousarray(np.concatenate(feats), dtype=np.float32), np.concatenate(labels)


def _as_embeddings(name: str, x, labels) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    x = np.asarray(x)
    labels = np.asarray(labels)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name}: expected a non-empty N x D array of embeddings, got shape {x.shape}")
    if labels.ndim != 1 or len(labels) != len(x):
        raise ValueError(f"{name}_labels: expected {len(x)} labels (one per {name} row), got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name}_labels: expected integer labels, got dtype {labels.dtype}")
    x = np.array(x, dtype=np.float32, order="C")  # a copy: normalised in place below
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: {int((~np.isfinite(x).all(1)).sum())} rows contain NaN or inf")
    faiss.normalize_L2(x)  # a no-op up to rounding for model outputs; makes IP the cosine for any input
    return x, labels.astype(np.int64, copy=False)


def _without_self(ids: np.ndarray, self_ids: np.ndarray) -> np.ndarray:
    """Mask (n x (k+1) -> True = keep) removing each query's own id from its k+1 neighbours: by id, not position,
    since exact duplicates may tie with it; where it is absent (more than k duplicates) the last one goes."""
    is_self = ids == self_ids[:, None]
    drop = np.where(is_self.any(1), is_self.argmax(1), ids.shape[1] - 1)
    keep = np.ones(ids.shape, dtype=bool)
    keep[np.arange(len(ids)), drop] = False
    return keep


def retrieval_metrics(
    query, query_labels, gallery=None, gallery_labels=None, recall_at: Sequence[int] = (1, 10, 100),
    nmi: bool = True, device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Recall@K for each K, MAP@R, R-precision and (when `nmi`) NMI of the query embeddings.

    gallery None: the query set is its own gallery and each query is excluded from its own neighbours.
    Recall@K: fraction of queries with at least one same-label item among their K nearest gallery items (a query
    without any relevant item counts as a miss). MAP@R and R-precision, with R = number of relevant gallery
    items of the query, average over queries with R > 0 (NaN if there is none). NMI: k-means (faiss, seeded) on
    the query embeddings with as many clusters as query classes, against the labels. K larger than the gallery
    is allowed (then Recall@K is the fraction of queries with any relevant item).
    """
    q, ql = _as_embeddings("query", query, query_labels)
    self_excluded = gallery is None
    if self_excluded:
        if gallery_labels is not None:
            raise ValueError("gallery_labels given without gallery: pass both, or neither for query = gallery")
        if len(q) < 2:
            raise ValueError(f"query: query = gallery with self excluded needs >= 2 items, got {len(q)}")
        g, gl = q, ql
    else:
        if gallery_labels is None:
            raise ValueError("gallery given without gallery_labels")
        g, gl = _as_embeddings("gallery", gallery, gallery_labels)
        if g.shape[1] != q.shape[1]:
            raise ValueError(f"gallery: expected dimension D = {q.shape[1]} (the query's), got {g.shape[1]}")
    ks = list(recall_at)
    if not ks or any(not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1 for k in ks):
        raise ValueError(f"recall_at: expected a non-empty list of integers >= 1, got {recall_at}")
    n_gallery = len(g) - self_excluded  # candidates per query

    # R: relevant gallery items per query (its own copy excluded).
    classes, counts = np.unique(gl, return_counts=True)
    at = np.minimum(np.searchsorted(classes, ql), len(classes) - 1)
    R = np.where(classes[at] == ql, counts[at], 0) - self_excluded
    r_max = int(R.max())
    # Exact: k covers the largest K and the largest R, so MAP@R never truncates a class.
    k = min(max(max(ks), r_max), n_gallery)

    first_hit = np.empty(len(q), dtype=np.int64)  # rank of the first relevant neighbour, k if none in the top k
    ap = np.zeros(len(q))
    rp = np.zeros(len(q))
    for s, e, _, ids in iter_exact_knn(q, g, k + self_excluded, device):  # ids: n x k(+1), best first
        rel = gl[ids] == ql[s:e, None]  # n x k(+1): same label
        if self_excluded:
            rel = rel[_without_self(ids, np.arange(s, e))].reshape(e - s, k)  # n x k
        first_hit[s:e] = np.where(rel.any(1), rel.argmax(1), k)
        # Musgrave MAP@R: (1/R) sum_{i<=R} P(i) rel(i); R-precision: (relevant in top R) / R.
        Rc = R[s:e]
        relr = rel[:, :r_max] & (np.arange(r_max) < Rc[:, None])  # n x r_max, only the top R count
        hits = np.cumsum(relr, axis=1)
        denom = np.maximum(Rc, 1)
        ap[s:e] = (hits / np.arange(1, r_max + 1) * relr).sum(1) / denom
        rp[s:e] = hits[:, -1] / denom if r_max else 0.0

    out = {f"recall@{K}": float((first_hit < K).mean()) for K in ks}
    has_rel = R > 0
    out["map@r"] = float(ap[has_rel].mean()) if has_rel.any() else float("nan")
    out["r_precision"] = float(rp[has_rel].mean()) if has_rel.any() else float("nan")
    if nmi:
        out["nmi"] = nmi_score(q, ql)
    return out


def nmi_score(emb: np.ndarray, labels: np.ndarray, seed: int = NMI_SEED) -> float:
    """NMI between the labels and a seeded k-means clustering (C = number of classes) of the embeddings."""
    C = len(np.unique(labels))
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    # min_points_per_centroid=1: retrieval test sets have ~5 items per class, far below faiss's default 39.
    km = faiss.Kmeans(emb.shape[1], C, niter=NMI_NITER, seed=seed, min_points_per_centroid=1, verbose=False)
    km.train(emb)
    _, assign = km.index.search(emb, 1)
    return float(normalized_mutual_info_score(labels, assign[:, 0]))


def eval_sets(splits, which: Literal["val", "test"]) -> tuple[Dataset, Dataset | None]:
    """(query set, gallery set) of a split: "val" searches the val split in itself (gallery None); "test" the test
    split in itself, or, for datasets with query and gallery sets (splits.test is None), the query set in the
    gallery set."""
    if which == "val":
        if splits.val is None:
            raise ValueError("evaluate 'val': the dataset has no val split (set data.val_fraction > 0)")
        return splits.val, None
    if which == "test":
        if splits.test is not None:
            return splits.test, None
        if splits.query is not None and splits.gallery is not None:
            return splits.query, splits.gallery
        raise ValueError("evaluate 'test': the dataset has neither a test split nor query and gallery sets")
    raise ValueError(f"which: expected 'val' or 'test', got {which!r}")


def embed_split(
    model: torch.nn.Module, splits, which: Literal["val", "test"], batch_size: int = 256,
    device: str | torch.device = "cpu", num_workers: int = 0, progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(query, query_labels, gallery, gallery_labels) embeddings of a split (see eval_sets); gallery None when
    the query set is its own gallery: retrieval_metrics' arguments. progress(done, total) counts both sets."""
    query_set, gallery_set = eval_sets(splits, which)
    total = len(query_set) + (len(gallery_set) if gallery_set is not None else 0)

    def counted(offset: int):
        return None if progress is None else (lambda done, _: progress(offset + done, total))

    q, ql = compute_embeddings(model, query_set, batch_size, device, num_workers, counted(0))
    if gallery_set is None:
        return q, ql, None, None
    return (q, ql, *compute_embeddings(model, gallery_set, batch_size, device, num_workers, counted(len(q))))


def evaluate_model(
    model: torch.nn.Module, splits, which: Literal["val", "test"], recall_at: Sequence[int] = (1, 10, 100),
    batch_size: int = 256, device: str | torch.device = "cpu", nmi: bool = True, num_workers: int = 0,
) -> dict[str, float]:
    """Embed a split (see eval_sets) and score it."""
    return retrieval_metrics(*embed_split(model, splits, which, batch_size, device, num_workers),
                             recall_at=recall_at, nmi=nmi, device=device)
