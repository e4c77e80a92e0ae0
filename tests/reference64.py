"""Float64 brute-force references of the retrieval metrics, for the tests of the benches and the pipeline: what
a bench or a stage reports is compared with a value computed another way, never only bounded."""
from __future__ import annotations

import numpy as np


def recall_float64(x: np.ndarray, labels: np.ndarray, ks) -> dict[str, float]:
    """Brute force in float64: a query hits at K iff one of its K most similar other items shares its label."""
    sim = x.astype(np.float64) @ x.astype(np.float64).T
    np.fill_diagonal(sim, -np.inf)
    order = np.argsort(-sim, axis=1, kind="stable")
    rel = labels[order] == labels[:, None]
    first = np.where(rel.any(1), rel.argmax(1), len(x))
    return {f"recall@{k}": float((first < k).mean()) for k in ks}


def metrics_float64(x: np.ndarray, labels: np.ndarray, ks, tol: float = 1e-5):
    """Recall@K and MAP@R of query = gallery (self excluded) in float64, ties counted against the query as the
    library does, with what float32 rounding could change: per K the queries whose decision flips if similarities
    move by `tol`, and the share of queries whose top R + 1 hold a relevant and an irrelevant item next to each
    other within `tol` (their AP@R may differ)."""
    x = x.astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    same = labels[:, None] == labels[None, :]
    np.fill_diagonal(same, False)
    t = np.where(same, sim, -np.inf).max(1)  # each query's best positive; -inf: none, a miss at every K
    neg = np.where(same, -np.inf, sim)
    above = np.where(np.isfinite(t), (neg >= t[:, None]).sum(1), len(x))
    lo, hi = (neg >= (t + tol)[:, None]).sum(1), (neg >= (t - tol)[:, None]).sum(1)
    ref = {f"recall@{k}": float((above < k).mean()) for k in ks}
    ties = {f"recall@{k}": int(((lo < k) & (k <= hi) & np.isfinite(t)).sum()) for k in ks}
    aps, unsure = [], 0
    for q in range(len(x)):
        R = int(same[q].sum())
        if R == 0:
            continue
        # Descending similarity, an irrelevant item before a relevant one of the same similarity.
        order = np.lexsort((same[q], -sim[q]))
        rel = same[q][order[:R]]
        aps.append(float((np.cumsum(rel) / np.arange(1, R + 1) * rel).sum() / R))
        top, top_rel = sim[q][order[:R + 1]], same[q][order[:R + 1]]
        unsure += bool(((np.abs(np.diff(top)) < tol) & (top_rel[1:] != top_rel[:-1])).any())
    ref["map@r"] = float(np.mean(aps))
    return ref, ties, unsure / len(aps)
