"""Top-k neighbours, first-relevant ranks and the figure's grid against float64 brute force."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.figures import BACKGROUND, OTHER, QUERY, SAME, draw_retrieval
from xbmcore import retrieval
from xbmcore.retrieval import first_relevant_rank, nearest, sample_queries, worst_first


def _unit(rng, n, d):
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute(q, g, k, exclude=None):
    sim = q.astype(np.float64) @ g.astype(np.float64).T
    if exclude is not None:
        for i, own in enumerate(exclude):
            if own >= 0:
                sim[i, own] = -np.inf
    ids = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sim, ids, 1), ids


def _brute_rank(q, ql, g, gl, self_excluded):
    ranks = []
    for i in range(len(q)):
        sim = g.astype(np.float64) @ q[i].astype(np.float64)
        order = list(np.lexsort((gl == ql[i], -sim)))  # among equal similarities the irrelevant first
        if self_excluded:
            order.remove(i)
        hits = [r for r, j in enumerate(order, 1) if gl[j] == ql[i]]
        ranks.append(hits[0] if hits else 0)
    return np.array(ranks)


def test_self_removed_by_id_or_else_the_last():
    ids = np.array([[5, 3, 0], [1, 2, 3], [4, 7, 8]])
    keep = retrieval._without_self(ids, np.array([0, 2, 9]))
    np.testing.assert_array_equal(ids[keep].reshape(3, 2), [[5, 3], [1, 3], [4, 7]])


def test_first_relevant_rank_counts_ties_against_the_query():
    # Rows 0 and 1 are identical, label 0 and 1; row 2 is another copy of them with label 1, row 3 is far.
    x = np.array([[1, 0], [1, 0], [1, 0], [0, 1]], dtype=np.float32)
    # Row 1: its copy row 2 is relevant, but the irrelevant row 0 ties with it and ranks first.
    np.testing.assert_array_equal(first_relevant_rank(x, np.array([0, 1, 1, 0])), [3, 2, 2, 3])


def test_nearest_matches_brute_force_with_and_without_self():
    rng = np.random.default_rng(0)
    g = _unit(rng, 200, 16).astype(np.float32)
    q = _unit(rng, 7, 16).astype(np.float32)
    sims, ids = nearest(q, g, 10)
    ref_s, ref_i = _brute(q, g, 10)
    np.testing.assert_array_equal(ids, ref_i)
    np.testing.assert_allclose(sims, ref_s, atol=1e-5)
    # query = gallery: own rows left out; a mix with a query from elsewhere (-1)
    exclude = np.array([3, 50, -1, 199])
    qq = np.concatenate([g[[3, 50]], q[:1], g[[199]]])
    sims, ids = nearest(qq, g, 5, exclude=exclude)
    ref_s, ref_i = _brute(qq, g, 5, exclude)
    np.testing.assert_array_equal(ids, ref_i)
    assert not (ids == exclude[:, None]).any()
    np.testing.assert_allclose(sims, ref_s, atol=1e-5)


def test_nearest_caps_k_and_rejects_bad_input():
    rng = np.random.default_rng(1)
    g = _unit(rng, 4, 8).astype(np.float32)
    assert nearest(g, g, 10, exclude=np.arange(4))[1].shape == (4, 3)
    assert nearest(g[:1], g, 10)[1].shape == (1, 4)
    with pytest.raises(ValueError, match="k: expected an integer >= 1"):
        nearest(g, g, 0)
    with pytest.raises(ValueError, match="exclude: expected one gallery row"):
        nearest(g, g, 2, exclude=np.array([0, 1]))
    with pytest.raises(ValueError, match="gallery: expected dimension D = 8"):
        nearest(g, g[:, :4], 2)


@pytest.mark.parametrize("self_excluded", [True, False])
def test_first_relevant_rank_and_worst_order(self_excluded):
    rng = np.random.default_rng(2)
    g = _unit(rng, 120, 8).astype(np.float32)
    gl = rng.integers(0, 15, 120)
    if self_excluded:
        q, ql = g, gl
        ranks = first_relevant_rank(q, ql)
    else:
        q, ql = _unit(rng, 30, 8).astype(np.float32), rng.integers(0, 20, 30)  # classes 15..19 have no match
        ranks = first_relevant_rank(q, ql, g, gl)
    ref = _brute_rank(q, ql, g, gl, self_excluded)
    np.testing.assert_array_equal(ranks, ref)
    order = worst_first(ranks)
    shown = ranks[order]
    with_rel = shown[shown > 0]
    assert list(with_rel) == sorted(with_rel, reverse=True)
    assert (shown[len(with_rel):] == 0).all()  # queries without any relevant item last
    assert sorted(order) == list(range(len(q)))


def test_sample_queries_is_fixed():
    a, b = sample_queries(100, 8), sample_queries(100, 8)
    np.testing.assert_array_equal(a, b)
    assert len(set(a)) == 8 and list(a) == sorted(a)
    assert list(sample_queries(3, 8)) == [0, 1, 2]


def test_draw_retrieval_frames_and_panels():
    rows, k = 3, 4
    colours = [(0, 0, 255), (255, 255, 0), (0, 255, 255)]
    queries = [Image.new("RGB", (32, 32), colours[r]) for r in range(rows)]
    neighbours = [[Image.new("RGB", (32, 16), colours[(r + j) % 3]) for j in range(k)] for r in range(rows)]
    same = np.array([[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 0]], bool)
    sims = np.linspace(0.9, 0.1, rows * k).reshape(rows, k)
    img, frames = draw_retrieval(queries, neighbours, sims, same, ["a", "b", "c"], title="t")
    px = np.asarray(img)
    assert frames.shape == (rows, 1 + k, 4)
    for r in range(rows):
        for c in range(1 + k):
            x0, y0, x1, y1 = frames[r, c]
            want = QUERY if c == 0 else (SAME if same[r, c - 1] else OTHER)
            for x, y in ((x0, y0), (x1, y1), (x0 + 1, (y0 + y1) // 2)):
                assert tuple(px[y, x]) == want, (r, c)
            centre = tuple(px[(y0 + y1) // 2, (x0 + x1) // 2])
            assert centre == (colours[r] if c == 0 else colours[(r + c - 1) % 3])
        # panels counted from the pixels: coloured runs along a line through the frames' top border
        line = px[frames[r, 0, 1] + 1]
        framed = ~(line == BACKGROUND).all(1)
        assert int((framed[1:] & ~framed[:-1]).sum() + framed[0]) == 1 + k
    with pytest.raises(ValueError, match="expected 3 queries with 4 neighbours"):
        draw_retrieval(queries[:2], neighbours, sims, same)


class _Images:
    """A stand-in dataset: solid-colour images, one colour per item."""

    def __init__(self, n, labels, seed):
        rng = np.random.default_rng(seed)
        self.colours = [tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(n)]
        self.class_ids = np.asarray(labels) + 100

    def image(self, i):
        return Image.new("RGB", (8, 8), self.colours[i])


def test_split_figure_query_against_gallery():
    """In-Shop's protocol: queries searched in a separate gallery; nothing is excluded."""
    from pipeline.figures import split_figure

    rng = np.random.default_rng(3)
    g, q = _unit(rng, 40, 8).astype(np.float32), _unit(rng, 12, 8).astype(np.float32)
    gl, ql = rng.integers(0, 4, 40), rng.integers(0, 4, 12)
    gallery, queries = _Images(40, gl, 1), _Images(12, ql, 2)
    fig = split_figure(queries, gallery, q, ql, g, gl, count=5, k=3)
    ref_s, ref_i = _brute(q[fig.queries], g, 3)
    np.testing.assert_array_equal(fig.ids, ref_i)
    np.testing.assert_array_equal(fig.same, gl[ref_i] == ql[fig.queries, None])
    px = np.asarray(fig.image)
    for r in range(5):
        x0, y0, x1, y1 = fig.frames[r, 1]
        assert tuple(px[(y0 + y1) // 2, (x0 + x1) // 2]) == gallery.colours[ref_i[r, 0]]
        assert tuple(px[y0, x0]) == (SAME if fig.same[r, 0] else OTHER)


def test_embed_split_progress_counts_query_and_gallery_sets():
    import torch

    from xbmcore.evaluate import compute_embeddings, embed_split

    class _Set(torch.utils.data.Dataset):
        def __init__(self, n):
            self.x = torch.randn(n, 3, 4, 4, generator=torch.Generator().manual_seed(n))

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i], i % 3, i

    class _Splits:
        test, query, gallery, val = None, _Set(5), _Set(7), None

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 4))
    seen = []
    q, ql, g, gl = embed_split(model, _Splits, "test", batch_size=3, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(3, 12), (5, 12), (8, 12), (11, 12), (12, 12)]
    np.testing.assert_array_equal(q, compute_embeddings(model, _Splits.query, batch_size=3)[0])
    np.testing.assert_array_equal(g, compute_embeddings(model, _Splits.gallery, batch_size=3)[0])
