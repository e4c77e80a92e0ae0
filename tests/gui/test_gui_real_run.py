"""End to end: a real tiny pipeline run launched from the window (`dvc exp run -S ...` in a copy of the project);
the plots receive the run's step points."""
import shutil

import pytest
from PySide6.QtCore import Qt

from gui import process
from gui.app import MainWindow
from gui.demo import make_project
from xbmcore.events import read_events

TINY = {
    "data.synthetic.num_classes": 40, "data.synthetic.images_per_class_max": 6,
    # warmup depends on the pretrain stage (dvc.yaml): a few steps on a small pretrain split of 10 classes
    "data.synthetic.pretrain_classes": 10, "pretrain.steps": 6, "pretrain.batch_size": 8, "pretrain.num_threads": 1,
    "train.warmup_steps": 30, "train.xbm_steps": 20, "train.eval_every": 10, "train.checkpoint_every": 10,
    "train.num_threads": 1, "train.device": "cpu", "eval.recall_at": [1, 10],
}


@pytest.mark.slow
def test_real_run_from_the_window(qtbot, tmp_path, settings, monkeypatch, mlflow_db):
    root = make_project(tmp_path / "project", TINY)
    db = tmp_path / "mlflow.db"
    shutil.copy(mlflow_db[0], db)  # a store with its tables made: no schema migration inside the run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    # the real launch command, up to the warm-up stage (download + warmup): enough for the loss curve
    w = MainWindow(root, settings, run_command=lambda ov: [*process.run_command(ov), "warmup"], retry_s=60)
    qtbot.addWidget(w)
    w.show()
    w.monitor.smoothing.setCurrentIndex(0)
    w.form.editors["train.warmup_steps"].setText("20")
    w.form.editors["train.seed"].setText("3")
    w.form._changed()
    assert w.form.overrides() == (["train.warmup_steps=20", "train.seed=3"], {})
    qtbot.mouseClick(w.form.run_button, Qt.MouseButton.LeftButton)
    assert w.child.is_running(), w.banner.detail.text()
    assert "dvc exp run -S train.warmup_steps=20 -S train.seed=3 warmup" in w.child.command
    with qtbot.waitSignal(w.child.finished, timeout=240_000) as sig:
        pass
    assert sig.args[0] == 0, w.log.toPlainText()[-3000:]
    # intermediate stages end without an `end` event (the run goes on with the next stage)
    qtbot.waitUntil(lambda: w.monitor.data.last_step == 20, timeout=10_000)
    events = read_events((root / "runs" / (root / "runs" / "LATEST").read_text().strip() / "events.jsonl"))
    steps = [e for e in events if e["kind"] == "step"]
    start = next(e for e in events if e["kind"] == "start" and e["stage"] == "warmup")
    assert start["params"]["train.seed"] == 3 and start["params"]["train.warmup_steps"] == 20  # the form's values
    def points():
        x, y = w.monitor.loss.curves["loss"].getOriginalDataset()
        return ([], []) if x is None else (x.tolist(), y.tolist())

    qtbot.waitUntil(lambda: len(points()[0]) == 20, timeout=5_000)
    x, y = points()
    assert x == [e["step"] for e in steps] == list(range(1, 21))
    assert y == pytest.approx([e["loss"] for e in steps])
    rx, ry = w.monitor.recall.curves["val/recall@1"].getOriginalDataset()
    assert rx.tolist() == [10, 20]
    assert w.monitor.phase_label.text() == "Warm-up" and "step 20 / 40" in w.monitor.progress_label.text()
    assert "Running stage 'warmup'" in w.log.toPlainText()
    assert w.bad_status.text() == "malformed lines: 0"
