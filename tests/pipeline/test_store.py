"""pipeline/store.py on vectors: exact search over shards and IVF-PQ with re-ranking against a float64 brute force,
the manifest's parameters, memory maps only, and the errors for bad index flags."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline import embed
from pipeline import store as st
from pipeline.store import faiss
from pipeline.embedding_store import ModelCard

N, D, K = 10_000, 32, 10
CHUNK = 2048  # 5 shards, the last one shorter


@pytest.fixture(scope="module", autouse=True)
def one_faiss_thread():
    """faiss's OpenMP threads spin-wait: on 2 cores shared with other tests, more threads only wait longer."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def clustered(n: int, seed: int) -> np.ndarray:
    """Items around n / 20 centres on the sphere (retrieval-like: a handful of close neighbours each)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n // 20, D))
    x = centres[rng.integers(len(centres), size=n)] / np.sqrt(D) + 0.6 / np.sqrt(D) * rng.standard_normal((n, D))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    x = clustered(N + 200, seed=0)
    x, q = x[:N], x[N:]  # queries from the same clusters
    card = ModelCard("0" * 64, D, 16, 16)
    chunks = lambda: (x[a:a + CHUNK] for a in range(0, N, CHUNK))  # noqa: E731
    exact = st.EmbeddingStore.load(st.save_arrays(root / "exact", chunks(), N, card, chunk_rows=CHUNK))
    ivf = st.EmbeddingStore.load(st.save_arrays(root / "ivfpq", chunks(), N, card, "ivfpq", chunk_rows=CHUNK,
                                                code_bytes=8))
    sims = q.astype(np.float64) @ x.astype(np.float64).T
    truth = np.argsort(-sims, axis=1, kind="stable")[:, :K]
    return root, x, q, sims, truth, exact, ivf


def recall(ids, truth) -> float:
    return float(np.mean([len(np.intersect1d(a, b)) for a, b in zip(ids, truth)])) / truth.shape[1]


def test_shards_are_memory_maps_and_the_manifest_records_the_index(data):
    root, _, _, _, _, exact, ivf = data
    assert [len(s) for s in ivf.shards] == [CHUNK] * 4 + [N - 4 * CHUNK]
    assert all(isinstance(s, np.memmap) for s in exact.shards + ivf.shards)
    meta = json.loads((root / "ivfpq/meta.json").read_text())
    # nlist = 4 sqrt(N) = 400, but at most N / 39 (faiss's fewest points per centroid); the sample: all N
    assert meta["index"] == {"kind": "ivfpq", "nlist": 256, "code_bytes": 8, "nbits": 8, "train_size": N,
                             "nprobe": 32, "rerank": 100}
    assert json.loads((root / "exact/meta.json").read_text())["index"] == {"kind": "exact"}
    assert not (root / "exact/index.faiss").exists()
    assert ivf.index.code_size == 8 and ivf.index.nlist == 256 and ivf.index.ntotal == N


def test_nothing_loads_the_whole_matrix(data, monkeypatch):
    _, _, q, _, _, exact, ivf = data

    def whole(self):
        raise AssertionError("the whole matrix was loaded")

    monkeypatch.setattr(st.EmbeddingStore, "embeddings", property(whole))
    for store in (exact, ivf):
        store.search(q[:5], K)
        store.duplicate_groups(0.999)


def test_exact_search_over_shards_equals_brute_force(data):
    _, _, q, sims, truth, exact, _ = data
    got_sims, got_ids = exact.search(q, K)
    assert np.array_equal(got_ids, truth)
    np.testing.assert_allclose(got_sims, np.take_along_axis(sims, truth, 1), atol=1e-5)


def test_ivfpq_reranks_its_candidates_exactly(data):
    """The answer is the exact top k of the candidates the PQ codes give, with their exact similarities."""
    _, _, q, sims, _, _, ivf = data
    ivf.index.nprobe = 8
    _, cand = ivf.index.search(q, 50)
    got_sims, got_ids = ivf.search(q, K, nprobe=8, rerank=50)
    cand_sims = np.where(cand >= 0, np.take_along_axis(sims, np.maximum(cand, 0), 1), -np.inf)
    order = np.argsort(-cand_sims, axis=1, kind="stable")[:, :K]
    assert np.array_equal(got_ids, np.take_along_axis(cand, order, 1))
    np.testing.assert_allclose(got_sims, np.take_along_axis(sims, got_ids, 1), atol=1e-5)


def test_ivfpq_recall_against_exact_search(data):
    _, _, q, _, truth, _, ivf = data
    # Every list probed and every item a candidate: the re-rank alone decides, so the answer is exact.
    _, ids = ivf.search(q, K, nprobe=ivf.spec["nlist"], rerank=N)
    assert recall(ids, truth) == 1.0
    # The manifest's nprobe and R: re-ranking 100 candidates recovers what the 8-byte codes alone miss.
    _, ids = ivf.search(q, K)
    _, pq_only = ivf.search(q, K, rerank=K)
    assert ivf.index.nprobe == 32
    assert recall(ids, truth) >= 0.95 > recall(pq_only, truth)


def test_dedup_with_ivfpq_equals_exact_pairs(data):
    """Near-copies planted in the data: both kinds group them the same, with exact similarities."""
    root, x, _, _, _, _, _ = data
    rng = np.random.default_rng(3)
    y = x[:3000].copy()
    src = rng.choice(3000, 40, replace=False)
    y[src[20:]] = y[src[:20]] + 1e-3 * rng.standard_normal((20, D)).astype(np.float32)  # 20 near-copies
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    card = ModelCard("0" * 64, D, 16, 16)
    groups = []
    for kind in ("exact", "ivfpq"):
        store = st.EmbeddingStore.load(st.save_arrays(root / f"dups_{kind}", iter([y[:2000], y[2000:]]), 3000,
                                                      card, kind, chunk_rows=2000, code_bytes=8))
        groups.append(sorted(sorted(g.tolist()) for g in store.duplicate_groups(0.99)))
    sim = y.astype(np.float64) @ y.astype(np.float64).T
    pairs = sorted(sorted(p) for p in zip(*np.nonzero(np.triu(sim > 0.99, 1))))
    assert groups[0] == groups[1] == pairs and len(pairs) == 20


def test_bad_index_flags_are_clear_errors(data, capsys):
    with pytest.raises(ValueError, match=r"--code-bytes 12: expected a divisor of the embedding dimension 32 .*"
                                         r"e\.g\. 1, 2, 4, 8, 16, 32"):
        st.index_spec("ivfpq", N, D, code_bytes=12)
    with pytest.raises(SystemExit) as stop:
        embed.main(["--model", "m.pt", "--images", ".", "--out", "o", "--index", "ivf"])
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert "--index: 'ivf' is gone: it built an HNSW graph, which is now --index hnsw" in err and "ivfpq" in err
