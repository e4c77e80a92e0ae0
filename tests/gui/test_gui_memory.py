"""The Memory tab on a recorded run (a real tiny training run written to an events file): what it shows equals the
run's memory_view events, which equal a brute-force float64 top-k from the saved memory and model."""
import copy

import numpy as np
import pytest
import torch

from gui.app import MainWindow
from gui.memory_view import age_colour
from gui.screenshot_memory import demo_params, record_run
from pipeline.figures import fit_thumbnail
from xbmcore.events import read_events
from xbmcore.hooks import Hook
from xbmcore.memory_view import AGE_EDGES

TINY = {"data": {"train_size": 16, "test_resize": 16, "test_size": 16,
                 "synthetic": {"num_classes": 40, "images_per_class_min": 4, "images_per_class_max": 5,
                               "classes_per_superclass": 4, "image_size": 16, "pretrain_classes": 4}},
        "model": {"embedding_dim": 16},
        "train": {"batch_size": 8, "images_per_class": 2, "warmup_steps": 4, "xbm_steps": 8, "drift_probe": 8,
                  "drift_every": 2, "drift_dts": [2], "memory_view_every": 4, "memory_view_k": 3,
                  "memory_view_anchors": 4}}


class Saver(Hook):
    """The model and the memory at every step of the XBM phase."""

    def __init__(self):
        self.saved = {}

    def on_step(self, trainer):
        m = trainer.state.memory
        self.saved[trainer.step] = (copy.deepcopy(trainer.model).double().eval(), *(b.clone() for b in m.get()),
                                    m.steps[: len(m)].clone())


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory_project")
    params = demo_params(TINY)
    (root / "params.yaml").write_text("train:\n  device: cpu\n")
    saver = Saver()
    torch.set_num_threads(1)
    trainer = record_run(root, "run-m", params, hooks=[saver], clean_train=True)
    return root, trainer, saver, root / "runs" / "run-m" / "events.jsonl"


def brute_force(trainer, saver, step, items, k):
    model, feats, labels, indices, steps = saver.saved[step]
    train = trainer.splits.train
    with torch.no_grad():
        a = model(torch.stack([train[i][0] for i in items]).double())
    sim = (a @ feats.double().T).numpy()
    supers = train.super_labels
    out = []
    for r, i in enumerate(items):
        js = [j for j in np.argsort(-sim[r], kind="stable") if labels[j] != train.labels[i]][:k]
        out.append([(int(indices[j]), float(sim[r, j]), int(step - steps[j]),
                     bool(supers[indices[j]] == supers[i])) for j in js])
    return out


def test_the_memory_tab_shows_the_recorded_views(qtbot, recorded, settings):
    root, trainer, saver, path = recorded
    views = [e for e in read_events(path) if e["kind"] == "memory_view"]
    assert [v["step"] for v in views] == [8, 12]  # every 4 steps of the XBM phase (5..12), its end = 12
    # the events against the brute force from the saved memory and model
    for v in views:
        items = [a["index"] for a in v["anchors"]]
        assert items == trainer.probe.items[:4].tolist()
        want = brute_force(trainer, saver, v["step"], items, 3)
        for a, w in zip(v["anchors"], want):
            assert [n["index"] for n in a["negatives"]] == [x[0] for x in w]
            assert [n["sim"] for n in a["negatives"]] == pytest.approx([x[1] for x in w], abs=1e-5)
            assert [(n["age"], n["same_super"]) for n in a["negatives"]] == [(x[2], x[3]) for x in w]
            assert a["super"] == int(trainer.splits.train.super_labels[a["index"]])
        assert v["super_share"] is not None and 0 <= v["super_share"] <= 1
    # the tab, driven through the window's event tail
    w = MainWindow(root, settings, retry_s=600)
    qtbot.addWidget(w)
    w.show()
    w.follow_run(path)
    w.tabs.setCurrentWidget(w.memory)
    m = w.memory
    qtbot.waitUntil(lambda: len(m.views) == 2 and m.shown is not None, timeout=10_000)
    qtbot.waitUntil(lambda: all(i in m.thumbs for i in m.tiles), timeout=20_000)
    last = views[-1]
    assert m.shown["step"] == last["step"] and len(m.rows) == 4
    for row, a in zip(m.rows, last["anchors"]):
        assert row[0].index == a["index"] and f"#{a['index']} · class {a['label']}" in row[0].caption.text()
        assert len(row) == 1 + len(a["negatives"]) == 4
        for tile, n in zip(row[1:], a["negatives"]):
            assert tile.index == n["index"]
            assert tile.caption.text() == ("● " if n["same_super"] else "") + f"{n['sim']:.3f} · {n['age']} st"
            assert age_colour(n["age"], AGE_EDGES) in tile.styleSheet()
    # thumbnails: the training images, decoded in the worker thread, at the tile size
    i = last["anchors"][0]["index"]
    want = fit_thumbnail(trainer.splits.train.image(i), 72)
    assert (m.thumbs[i].width(), m.thumbs[i].height()) == want.size
    # the history: age shares per view, the super-class share curve
    hist = np.array([v["age_hist"] for v in views], float)
    assert np.allclose(m.age_shares, hist / hist.sum(1, keepdims=True))
    x, y = m.share_curve.getData()
    assert x.tolist() == [8, 12] and y == pytest.approx([v["super_share"] for v in views])
    # an earlier view picked from the list
    m.pick.setCurrentIndex(2)
    assert m.shown["step"] == 8
    assert "step 8 ·" in m.summary.text()


class ViewServer:
    """A tracking server holding a finished run's memory views as its MLflowSink logs them (JSON artifacts)."""

    def __init__(self, views):
        self.views = {f"memory_view/step_{v['step']:07d}.json": v for v in views}
        self.listed = 0

    def run(self, run_id):
        return {"info": {"status": "FINISHED", "start_time": 0},
                "data": {"params": [{"key": "train.xbm_steps", "value": "8"}], "tags": [],
                         "metrics": [{"key": "memory_view/active_negatives", "step": max(v["step"] for v in
                                                                                          self.views.values())}]}}

    def history(self, run_id, key, start, end):
        return []

    def artifacts(self, run_id, path):
        self.listed += 1
        return [*self.views, *(p.replace(".json", ".png") for p in self.views)]

    def artifact_json(self, run_id, path):
        return self.views[path]


def test_a_server_runs_views_come_from_its_artifacts(qtbot, recorded):
    from gui.memory_view import MemoryPanel
    from gui.remote import RemoteRun

    root, _, _, path = recorded
    views = [e for e in read_events(path) if e["kind"] == "memory_view"]
    server = ViewServer(views)
    remote = RemoteRun(server, "run-1")
    got = [e for e in remote.poll() if e["kind"] == "memory_view"]
    assert got == views and server.listed == 1
    assert [e for e in remote.poll() if e["kind"] == "memory_view"] == [] and server.listed == 1  # listed once
    panel = MemoryPanel(root, loader=lambda *a: {})
    try:
        panel.add_events(list(reversed(got)))  # late artifacts: any order
        assert [v["step"] for v in panel.views] == [8, 12] and panel.shown["step"] == 12
    finally:
        panel.shutdown()
