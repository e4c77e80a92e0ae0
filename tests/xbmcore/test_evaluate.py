from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score
from torch import nn

import xbmcore.evaluate as ev
from xbmcore.evaluate import compute_embeddings, evaluate_model, retrieval_metrics

torch.set_num_threads(1)
KS = (1, 2, 5, 50)


def reference(q, ql, g=None, gl=None, ks=KS):
    """Plain-loop float64 Recall@K, MAP@R (Musgrave et al.) and R-precision on cosine similarity; among equal
    similarities the irrelevant items rank first (ties count against the query)."""
    self_excluded = g is None
    if self_excluded:
        g, gl = q, ql
    q = np.asarray(q, np.float64)
    g = np.asarray(g, np.float64)
    hits = {k: 0 for k in ks}
    aps, rps = [], []
    for i in range(len(q)):
        cands = []
        for j in range(len(g)):
            if self_excluded and j == i:
                continue
            cos = sum(q[i, d] * g[j, d] for d in range(q.shape[1])) / np.sqrt(q[i] @ q[i]) / np.sqrt(g[j] @ g[j])
            cands.append((cos, gl[j] == ql[i]))
        cands.sort(key=lambda c: (-c[0], c[1]))
        rel = [r for _, r in cands]
        for k in ks:
            hits[k] += any(rel[:k])
        R = sum(rel)
        if R == 0:
            continue
        found, ap = 0, 0.0
        for rank in range(R):
            if rel[rank]:
                found += 1
                ap += found / (rank + 1)
        aps.append(ap / R)
        rps.append(found / R)
    out = {f"recall@{k}": hits[k] / len(q) for k in ks}
    out["map@r"] = float(np.mean(aps))
    out["r_precision"] = float(np.mean(rps))
    return out


def random_set(rng, n, classes, d=6):
    labels = rng.integers(0, classes, size=n)
    return rng.standard_normal((n, d)).astype(np.float32), labels


def assert_metrics(got, want):
    assert set(want) <= set(got)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-12), k


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_self_excluded_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    x, y = random_set(rng, 60, classes=7)  # classes of ~9: MAP@R ranks beyond the largest K of 5
    got = retrieval_metrics(x, y, recall_at=KS, nmi=False)
    assert_metrics(got, reference(x, y))
    assert "nmi" not in got


@pytest.mark.parametrize("seed", [0, 1])
def test_query_vs_gallery_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    q, ql = random_set(rng, 25, classes=6)
    g, gl = random_set(rng, 70, classes=8)  # gallery classes 6, 7 never queried; some queries may lack R
    got = retrieval_metrics(q, ql, g, gl, recall_at=KS, nmi=False)
    assert_metrics(got, reference(q, ql, g, gl))


def test_query_without_relevant_items_is_a_miss_and_skipped_by_map():
    q = np.eye(3, dtype=np.float32)
    g = np.array([[1, 0.1, 0], [0, 1, 0.1], [0.2, 0, 1], [1, 1, 1]], dtype=np.float32)
    got = retrieval_metrics(q, np.array([0, 1, 9]), g, np.array([0, 5, 2, 1]), recall_at=(1, 4), nmi=False)
    assert got["recall@1"] == pytest.approx(1 / 3) and got["recall@4"] == pytest.approx(2 / 3)
    # query 0: R = 1, hit at rank 1 -> AP 1; query 1: R = 1, its relevant item ranks 2nd -> AP 0, RP 0.
    assert got["map@r"] == pytest.approx(0.5) and got["r_precision"] == pytest.approx(0.5)


@pytest.mark.parametrize("group, block_bytes", [(1, 1), (3, 7 * 64 * 4), (4, 1 << 20), (64, 1)])
def test_groups_and_chunks_give_the_reference(monkeypatch, group, block_bytes):
    """Every group size (1: each item its own group, so the group counts are exact and nothing is opened) and
    chunk size (1 query, 7 queries: offsets of the self ids matter) gives the float64 reference."""
    rng = np.random.default_rng(3)
    x, y = random_set(rng, 50, classes=5)
    monkeypatch.setattr(ev, "GROUP", group)
    monkeypatch.setattr(ev, "BLOCK_BYTES", {"cpu": block_bytes})
    assert_metrics(retrieval_metrics(x, y, recall_at=KS, nmi=False), reference(x, y))


