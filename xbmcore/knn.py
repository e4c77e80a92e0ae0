"""Exact k-nearest-neighbour search by inner product (cosine on L2-normalised embeddings), on CPU or GPU.

One function for the exact neighbour lists of the project (`pipeline.search`, the embedding store, the benchmarks;
evaluation needs no lists and counts instead, xbmcore/evaluate.py):

    sims, ids = exact_knn(queries, gallery, k)               # n x k float32 (best first), n x k int64
    for start, end, sims, ids in iter_exact_knn(q, g, k):    # the same in query chunks of bounded memory

Two backends, the same results up to float32 rounding:
  faiss  (CPU default) IndexFlatIP: its blocked BLAS GEMM + heap top-k ran within 1.0-1.1x of the bare GEMM
         when OpenBLAS runs the CPU's own kernels (xbmcore/blas.py makes sure it does).
  torch  (GPU, and the CPU fallback where faiss is not installed): chunked matmul + topk on `device`.
faiss is imported only by its backend, so the GPU path runs where torch alone is installed.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch

from xbmcore.blas import load_faiss

# Result buffers of one chunk (similarities float32 + ids int64 per neighbour) stay under this many bytes, so
# 100k x 512 queries with k ~ 1000 neighbours fit in a few GB.
RESULT_BYTES = 256 << 20
# faiss splits each search into blocks of 4096 queries x 1024 gallery items for its BLAS calls; chunks are
# multiples of the query block. A gallery block of 4096 amortises faiss's per-block top-k bookkeeping, which
# matters at k ~ 1000: 1.10x against 1.28x the CPU time of the bare GEMM with 1024 (8,192 of 60,502 x 512, k 1001).
FAISS_QUERY_BLOCK = 4096
FAISS_GALLERY_BLOCK = 4096
# torch: the n x N similarity block of one chunk stays under this many bytes on the device.
TORCH_SIM_BYTES = 1 << 30


def _faiss():
    try:
        return load_faiss()
    except ImportError:
        return None


@contextmanager
def _faiss_gallery_block(faiss, size: int) -> Iterator[None]:
    # A process-wide faiss setting: set for our searches only, then put back.
    before = faiss.cvar.distance_compute_blas_database_bs
    faiss.cvar.distance_compute_blas_database_bs = size
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_database_bs = before


def _check(queries, gallery, k: int) -> None:
    for name, x in (("queries", queries), ("gallery", gallery)):
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"{name}: expected a non-empty n x D array, got shape {tuple(x.shape)}")
    if queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"queries: expected dimension D = {gallery.shape[1]} (the gallery's), "
                         f"got {queries.shape[1]}")
    if not 1 <= k <= gallery.shape[0]:
        raise ValueError(f"k: expected 1 <= k <= {gallery.shape[0]} (the gallery size), got {k}")


def resolve_backend(backend: str, device: str | torch.device) -> str:
    """The backend a search on `device` uses.

    Args:
        backend: ``"auto"`` (faiss on the CPU where it is installed, else torch), ``"faiss"`` or ``"torch"``.
        device: where the search runs.

    Returns:
        ``"faiss"`` or ``"torch"``.

    Raises:
        ValueError: an unknown backend, faiss on a GPU, or faiss asked for but not installed.
    """
    device = torch.device(device)
    if backend == "auto":
        return "faiss" if device.type == "cpu" and _faiss() is not None else "torch"
    if backend not in ("faiss", "torch"):
        raise ValueError(f"backend: expected auto, faiss or torch, got {backend!r}")
    if backend == "faiss" and device.type != "cpu":
        raise ValueError(f"backend faiss: runs on the CPU, got device {device}")
    if backend == "faiss" and _faiss() is None:
        raise ValueError("backend faiss: faiss is not installed (pip install faiss-cpu), use backend torch")
    return backend


def iter_exact_knn(
    queries: np.ndarray | torch.Tensor, gallery: np.ndarray | torch.Tensor, k: int,
    device: str | torch.device = "cpu", backend: str = "auto", chunk: int | None = None,
) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """Yield (start, end, sims, ids) for consecutive query chunks: sims (end-start) x k float32, descending, and
    the gallery rows they belong to, int64. queries n x D and gallery N x D: float32 numpy arrays or tensors
    (normalise them first for cosine). chunk: queries per chunk (default: bounded by RESULT_BYTES, and for torch
    by TORCH_SIM_BYTES).

    Args:
        queries: n x D float32 query embeddings (numpy array or tensor, n >= 1).
        gallery: N x D float32 gallery embeddings (N >= 1), the same D.
        k: neighbours per query, 1 <= k <= N.
        device: where the torch backend computes (faiss runs on the CPU).
        backend: ``"auto"``, ``"faiss"`` or ``"torch"`` (see `resolve_backend`).
        chunk: queries per yielded chunk; None: as many as the memory bounds allow.

    Yields:
        ``(start, end, sims, ids)`` for query rows ``start:end``: (end - start) x k float32 similarities,
            best first, and the (end - start) x k int64 gallery rows they belong to.

    Raises:
        ValueError: empty or mis-shaped inputs, dimensions that differ, k outside [1, N], or an unusable backend.
    """
    _check(queries, gallery, k)
    backend = resolve_backend(backend, device)
    n, N = queries.shape[0], gallery.shape[0]
    if backend == "faiss":
        faiss = _faiss()
        q = np.ascontiguousarray(queries.detach().cpu().numpy() if isinstance(queries, torch.Tensor) else queries,
                                 dtype=np.float32)
        g = np.ascontiguousarray(gallery.detach().cpu().numpy() if isinstance(gallery, torch.Tensor) else gallery,
                                 dtype=np.float32)
        if chunk is None:
            chunk = max(FAISS_QUERY_BLOCK, RESULT_BYTES // (12 * k) // FAISS_QUERY_BLOCK * FAISS_QUERY_BLOCK)
        index = faiss.IndexFlatIP(g.shape[1])
        index.add(g)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            with _faiss_gallery_block(faiss, FAISS_GALLERY_BLOCK):
                sims, ids = index.search(q[s:e], k)
            yield s, e, sims, ids
        return
    device = torch.device(device)
    g = torch.as_tensor(gallery, dtype=torch.float32).to(device)
    if chunk is None:
        chunk = max(1, min(RESULT_BYTES // (12 * k), TORCH_SIM_BYTES // (4 * N)))
    with torch.inference_mode():
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            q = torch.as_tensor(queries[s:e], dtype=torch.float32).to(device, non_blocking=True)
            sims, ids = (q @ g.T).topk(k, dim=1)  # n x N -> n x k, sorted descending
            yield s, e, sims.float().cpu().numpy(), ids.cpu().numpy()


def exact_knn(queries: np.ndarray | torch.Tensor, gallery: np.ndarray | torch.Tensor, k: int,
              device: str | torch.device = "cpu", backend: str = "auto",
              chunk: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The k most similar gallery rows of every query by inner product: (n x k float32 sims, n x k int64 ids),
    best first. See iter_exact_knn for the arguments.

    Args:
        queries: n x D float32 query embeddings (numpy array or tensor).
        gallery: N x D float32 gallery embeddings.
        k: neighbours per query, 1 <= k <= N.
        device: where the torch backend computes.
        backend: ``"auto"``, ``"faiss"`` or ``"torch"``.
        chunk: queries per internal chunk (None: bounded by memory).

    Returns:
        ``(sims, ids)``: n x k float32 similarities, best first, and n x k int64 gallery rows.

    Raises:
        ValueError: as `iter_exact_knn`.
    """
    parts = list(iter_exact_knn(queries, gallery, k, device, backend, chunk))
    return np.concatenate([p[2] for p in parts]), np.concatenate([p[3] for p in parts])
