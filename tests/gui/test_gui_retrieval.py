"""The Retrieval tab on a tiny trained run (offscreen): top-k and marks against a float64 brute force, the worst
queries' order, a dropped image file, and the background embedding that leaves the window responsive."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PySide6.QtCore import QMimeData, QPointF, Qt, QTimer, QUrl
from PySide6.QtGui import QDropEvent

from gui import retrieval_logic
from gui.retrieval import RetrievalPanel, image_paths
from gui.retrieval_logic import ModelRun, check_prepared, section_params
from pipeline import stages
from pipeline.tracking import tracking_uri
from tests.pipeline.tiny_project import tiny_params, write_params
from xbmcore.config import validate_params
from xbmcore.data.transforms import pil_transform
from xbmcore.evaluate import compute_embeddings
from pipeline.figures import OTHER, SAME

torch.set_num_threads(1)
WAIT_MS = 120_000  # loading a model and embedding on a loaded 2-core machine; returns as soon as it is done


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny project after the whole pipeline: the prepared dataset, the model, an MLflow run with it."""
    for var in ("MLFLOW_TRACKING_URI", "XBM_MLFLOW_RUN_ID", "XBM_MLFLOW_PARENT_RUN_ID"):
        os.environ.pop(var, None)
    root = tmp_path_factory.mktemp("project")
    write_params(root)
    p = validate_params(tiny_params())
    for stage in (stages.run_download, stages.run_warmup, stages.run_memory_init, stages.run_train_xbm,
                  stages.run_evaluate):
        stage(p, root)
    model, _ = stages.load_model(p, root)
    test = stages._splits(p, root).test
    emb, labels = compute_embeddings(model, test)
    emb = emb.astype(np.float64)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return {"root": root, "params": p, "model": model, "test": test, "emb": emb, "labels": labels,
            "source": lambda: (tracking_uri(p, root), p.tracking.experiment)}


def _brute_topk(emb, q, k, own_row=None):
    sim = emb @ q
    if own_row is not None:
        sim[own_row] = -np.inf
    ids = np.argsort(-sim, kind="stable")[:k]
    return ids, sim[ids]


def _brute_ranks(emb, labels):
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)
    ranks = []
    for i in range(len(emb)):
        order = [j for j in np.argsort(-sim[i], kind="stable") if j != i]
        hits = [r for r, j in enumerate(order, 1) if labels[j] == labels[i]]
        ranks.append(hits[0] if hits else 0)
    return np.array(ranks)


def _assert_same_ranking(ids, sims, ref_ids, ref_sims):
    np.testing.assert_allclose(sims, ref_sims, atol=1e-4)
    for j, (a, b) in enumerate(zip(ids, ref_ids)):  # float32 may swap near-ties only
        assert a == b or (abs(ref_sims[j] - sims[j]) < 1e-4 and a in ref_ids), (j, ids, ref_ids)


def _panel(qtbot, trained, **kw) -> RetrievalPanel:
    panel = RetrievalPanel(trained["root"], trained["source"], **kw)
    qtbot.addWidget(panel)
    return panel


def _open(qtbot, panel):
    panel.show()
    qtbot.waitUntil(lambda: panel.session is not None, timeout=WAIT_MS)
    qtbot.waitUntil(lambda: panel.results is not None, timeout=WAIT_MS)


def _tile_colour(tile) -> str:
    return tile.styleSheet().split("solid ")[1].split(";")[0]


def test_run_params_are_read_back_typed(trained):
    flat = {k: str(v) for k, v in trained["params"].flat().items()}
    assert section_params(flat, "data") == trained["params"].data.model_dump(mode="json")
    assert section_params({"model.pretrained": "None", "data.name": "x"}, "model") == {"pretrained": None}


def test_a_run_of_another_dataset_is_refused_naming_the_param(trained):
    p = trained["params"]
    prepared = trained["root"] / p.data.prepared / p.data.name
    run = ModelRun("r", "other-run", None, "models:/m")
    check_prepared(prepared, p.data, run)  # the run's own dataset passes
    other = p.data.model_copy(update={"synthetic": p.data.synthetic.model_copy(update={"seed": 7})})
    with pytest.raises(ValueError, match=r"data.synthetic = .*'seed': 0.*other-run used .*'seed': 7"):
        check_prepared(prepared, other, run)
    with pytest.raises(ValueError, match="no prepared dataset 'synthetic' here; prepare it with"):
        check_prepared(trained["root"] / "nowhere", p.data, run)