def test_deep_ranks_open_only_the_groups_needed():
    """400 items in 8-d, 40 classes, K up to 100: most queries decide Recall@1 from the group maxima alone, some
    queries rank beyond K = 100 (decided without counting), and MAP@R opens the groups above each relevant item."""
    rng = np.random.default_rng(7)
    centres = rng.standard_normal((40, 8))
    y = rng.integers(0, 40, size=400)
    x = (centres[y] + 0.9 * rng.standard_normal((400, 8))).astype(np.float32)
    ks = (1, 10, 100)
    got = retrieval_metrics(x, y, recall_at=ks, nmi=False)
    assert_metrics(got, reference(x, y, ks=ks))
    assert 0.3 < got["recall@1"] < got["recall@100"] < 1.0  # neither trivial nor saturated


def test_exact_duplicates_rank_irrelevant_first():
    """A dedup-like set: 80 items drawn from 12 distinct vectors, so many similarities are exactly equal; ties
    count against the query, in Recall@K and in MAP@R alike."""
    rng = np.random.default_rng(8)
    distinct = rng.integers(-2, 3, size=(12, 4)).astype(np.float32)
    distinct[np.abs(distinct).sum(1) == 0] = 1
    x = distinct[rng.integers(0, 12, size=80)]
    y = rng.integers(0, 6, size=80)
    for g in (1, 4, 64):
        ev.GROUP, before = g, ev.GROUP
        try:
            assert_metrics(retrieval_metrics(x, y, recall_at=(1, 5, 20), nmi=False), reference(x, y, ks=(1, 5, 20)))
        finally:
            ev.GROUP = before


def test_self_is_dropped_by_index_not_position():
    # Rows 0 and 1 are identical with different labels: each one's nearest other item is the other one (a miss).
    # Excluding the first neighbour instead of the query's own id would leave one of them with itself (a hit).
    x = np.array([[1, 0, 0], [1, 0, 0], [1, .5, 0], [1, .55, 0], [1, 0, .6], [1, 0, .65]], dtype=np.float32)
    y = np.array([0, 1, 0, 0, 1, 1])
    got = retrieval_metrics(x, y, recall_at=(1, 2, 4), nmi=False)
    # row 0: 1 (miss), 2 (hit); row 1: 0, 2, 3 (misses), 4 (hit); rows 2-5 hit their twin first.
    assert (got["recall@1"], got["recall@2"], got["recall@4"]) == pytest.approx((4 / 6, 5 / 6, 1.0))
    assert_metrics(got, reference(x, y, ks=(1, 2, 4)))


def test_k_beyond_gallery_and_unnormalised_input():
    rng = np.random.default_rng(4)
    x, y = random_set(rng, 12, classes=3)
    got = retrieval_metrics(3 * x, y, recall_at=(1, 100), nmi=False)  # scale changes nothing (cosine)
    want = reference(x, y, ks=(1, 100))
    assert_metrics(got, want)
    assert got["recall@100"] == 1.0


