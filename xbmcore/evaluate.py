"""Retrieval evaluation: Recall@K, MAP@R, R-precision (Musgrave et al., "A Metric Learning Reality Check",
ECCV 2020) and NMI, on L2-normalised embeddings searched exactly by inner product = cosine (xbmcore.knn: faiss on
the CPU, torch on a GPU).

Two protocols: query = gallery with the query itself excluded (SOP, CUB, Cars: `gallery=None`), and separate
query and gallery sets (In-Shop, VehicleID).
"""
from __future__ import annotations

from typing import Literal, Sequence

import faiss
import numpy as np
import torch
from sklearn.metrics import normalized_mutual_info_score
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

from xbmcore.knn import iter_exact_knn

NMI_SEED = 0
NMI_NITER = 20


def _collate(batch):
    # A dataset's __getitems__ may return the collated (imgs, labels, idx) tuple already, or a list of samples.
    if isinstance(batch, (tuple, list)) and len(batch) == 3 and isinstance(batch[0], torch.Tensor) \
            and batch[0].dim() == 4:
        return batch
    return default_collate(batch)


def compute_embeddings(
    model: torch.nn.Module, dataset: Dataset, batch_size: int = 256, device: str | torch.device = "cpu",
    num_workers: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Embed a dataset whose items are (image, label, index): returns (N x D float32, N int64 labels).

    Runs in eval mode without gradients and restores the model's train/eval mode afterwards. The model must
    already be on `device`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_collate)
    was_training = model.training
    model.eval()
    feats, labels = [], []
    try:
        with torch.inference_mode():
            for imgs, y, _ in loader:
                feats.append(model(imgs.to(device)).float().cpu().numpy())
                labels.append(np.asarray(y, dtype=np.int64))
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


def evaluate_model(
    model: torch.nn.Module, splits, which: Literal["val", "test"], recall_at: Sequence[int] = (1, 10, 100),
    batch_size: int = 256, device: str | torch.device = "cpu", nmi: bool = True, num_workers: int = 0,
) -> dict[str, float]:
    """Embed a split and score it: "val" searches the val split in itself; "test" the test split in itself, or,
    for datasets with query and gallery sets (splits.test is None), the query set in the gallery set."""
    if which == "val":
        if splits.val is None:
            raise ValueError("evaluate 'val': the dataset has no val split (set data.val_fraction > 0)")
        pairs = (splits.val, None)
    elif which == "test":
        if splits.test is not None:
            pairs = (splits.test, None)
        elif splits.query is not None and splits.gallery is not None:
            pairs = (splits.query, splits.gallery)
        else:
            raise ValueError("evaluate 'test': the dataset has neither a test split nor query and gallery sets")
    else:
        raise ValueError(f"which: expected 'val' or 'test', got {which!r}")
    q, ql = compute_embeddings(model, pairs[0], batch_size, device, num_workers)
    if pairs[1] is None:
        return retrieval_metrics(q, ql, recall_at=recall_at, nmi=nmi, device=device)
    g, gl = compute_embeddings(model, pairs[1], batch_size, device, num_workers)
    return retrieval_metrics(q, ql, g, gl, recall_at=recall_at, nmi=nmi, device=device)
