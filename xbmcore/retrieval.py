"""What a trained embedding retrieves, query by query: its top-k neighbours and the rank of its first relevant
item. The evaluate stage's retrieval figure and the desktop app's Retrieval tab read these.

Two protocols, as in xbmcore.evaluate: the query set is its own gallery (gallery None; each query's own copy is
excluded, by id), or separate query and gallery sets. Embeddings are L2-normalised, so inner product = cosine.
"""
from __future__ import annotations

import numpy as np

from xbmcore.evaluate import _as_embeddings, _rank_counts
from xbmcore.knn import exact_knn


def _without_self(ids: np.ndarray, self_ids: np.ndarray) -> np.ndarray:
    """Mask (n x (k+1) -> True = keep) removing each query's own id from its k+1 neighbours: by id, not position,
    since exact duplicates may tie with it; where it is absent (more than k duplicates) the last one goes."""
    is_self = ids == self_ids[:, None]
    drop = np.where(is_self.any(1), is_self.argmax(1), ids.shape[1] - 1)
    keep = np.ones(ids.shape, dtype=bool)
    keep[np.arange(len(ids)), drop] = False
    return keep


def _pair(query, query_labels, gallery, gallery_labels) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    q, ql = _as_embeddings("query", query, query_labels)
    if gallery is None:
        if len(q) < 2:
            raise ValueError(f"query: query = gallery with self excluded needs >= 2 items, got {len(q)}")
        return q, ql, q, ql
    g, gl = _as_embeddings("gallery", gallery, gallery_labels)
    if g.shape[1] != q.shape[1]:
        raise ValueError(f"gallery: expected dimension D = {q.shape[1]} (the query's), got {g.shape[1]}")
    return q, ql, g, gl


def nearest(query: np.ndarray, gallery: np.ndarray, k: int,
            exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by cosine: (sims n x k float32, best first; ids n x k int64 gallery rows).

    exclude[i]: query i's own row in the gallery, left out of its neighbours (the query = gallery protocol:
    np.arange(n)), or -1 for a query from elsewhere (a dropped image file). k is capped at the number of
    candidates. Exact search: the library's one exact kNN (xbmcore.knn).

    Args:
        query: n x D query embeddings (or one D-vector); normalised here.
        gallery: N x D gallery embeddings; normalised here.
        k: neighbours per query (an integer >= 1; capped at the candidates).
        exclude: n gallery rows (or -1), one per query, left out of that query's neighbours; None: none.

    Returns:
        ``(sims, ids)``: n x k float32 cosine similarities, best first, and n x k int64 gallery rows.

    Raises:
        ValueError: k not an integer >= 1, mis-shaped or non-finite embeddings, or an invalid `exclude`.
    """
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k: expected an integer >= 1, got {k!r}")
    q = np.atleast_2d(np.asarray(query, dtype=np.float32))
    g = np.asarray(gallery, dtype=np.float32)
    q, _, g, _ = _pair(q, np.zeros(len(q), np.int64), g, np.zeros(len(g), np.int64))
    extra = 0
    if exclude is not None:
        exclude = np.asarray(exclude, dtype=np.int64)
        if exclude.shape != (len(q),) or (exclude >= len(g)).any() or (exclude < -1).any():
            raise ValueError(f"exclude: expected one gallery row in 0..{len(g) - 1} (or -1) per query, got "
                             f"{exclude.tolist() if exclude.size <= 8 else exclude.shape}")
        extra = 1
    k = min(int(k), len(g) - int(exclude is not None and (exclude >= 0).any()))
    sims, ids = exact_knn(q, g, k + extra)
    if extra:  # by id: duplicates may tie with the query's own copy; where it is absent the extra one goes
        keep = _without_self(ids, exclude)
        sims, ids = sims[keep].reshape(len(q), k), ids[keep].reshape(len(q), k)
    return sims, ids


def first_relevant_rank(query: np.ndarray, query_labels: np.ndarray, gallery: np.ndarray | None = None,
                        gallery_labels: np.ndarray | None = None) -> np.ndarray:
    """1-based rank of each query's first same-label gallery item in its full ranking; 0 when it has none.

    The worst queries are those with the largest rank. Rank = 1 + the number of irrelevant candidates at least as
    similar as the most similar relevant one: a tie counts against the query, as in Recall@K
    (xbmcore.evaluate, whose exact counting pass this is, uncapped).

    Args:
        query: n x D query embeddings (normalised here).
        query_labels: n integer labels.
        gallery: N x D gallery embeddings; None: the queries are their own gallery, each excluding itself.
        gallery_labels: N integer labels; given exactly when `gallery` is.

    Returns:
        n int64 ranks, 1-based; 0 for a query without any relevant gallery item.
    """
    self_excluded = gallery is None
    q, ql, g, gl = _pair(query, query_labels, gallery, gallery_labels)
    above, _, _, R = _rank_counts(q, ql, g, gl, self_excluded, kmax=len(g))
    return np.where(R > 0, above + 1, 0)


def worst_first(ranks: np.ndarray) -> np.ndarray:
    """Query rows ordered from the largest first-relevant rank down (ties: lower row first); queries without
    any relevant item (rank 0) last.

    Args:
        ranks: n first-relevant ranks (`first_relevant_rank`).

    Returns:
        The n query rows, worst first.
    """
    ranks = np.asarray(ranks, dtype=np.int64)
    key = np.where(ranks > 0, ranks, -1)
    return np.argsort(-key, kind="stable")


def sample_queries(n: int, count: int, seed: int = 0) -> np.ndarray:
    """A fixed sample of `count` query rows out of n (sorted): the same queries for every model of a dataset, so
    their figures compare.

    Args:
        n: the number of queries (>= 1).
        count: how many to draw (capped at n).
        seed: the draw's seed.

    Returns:
        min(count, n) distinct query rows, sorted.

    Raises:
        ValueError: n < 1.
    """
    if n < 1:
        raise ValueError(f"n: expected at least one query, got {n}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=min(count, n), replace=False))