def test_query_top_k_and_marks_match_brute_force(qtbot, trained):
    panel = _panel(qtbot, trained)
    panel.refresh()  # hidden: the runs are listed, but nothing is embedded until the tab is looked at
    qtbot.waitUntil(lambda: panel.run_combo.count() == 1, timeout=WAIT_MS)
    # the runs are shown and the panel has decided, in the same call, not to open one while hidden
    assert panel.session is None and not panel._calls.busy() and panel._session_token == 0
    _open(qtbot, panel)
    s = panel.session
    emb, labels = trained["emb"], trained["labels"]
    # the logged (exported) model embeds the test split as the library's model does
    np.testing.assert_allclose(s.query, emb, atol=1e-5)
    np.testing.assert_array_equal(s.query_labels, labels)
    assert s.own and len(s.gallery) == len(emb)
    for row, k in ((int(s.order[0]), 10), (3, 10), (7, 4)):
        panel.k_spin.setValue(k)
        panel.results = None
        panel.show_query(row)
        qtbot.waitUntil(lambda: panel.results is not None and panel.results.row == row, timeout=WAIT_MS)
        ref_ids, ref_sims = _brute_topk(emb, emb[row], k, own_row=row)
        res = panel.results
        _assert_same_ranking(res.ids, res.sims, ref_ids, ref_sims)
        assert row not in res.ids and len(panel.tiles) == k
        for tile, j in zip(panel.tiles, res.ids):
            correct = labels[j] == labels[row]
            assert tile.mark == ("correct" if correct else "incorrect")
            assert _tile_colour(tile) == "#%02x%02x%02x" % (SAME if correct else OTHER)
            assert tile.caption.text().startswith("✓" if correct else "✗")
        assert panel.query_spin.value() == row


def test_worst_queries_listed_worst_first_and_browsable(qtbot, trained):
    panel = _panel(qtbot, trained)
    _open(qtbot, panel)
    ref = _brute_ranks(trained["emb"], trained["labels"])
    rows = panel.worst_rows()
    assert sorted(rows) == list(range(len(ref)))  # every test query is listed
    np.testing.assert_array_equal(panel.session.ranks, ref)
    shown = ref[rows]
    assert list(shown) == sorted(shown, reverse=True) and shown[0] > 1
    assert panel.results.row == rows[0]  # the worst query is shown first, and marked in the list
    assert panel.worst.currentIndex().row() == 0
    item = panel.worst_model.index(5, 0)
    assert item.data() == str(shown[5]) and item.siblingAtColumn(1).data() == str(rows[5])
    panel.worst.setCurrentIndex(item)  # browsing the list shows that query
    qtbot.waitUntil(lambda: panel.results.row == rows[5], timeout=WAIT_MS)


def _drop(target, path):
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(path))])
    event = QDropEvent(QPointF(20, 20), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton,
                       Qt.KeyboardModifier.NoModifier)
    target.dropEvent(event)
    return event


def test_dropped_image_file_is_searched_without_marks(qtbot, trained, tmp_path, settings):
    from gui.app import MainWindow

    row = 11
    path = tmp_path / "query.png"
    trained["test"].image(row).save(path)
    (tmp_path / "notes.txt").write_text("x")
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(path)), QUrl.fromLocalFile(str(tmp_path / "notes.txt"))])
    assert image_paths(mime) == [path]

    win = MainWindow(trained["root"], settings)
    qtbot.addWidget(win)
    win.show()
    panel = win.retrieval
    assert _drop(win, path).isAccepted()  # dropped anywhere on the window: the Retrieval tab takes it
    assert win.tabs.currentWidget() is panel
    qtbot.waitUntil(lambda: panel.results is not None and panel.results.row is None, timeout=WAIT_MS)
    res = panel.results
    model = trained["model"].eval()
    with torch.no_grad():
        q = model(pil_transform(trained["params"].data, train=False)(trained["test"].image(row))[None])[0]
    q = q.double().numpy()
    ref_ids, ref_sims = _brute_topk(trained["emb"], q / np.linalg.norm(q), panel.k_spin.value())
    _assert_same_ranking(res.ids, res.sims, ref_ids, ref_sims)
    assert res.ids[0] == row and res.sims[0] > 0.999  # its own copy in the test split comes first
    assert res.same is None and {t.mark for t in panel.tiles} == {""}
    assert "query.png" in panel.query_caption.text()

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    _drop(panel, bad)
    qtbot.waitUntil(lambda: "broken.png: cannot decode image" in panel.status.text(), timeout=WAIT_MS)
    assert panel.results is res  # the last results stay
    win.close()


def test_embedding_runs_in_the_background_and_reports_progress(qtbot, trained, monkeypatch):
    """The GUI thread keeps serving events while the worker embeds (slowed down here: each batch of one image
    waits 20 ms, as a real model on real images would)."""
    real = retrieval_logic.embed_split

    def slow(*args, progress=None, **kw):
        import time

        def step(done, total):
            time.sleep(0.02)  # the scenario: a batch's work, not a wait for something
            progress(done, total)

        return real(*args, progress=step, **kw)

    monkeypatch.setattr(retrieval_logic, "embed_split", slow)
    panel = _panel(qtbot, trained, batch_size=1)
    seen, ticks = [], []
    real_progress = panel._on_progress
    panel._progress.changed.disconnect()
    panel._progress.changed.connect(lambda t, d, n: (seen.append((d, n, panel.session is None)),
                                                     real_progress(t, d, n)))
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(panel.session is None))
    timer.start(10)
    _open(qtbot, panel)
    timer.stop()
    n = len(trained["emb"])
    assert [d for d, _, _ in seen] == list(range(1, n + 1)) and {t for _, t, _ in seen} == {n}
    assert all(waiting for _, _, waiting in seen)  # shown while the worker was still busy
    assert sum(ticks) >= 10  # the event loop ran timers throughout, it was never blocked for the whole embedding
    assert panel.progress.isHidden() and panel.session is not None
