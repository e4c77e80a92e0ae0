"""Exact kNN (xbmcore.knn) against a float64 numpy reference, both backends; the BLAS core faiss runs."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from xbmcore.blas import cpu_flags, core_for, generic_blas, load_faiss
from xbmcore.knn import exact_knn, iter_exact_knn


def clustered(rng, n, d=16, clusters=5):
    centres = rng.standard_normal((clusters, d))
    x = centres[rng.integers(clusters, size=n)] + 0.3 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def reference(q, g, k):
    sim = q.astype(np.float64) @ g.astype(np.float64).T
    ids = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sim, ids, 1), ids


@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("chunk", [None, 7])
def test_exact_knn_equals_float64_reference(backend, chunk):
    rng = np.random.default_rng(0)
    q, g = clustered(rng, 30), clustered(rng, 200)
    sims, ids = exact_knn(q, g, 10, backend=backend, chunk=chunk)
    ref_sims, ref_ids = reference(q, g, 10)
    assert sims.shape == ids.shape == (30, 10) and sims.dtype == np.float32 and ids.dtype == np.int64
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)
    # Same neighbours wherever the reference's consecutive similarities are not a float32 near-tie.
    gaps = np.diff(ref_sims, axis=1, append=-np.inf)
    np.testing.assert_array_equal(ids[np.abs(gaps) > 1e-5], ref_ids[np.abs(gaps) > 1e-5])


def test_torch_tensors_and_chunks_cover_every_query():
    rng = np.random.default_rng(1)
    q, g = clustered(rng, 23), clustered(rng, 40)
    chunks = list(iter_exact_knn(torch.from_numpy(q), torch.from_numpy(g), 3, backend="torch", chunk=5))
    assert [(s, e) for s, e, _, _ in chunks] == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 23)]
    np.testing.assert_array_equal(np.concatenate([c[3] for c in chunks]), exact_knn(q, g, 3)[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_equals_cpu():
    rng = np.random.default_rng(2)
    q, g = clustered(rng, 100, 64), clustered(rng, 5000, 64)
    sims, _ = exact_knn(q, g, 20, device="cuda")
    np.testing.assert_allclose(sims, exact_knn(q, g, 20)[0], atol=1e-4)


def test_bad_input_names_the_argument():
    g = np.zeros((5, 4), np.float32)
    with pytest.raises(ValueError, match=r"queries: expected dimension D = 4 \(the gallery's\), got 3"):
        exact_knn(np.zeros((2, 3), np.float32), g, 1)
    with pytest.raises(ValueError, match=r"k: expected 1 <= k <= 5"):
        exact_knn(np.zeros((2, 4), np.float32), g, 6)
    with pytest.raises(ValueError, match="gallery: expected a non-empty"):
        exact_knn(g, g[:0], 1)
    with pytest.raises(ValueError, match="backend faiss: runs on the CPU"):
        exact_knn(g, g, 1, device="cuda", backend="faiss")


# ---- the BLAS core (xbmcore/blas.py) ----

def test_core_chosen_from_cpu_features():
    assert core_for(frozenset("avx512f avx512cd avx512bw avx512dq avx512vl avx2 fma".split())) == "SkylakeX"
    assert core_for(frozenset("avx512f avx2 fma".split())) == "Haswell"  # Xeon Phi: no BW/DQ/VL
    assert core_for(frozenset("avx2 fma sse3".split())) == "Haswell"
    assert core_for(frozenset("sse3 ssse3".split())) is None


def test_faiss_blas_is_not_a_generic_fallback():
    """Fails when the OpenBLAS that faiss (or numpy) loaded runs generic pre-AVX2 kernels on a CPU with AVX2:
    exact search is then several times slower than its GEMM floor."""
    load_faiss()  # as everywhere in the project

    assert generic_blas() == []


@pytest.mark.skipif("avx2" not in cpu_flags(), reason="the check only applies to CPUs with AVX2")
def test_generic_fallback_is_detected():
    """The check above can fail: with OpenBLAS forced onto Prescott, generic_blas names faiss's library."""
    code = "from xbmcore.blas import generic_blas, load_faiss; load_faiss(); " \
           "print(sorted(l['filepath'] for l in generic_blas()))"
    env = dict(os.environ, OPENBLAS_CORETYPE="Prescott")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "faiss" in out.stdout, out


def test_importing_the_library_leaves_the_environment_alone():
    code = "import os, xbmcore.evaluate, xbmcore.knn, xbmcore.trainer; print(os.environ.get('OPENBLAS_CORETYPE'))"
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"


def test_core_is_set_before_faiss_loads():
    code = ("import os, sys; from xbmcore.blas import load_faiss; load_faiss(); "
            "print(os.environ.get('OPENBLAS_CORETYPE'), 'faiss' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    want = core_for(cpu_flags()) if os.uname().machine in ("x86_64", "amd64") else None
    assert out.stdout.split() == [str(want), "True"]
