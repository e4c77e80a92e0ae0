"""Benchmark: where exact search spends its time at evaluation's k (top 1,002 of 60,502 x 512, 8,192 queries).

    python -m bench.exact_knn [--queries 8192] [--k 1002]

Prints one JSON object with wall and CPU seconds of: the bare GEMM (torch, the floor), xbmcore.knn's faiss path
(OpenBLAS GEMM + faiss's heap top-k), torch's GEMM followed by the same faiss heap (which tells the GEMM's share
from the selection's), and xbmcore.knn's torch path (matmul + topk, the GPU path run on the CPU); and whether
each result equals the faiss path's.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from bench.evaluate import make_embeddings
from xbmcore.blas import load_faiss
from xbmcore.knn import exact_knn

faiss = load_faiss()
swig_ptr = faiss.swig_ptr


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, [round(time.perf_counter() - w, 3), round(time.process_time() - c, 3)]


def torch_gemm_faiss_heap(q: np.ndarray, g: np.ndarray, k: int, qb: int = 4096, gb: int = 8192):
    """Blocks of similarities by torch's GEMM, each pushed into faiss's per-query min-heaps (consecutive ids)."""
    gt = torch.from_numpy(g)
    D, I = np.empty((len(q), k), np.float32), np.empty((len(q), k), np.int64)
    for s in range(0, len(q), qb):
        e = min(s + qb, len(q))
        heaps = faiss.float_minheap_array_t()
        heaps.k, heaps.nh = k, e - s
        Ds, Is = D[s:e], I[s:e]  # contiguous row blocks: the heaps write into D and I
        heaps.val, heaps.ids = swig_ptr(Ds), swig_ptr(Is)
        heaps.heapify()
        qt = torch.from_numpy(q[s:e])
        for j in range(0, len(g), gb):
            sim = (qt @ gt[j:j + gb].T).numpy()  # (e - s) x gb
            heaps.addn(sim.shape[1], swig_ptr(sim), j, 0, e - s)
        heaps.reorder()
    return D, I


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=8192)
    ap.add_argument("--k", type=int, default=1002, help="1,002: Recall@1000 with the query itself excluded")
    args = ap.parse_args()
    x, _ = make_embeddings()
    q = x[:args.queries]
    xt = torch.from_numpy(x)

    def gemm():
        for s in range(0, len(q), 4096):
            xt @ xt[s:s + 4096].T

    out = {"queries": len(q), "gallery": len(x), "d": x.shape[1], "k": args.k,
           "load_average_1min": round(os.getloadavg()[0], 2)}
    _, out["gemm_before"] = timed(gemm)
    ref, out["faiss"] = timed(lambda: exact_knn(q, x, args.k, backend="faiss"))
    for name, fn in [("torch_gemm_faiss_heap", lambda: torch_gemm_faiss_heap(q, x, args.k)),
                     ("torch_matmul_topk", lambda: exact_knn(q, x, args.k, backend="torch", chunk=1024))]:
        (D, I), out[name] = timed(fn)
        out[name + "_ids_equal_faiss"] = float((I == ref[1]).mean())
        out[name + "_max_abs_sim_diff"] = float(np.abs(D - ref[0]).max())
    _, out["gemm_after"] = timed(gemm)
    out["note"] = "[wall s, cpu s]; floor = min(gemm_before, gemm_after)"
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
