"""gui/retrieval_logic.py alone (no Qt, no trained model): a session's top-k and captions against a float64 brute
force, run params read back typed, thumbnails, and the worst-queries list model fetched lazily."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from gui.retrieval_logic import QUERY_THUMB, THUMB, ModelRun, Session, section_params
from xbmcore.config import DataParams
from xbmcore.retrieval import first_relevant_rank, worst_first


@dataclass
class _Images:
    class_ids: np.ndarray

    def image(self, i: int) -> Image.Image:
        return Image.new("RGB", (32, 16), (int(i) % 256, 0, 0))  # wider than high: the thumbnail keeps 2:1


def _session(n=60, dim=8, seed=0) -> tuple[Session, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = np.arange(n) // 3
    ranks = first_relevant_rank(emb, labels, None, None)
    run = ModelRun("r", "run", None, "models:/m")
    s = Session(run, DataParams(), torch.nn.Identity(), torch.device("cpu"), _Images(labels), None, emb, labels,
                emb, labels, True, ranks, worst_first(ranks))
    return s, emb.astype(np.float64), labels


def test_results_match_a_float64_brute_force():
    s, emb, labels = _session()
    for row, k in ((0, 5), (17, 10), (59, 1)):
        res = s.results(row, k)
        sim = emb @ emb[row]
        sim[row] = -np.inf  # query = gallery: its own copy is left out
        ref = np.argsort(-sim, kind="stable")[:k]
        np.testing.assert_allclose(res.sims, sim[ref], atol=1e-6)
        assert set(res.ids) == set(ref) and row not in res.ids
        np.testing.assert_array_equal(res.same, labels[res.ids] == labels[row])
        assert res.row == row and len(res.thumbs) == len(res.captions) == k
        assert res.captions[0] == f"#1  {res.sims[0]:.3f}  class {labels[res.ids[0]]}"
        assert f"test query {row} · class {labels[row]}" in res.caption
        assert res.thumbs[0].size == (THUMB, THUMB // 2) and res.query.size == (QUERY_THUMB, QUERY_THUMB // 2)
    with pytest.raises(ValueError, match=r"expected a test query number in 0..59, got 60"):
        s.results(60, 3)


def test_worst_first_is_by_first_relevant_rank():
    s, emb, labels = _session()
    shown = s.ranks[s.order]
    assert sorted(s.order) == list(range(len(emb)))
    assert list(shown) == sorted(shown, reverse=True)


def test_run_params_read_back_typed():
    flat = {"data.name": "synthetic", "data.synthetic.seed": "3", "data.train_crop_scale": "[0.5, 1.0]",
            "data.cache_workers": "None", "data.download": "True", "model.backbone": "smallcnn"}
    assert section_params(flat, "data") == {"name": "synthetic", "synthetic": {"seed": 3},
                                            "train_crop_scale": [0.5, 1.0], "cache_workers": None, "download": True}
    assert DataParams.model_validate(section_params(flat, "data")).synthetic.seed == 3


def test_model_run_label():
    assert ModelRun("abc", "xbm", None, "m").label() == "xbm · ?"
    r = ModelRun("abc", "xbm", 0.0 + 86400, "m", test_recall_at_1=0.7561)
    assert r.label().startswith("xbm · 1970-01-0") and r.label().endswith(" · test R@1 75.6%")


def test_worst_list_is_fetched_lazily(qtbot):
    from gui.retrieval import WorstQueries

    s, *_ = _session(n=1000)
    model = WorstQueries()
    model.set_session(s)
    assert model.rowCount() == WorstQueries.PAGE and model.canFetchMore(model.index(-1, -1))
    model.fetchMore(model.index(-1, -1))
    assert model.rowCount() == 2 * WorstQueries.PAGE
    first = model.index(0, 0)
    worst = int(s.order[0])
    assert first.data() == str(int(s.ranks[worst]) or "none") and first.siblingAtColumn(1).data() == str(worst)
    assert model.query_at(model.index(7, 2)) == int(s.order[7])
    # a query far down the list: fetched up to its line, no further
    far = int(s.order[900])
    assert model.line_of(far) == 900 and model.rowCount() == 901
    assert model.index(900, 2).data() == str(s.query_set.class_ids[far])
    while model.canFetchMore(model.index(-1, -1)):
        model.fetchMore(model.index(-1, -1))
    assert model.rowCount() == 1000
    model.set_session(None)
    assert model.rowCount() == 0 and model.line_of(3) is None
