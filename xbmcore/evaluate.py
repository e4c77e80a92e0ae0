"""Retrieval evaluation: Recall@K, MAP@R, R-precision (Musgrave et al., "A Metric Learning Reality Check",
ECCV 2020) and NMI, on L2-normalised embeddings scored exactly by inner product = cosine.

Recall@K up to K = 1000 needs no top-1000 lists: a query hits at K iff fewer than K irrelevant items are at
least as similar as its most similar relevant one. One torch pass per chunk of queries (the same code on the CPU
and the GPU) computes the chunk x gallery similarities, takes the maximum of every GROUP consecutive columns,
and counts and ranks on those maxima: only the groups whose maximum reaches a query's threshold are opened, and
the top R (for MAP@R, R = the relevant items of the query, a few) lie in the R best groups. Everything is
decided on the same float32 similarities, so the result does not depend on how a BLAS orders near-equal values.

Two protocols: query = gallery with the query itself excluded (SOP, CUB, Cars: `gallery=None`), and separate
query and gallery sets (In-Shop, VehicleID).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Literal, Sequence

import numpy as np
import torch
from sklearn.metrics import normalized_mutual_info_score
from torch.utils.data import DataLoader, Dataset

from xbmcore.blas import load_faiss
from xbmcore.data.batch import collate_for, to_device

if TYPE_CHECKING:
    from xbmcore.data.prepare import Splits

NMI_SEED = 0
NMI_NITER = 20
# Columns per group maximum. The maxima cost ~6% of the GEMM on the CPU (one read of the block), and a query
# opens about (irrelevant items above its threshold) x GROUP values, a few % of its row for a trained model.
GROUP = 64
# The chunk x gallery float32 similarity block stays under this many bytes: ~1,100 queries of an SOP-sized gallery
# on the CPU, where the GEMM ran 10% faster than with ~280; 1 GiB on a GPU.
BLOCK_BYTES = {"cpu": 256 << 20, "cuda": 1 << 30}
NEVER = 1 << 62  # a rank count that is "too deep to matter"; far from overflow when ranks are added to it


def compute_embeddings(
    model: torch.nn.Module, dataset: Dataset, batch_size: int = 256, device: str | torch.device = "cpu",
    num_workers: int = 0, progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Embed a dataset whose items are (image, label, index): returns (N x D float32, N int64 labels).

    Runs in eval mode without gradients and restores the model's train/eval mode afterwards. The model must
    already be on `device`. progress(done, total) is called after each batch (a window's progress bar; it may
    raise to stop early).

    Args:
        model: the embedding network (B x 3 x H x W -> B x D), already on `device`.
        dataset: items ``(image, label, index)``, e.g. an ImageDataset split (its test view for evaluation).
        batch_size: images per forward pass (>= 1).
        device: where the model runs; batches are moved (and cached batches augmented) there.
        num_workers: DataLoader worker processes (0: load in this process).
        progress: called as ``progress(done, total)`` after each batch, with images embedded so far and
            ``len(dataset)``; may raise to stop early.

    Returns:
        ``(embeddings, labels)``: N x D float32 (C-contiguous) and N int64, in the dataset's order.

    Raises:
        ValueError: batch_size < 1, or an empty dataset.
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
    load_faiss().normalize_L2(x)  # a no-op up to rounding for model outputs; makes IP the cosine for any input
    return x, labels.astype(np.int64, copy=False)


def retrieval_metrics(
    query: np.ndarray | torch.Tensor, query_labels: np.ndarray | torch.Tensor,
    gallery: np.ndarray | torch.Tensor | None = None, gallery_labels: np.ndarray | torch.Tensor | None = None,
    recall_at: Sequence[int] = (1, 10, 100), nmi: bool = True, device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Recall@K for each K, MAP@R, R-precision and (when `nmi`) NMI of the query embeddings.

    gallery None: the query set is its own gallery and each query is excluded from its own neighbours.
    Recall@K: fraction of queries with at least one same-label item among their K nearest gallery items (a query
    without any relevant item counts as a miss). MAP@R and R-precision, with R = number of relevant gallery
    items of the query, average over queries with R > 0 (NaN if there is none). NMI: k-means (faiss, seeded) on
    the query embeddings with as many clusters as query classes, against the labels. K larger than the gallery
    is allowed (then Recall@K is the fraction of queries with any relevant item).

    Args:
        query: n x D query embeddings (numpy or torch; normalised to unit length here, so inner product =
            cosine). NaN or inf rows are refused.
        query_labels: n integer labels of the queries.
        gallery: N x D gallery embeddings; None: the queries are their own gallery, each query excluded from its
            own neighbours.
        gallery_labels: N integer labels of the gallery; given exactly when `gallery` is.
        recall_at: the K of each Recall@K (a non-empty list of integers >= 1).
        nmi: also compute NMI (a seeded faiss k-means of the queries; costly on large sets).
        device: where the similarity blocks are computed (``"cpu"`` or a CUDA device); the same result on both.

    Returns:
        ``{"recall@K": ... for each K, "map@r": ..., "r_precision": ..., "nmi": ...}`` (nmi only with `nmi`),
            floats in [0, 1]; map@r and r_precision are NaN when no query has a relevant item.

    Raises:
        ValueError: empty, mis-shaped or non-finite embeddings, labels that do not match them, gallery without
            gallery_labels (or the reverse), dimensions that differ, fewer than 2 queries searched in themselves,
            or an invalid recall_at.
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

    above, ap, rp, R = _rank_counts(q, ql, g, gl, self_excluded, max(ks), device)

    out = {f"recall@{K}": float((above < K).mean()) for K in ks}
    has_rel = R > 0
    out["map@r"] = float(ap[has_rel].mean()) if has_rel.any() else float("nan")
    out["r_precision"] = float(rp[has_rel].mean()) if has_rel.any() else float("nan")
    if nmi:
        out["nmi"] = nmi_score(q, ql)
    return out


def _rank_counts(q: np.ndarray, ql: np.ndarray, g: np.ndarray, gl: np.ndarray, self_excluded: bool, kmax: int,
                 device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """_score's (above, AP@R, R-precision) for normalised embeddings, plus R (relevant gallery items per query,
    its own copy excluded)."""
    order = np.argsort(gl, kind="stable")
    classes, first, counts = np.unique(gl[order], return_index=True, return_counts=True)
    at = np.minimum(np.searchsorted(classes, ql), len(classes) - 1)
    known = classes[at] == ql
    size = np.where(known, counts[at], 0)
    R = size - self_excluded
    return (*_score(q, g, self_excluded, order, np.where(known, first[at], 0), size, R, kmax, device), R)


def _score(q: np.ndarray, g: np.ndarray, self_excluded: bool, order: np.ndarray,
           first: np.ndarray, size: np.ndarray, R: np.ndarray, kmax: int, device: str | torch.device,
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per query: the irrelevant gallery items at least as similar as its most similar relevant one (exact below
    kmax, NEVER from kmax on and without a relevant item), its AP@R and its R-precision.

    order sorts the gallery by label; a query's relevant items are order[first : first + size] (size 0: none),
    itself among them when self_excluded; R counts them without itself. Ties count against the query: an
    irrelevant item as similar as a relevant one ranks before it. Relevant item j (0-based, most similar first)
    then ranks a_j + j + 1, with a_j the irrelevant items at least as similar; only a_0 (Recall@K) and the a_j
    that place j in the top R (AP@R, R-precision) are needed exactly.
    """
    dev = torch.device(device)
    N, D = g.shape
    Ng = -(-N // GROUP)
    Np = Ng * GROUP
    gt = torch.zeros(Np, D, dtype=torch.float32, device=dev)  # padded to whole groups; pad columns set to -inf
    gt[:N] = torch.from_numpy(g).to(dev)
    order_t = torch.from_numpy(order).to(dev)
    P = max(int(size.max()), 1)  # the largest relevant set (one -inf column where there is none)
    n_max = max(1, min(len(q), (BLOCK_BYTES.get(dev.type) or BLOCK_BYTES["cuda"]) // (4 * Np)))
    buf = torch.empty(n_max, Np, dtype=torch.float32, device=dev)
    inf = float("-inf")
    jj = torch.arange(P, device=dev)
    j1 = np.arange(1, P + 1)
    above = np.empty(len(q), dtype=np.int64)
    ap, rp = np.zeros(len(q)), np.zeros(len(q))
    with torch.inference_mode():
        for s in range(0, len(q), n_max):
            e = min(s + n_max, len(q))
            n = e - s
            sim = torch.matmul(torch.from_numpy(q[s:e]).to(dev), gt.T, out=buf[:n])  # n x Np
            sim[:, N:] = inf
            rows = torch.arange(n, device=dev)
            if self_excluded:
                sim[rows, rows + s] = inf
            # The relevant items' similarities, read from the block itself (the same rounding as the rest).
            f = torch.from_numpy(first[s:e]).to(dev)
            Rc = torch.from_numpy(R[s:e]).to(dev)
            cols = order_t[(f[:, None] + jj).clamp(max=N - 1)]
            valid = jj < torch.from_numpy(size[s:e]).to(dev)[:, None]
            th = sim.gather(1, cols).masked_fill_(~valid, inf).sort(1).values  # n x P ascending; self is -inf
            # Relevant j (descending order) has threshold th[:, P-1-j]; an item v is >= it iff k(v) >= P - j,
            # where k(v) = thresholds <= v (searchsorted).
            rel_ge = _count_ge(rows.repeat_interleave(P), torch.searchsorted(th, th, right=True), n, P)
            blocks = sim.view(n, Ng, GROUP)
            gmax = blocks.amax(2)  # n x Ng
            groups_ge = _count_ge(rows.repeat_interleave(Ng), torch.searchsorted(th, gmax, right=True), n, P)
            # Each relevant item >= th_j fills at most one group: the rest hold an irrelevant item >= th_j.
            surely = groups_ge - rel_ge
            cap = (Rc[:, None] - jj - 1).clamp(min=-1)  # a_j beyond cap: j is not in the top R
            cap[:, 0] = torch.maximum(cap[:, 0], torch.full_like(cap[:, 0], kmax - 1))
            pending = (surely <= cap) & (jj < Rc[:, None])
            deepest = torch.where(pending, jj, -1).amax(1)  # n: open every group reaching its threshold
            a = torch.full((n, P), NEVER, dtype=torch.int64, device=dev)
            todo = (deepest >= 0).nonzero()[:, 0]
            if len(todo):
                low = th[todo, P - 1 - deepest[todo]]
                i, gi = (gmax[todo] >= low[:, None]).nonzero().unbind(1)  # the groups to open
                vals = blocks[todo[i], gi]  # opened x GROUP
                k = torch.searchsorted(th[todo[i]], vals, right=True)
                sub = torch.zeros(n, P, dtype=torch.int64, device=dev)
                sub[todo] = _count_ge(todo[i].repeat_interleave(GROUP), k, n, P)[todo] - rel_ge[todo]
                a = torch.where(pending, sub, a)
            # Recall: a_0; AP@R and R-precision from the relevant items that rank within the top R.
            a = a.cpu().numpy()
            Rn = R[s:e, None]
            above[s:e] = np.where(Rn[:, 0] > 0, a[:, 0], NEVER)
            pos = a + j1  # the rank of relevant j
            inside = (pos <= Rn) & (j1 <= Rn)
            denom = np.maximum(Rn[:, 0], 1)
            ap[s:e] = np.where(inside, j1 / np.where(inside, pos, 1), 0.0).sum(1) / denom
            rp[s:e] = inside.sum(1) / denom
    return above, ap, rp


def _count_ge(row: torch.Tensor, k: torch.Tensor, n: int, P: int) -> torch.Tensor:
    """n x P: column j counts the items (row[i], k[i]) of each row with k >= P - j, i.e. at least as similar as
    the row's j-th relevant item."""
    hist = torch.bincount(row * (P + 1) + k.reshape(-1), minlength=n * (P + 1)).view(n, P + 1)
    return hist.flip(1).cumsum(1)[:, :P]

def nmi_score(emb: np.ndarray, labels: np.ndarray, seed: int = NMI_SEED) -> float:
    """NMI between the labels and a seeded k-means clustering (C = number of classes) of the embeddings.

    Args:
        emb: N x D embeddings (float32; normalised for cosine clustering).
        labels: N integer labels; their number of distinct values is the number of clusters.
        seed: faiss k-means' seed (20 iterations).

    Returns:
        The normalised mutual information in [0, 1] (sklearn's, arithmetic mean).
    """
    C = len(np.unique(labels))
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    # min_points_per_centroid=1: retrieval test sets have ~5 items per class, far below faiss's default 39.
    km = load_faiss().Kmeans(emb.shape[1], C, niter=NMI_NITER, seed=seed, min_points_per_centroid=1, verbose=False)
    km.train(emb)
    _, assign = km.index.search(emb, 1)
    return float(normalized_mutual_info_score(labels, assign[:, 0]))


def eval_sets(splits: Splits, which: Literal["val", "test"]) -> tuple[Dataset, Dataset | None]:
    """(query set, gallery set) of a split: "val" searches the val split in itself (gallery None); "test" the test
    split in itself, or, for datasets with query and gallery sets (splits.test is None), the query set in the
    gallery set.

    Args:
        splits: the prepared dataset's splits (``xbmcore.data.open_splits``).
        which: ``"val"`` or ``"test"``.

    Returns:
        ``(query_set, gallery_set)``, gallery_set None when the query set is its own gallery.

    Raises:
        ValueError: an unknown `which`, no val split, or neither a test split nor query and gallery sets.
    """
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
    model: torch.nn.Module, splits: Splits, which: Literal["val", "test"], batch_size: int = 256,
    device: str | torch.device = "cpu", num_workers: int = 0, progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(query, query_labels, gallery, gallery_labels) embeddings of a split (see eval_sets); gallery None when
    the query set is its own gallery: retrieval_metrics' arguments. progress(done, total) counts both sets.

    Args:
        model: the embedding network, already on `device`.
        splits: the prepared dataset's splits.
        which: ``"val"`` or ``"test"`` (see `eval_sets`).
        batch_size: images per forward pass.
        device: where the model runs.
        num_workers: DataLoader worker processes.
        progress: called as ``progress(done, total)`` over the query and gallery sets together.

    Returns:
        ``(query, query_labels, gallery, gallery_labels)``: N x D float32 and N int64 arrays; the gallery pair
            is ``(None, None)`` when the query set is its own gallery.
    """
    query_set, gallery_set = eval_sets(splits, which)
    total = len(query_set) + (len(gallery_set) if gallery_set is not None else 0)

    def counted(offset: int):
        return None if progress is None else (lambda done, _: progress(offset + done, total))

    q, ql = compute_embeddings(model, query_set, batch_size, device, num_workers, counted(0))
    if gallery_set is None:
        return q, ql, None, None
    return (q, ql, *compute_embeddings(model, gallery_set, batch_size, device, num_workers, counted(len(q))))


def evaluate_model(
    model: torch.nn.Module, splits: Splits, which: Literal["val", "test"], recall_at: Sequence[int] = (1, 10, 100),
    batch_size: int = 256, device: str | torch.device = "cpu", nmi: bool = True, num_workers: int = 0,
) -> dict[str, float]:
    """Embed a split (see eval_sets) and score it.

    Runs the model in eval mode without gradients (its mode is restored), on its own device.

    Args:
        model: the embedding network, already on `device`.
        splits: the prepared dataset's splits.
        which: ``"val"`` or ``"test"`` (see `eval_sets`).
        recall_at: the K of each Recall@K.
        batch_size: images per forward pass.
        device: where the model runs and the metrics are computed.
        nmi: also compute NMI.
        num_workers: DataLoader worker processes.

    Returns:
        The metrics, as `retrieval_metrics` returns them.
    """
    return retrieval_metrics(*embed_split(model, splits, which, batch_size, device, num_workers),
                             recall_at=recall_at, nmi=nmi, device=device)