def test_nmi_equals_sklearn_on_the_found_clustering():
    # Six tight, well-separated clusters; two items carry the label of another cluster.
    rng = np.random.default_rng(5)
    clusters = np.repeat(np.arange(6), 5)
    x = np.eye(8, dtype=np.float32)[clusters] + 0.01 * rng.standard_normal((30, 8)).astype(np.float32)
    labels = clusters.copy()
    labels[[0, 7]] = [3, 4]
    got = retrieval_metrics(x, labels, recall_at=(1,), nmi=True)["nmi"]
    assert got == pytest.approx(normalized_mutual_info_score(labels, clusters), abs=1e-12)
    assert 0.8 < got < 1.0


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((np.zeros((0, 4), np.float32), np.zeros(0, int)), {}, "query: expected a non-empty"),
        ((np.ones((3, 4)), [0, 1, 1]), dict(gallery=np.ones((0, 4)), gallery_labels=[]), "gallery: expected a n"),
        ((np.ones((3, 4)), [0, 1, 1]), dict(gallery=np.ones((2, 5)), gallery_labels=[0, 1]), "dimension D = 4"),
        ((np.ones((3, 4)), [0, 1]), {}, "query_labels: expected 3 labels"),
        ((np.ones((3, 4)), [0, 1, 1]), dict(gallery=np.ones((2, 4)), gallery_labels=[0]), "gallery_labels: exp"),
        ((np.ones((3, 4)), [0.0, 1.0, 1.0]), {}, "expected integer labels, got dtype float64"),
        ((np.ones((3, 4)), [0, 1, 1]), dict(recall_at=(1, 0)), "recall_at"),
        ((np.ones((3, 4)), [0, 1, 1]), dict(recall_at=()), "recall_at"),
        ((np.ones((1, 4)), [0]), {}, "needs >= 2 items"),
        ((np.ones((3, 4)), [0, 1, 1]), dict(gallery=np.ones((2, 4))), "without gallery_labels"),
        ((np.full((2, 4), np.nan), [0, 1]), {}, "NaN"),
    ],
)
def test_bad_input_raises(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        retrieval_metrics(*args, **kwargs)


# ---- embedding a dataset ----


class TinyImages(torch.utils.data.Dataset):
    """(image 3 x 4 x 4, label, index), like the data package's ImageDataset."""

    def __init__(self, n, seed=0, collated_getitems=False):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 4, 4, generator=g)
        self.labels = (torch.arange(n) % 4).numpy()
        if collated_getitems:  # the fast batched path: one call per batch, already collated
            self.__getitems__ = lambda idx: (self.x[idx], torch.as_tensor(self.labels[idx]), torch.as_tensor(idx))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.labels[i]), i


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.BatchNorm1d(16), nn.Dropout(0.5))
        self.embedding_dim = 16

    def forward(self, x):
        return nn.functional.normalize(self.body(x), dim=1)


@pytest.mark.parametrize("collated", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_compute_embeddings_in_eval_mode_and_order(collated, training):
    ds = TinyImages(11, collated_getitems=collated)
    model = TinyNet().train(training)
    feats, labels = compute_embeddings(model, ds, batch_size=4)  # 4 + 4 + 3
    assert model.training is training  # mode restored
    assert feats.dtype == np.float32 and feats.shape == (11, 16) and labels.dtype == np.int64
    np.testing.assert_array_equal(labels, ds.labels)
    with torch.no_grad():
        want = model.eval()(ds.x).numpy()  # eval mode: BN running stats, no dropout; batch size irrelevant
    np.testing.assert_allclose(feats, want, rtol=1e-5, atol=1e-6)


def test_evaluate_model_uses_the_right_splits():
    model = TinyNet()
    val, test, query, gallery = TinyImages(20, 1), TinyImages(24, 2), TinyImages(9, 3), TinyImages(30, 4)

    def metrics(q, g=None):
        qe, ql = compute_embeddings(model, q)
        if g is None:
            return retrieval_metrics(qe, ql, recall_at=(1, 3), nmi=False)
        return retrieval_metrics(qe, ql, *compute_embeddings(model, g), recall_at=(1, 3), nmi=False)

    splits = SimpleNamespace(train=None, val=val, test=test, query=query, gallery=gallery)
    run = dict(recall_at=(1, 3), batch_size=8, device="cpu", nmi=False)
    assert evaluate_model(model, splits, "val", **run) == metrics(val)
    assert evaluate_model(model, splits, "test", **run) == metrics(test)
    splits.test = None
    assert evaluate_model(model, splits, "test", **run) == metrics(query, gallery)
    assert set(evaluate_model(model, splits, "val", (1,), 8, "cpu")) == {"recall@1", "map@r", "r_precision", "nmi"}
    splits.val = splits.query = None
    with pytest.raises(ValueError, match="no val split"):
        evaluate_model(model, splits, "val", **run)
    with pytest.raises(ValueError, match="neither a test split nor query and gallery"):
        evaluate_model(model, splits, "test", **run)
    with pytest.raises(ValueError, match="which: expected 'val' or 'test'"):
        evaluate_model(model, splits, "train", **run)
