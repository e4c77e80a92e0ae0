"""The window with a child that writes events: the plots receive its points; LATEST, run folders, settings."""
import json
import sys
import time

import numpy as np
import pytest
from PySide6.QtCore import Qt

from gui.app import MainWindow
from xbmcore.events import make_event

from gui_fake_run import SCRIPT as FAKE_RUN, step_fields

PY = sys.executable


def fake_run_command(runs_dir, key, *extra):
    return lambda overrides: [PY, str(FAKE_RUN), str(runs_dir), key, *extra]


@pytest.fixture
def make_window(qtbot, project, settings):
    def make(**kw):
        w = MainWindow(project, settings, retry_s=60, **kw)
        qtbot.addWidget(w)
        w.show()
        w.monitor.smoothing.setCurrentIndex(0)  # raw values, to compare with what the child wrote
        return w
    return make


def curve_data(w, plot, key):
    """All points a curve holds (getData would give the downsampled part on screen)."""
    ds = plot.curves[key].getOriginalDataset()
    return (np.array([]), np.array([])) if ds[0] is None else ds


def test_plots_receive_points_from_a_child_that_writes_events(qtbot, make_window, project):
    runs = project / "runs"
    w = make_window(run_command=fake_run_command(runs, "run-a", "--warmup", "20", "--xbm", "40",
                                                 "--delay", "0.01", "--bad-line"))
    qtbot.mouseClick(w.form.run_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: w.monitor.data.status == "finished", timeout=30_000)
    qtbot.waitUntil(lambda: len(curve_data(w, w.monitor.loss, "loss")[0]) == 60, timeout=5_000)
    x, y = curve_data(w, w.monitor.loss, "loss")
    expected = [step_fields(s, "warmup" if s <= 20 else "xbm", 20, 320)["loss"] for s in range(1, 61)]
    assert x.tolist() == list(range(1, 61))
    assert np.allclose(y, expected)
    fx, fy = curve_data(w, w.monitor.fill, "memory_fill")
    assert fy[19] == 0 and fy[-1] == 100.0  # percent; step 20 is the last warm-up step
    dx, dy = curve_data(w, w.monitor.drift, "drift")
    # drift exists once the memory is full (step 40 here): only those steps are drawn, joined
    assert dx.tolist() == list(range(40, 61)) and np.isfinite(dy).all()
    rx, ry = curve_data(w, w.monitor.recall, "val/recall@1")
    assert rx.tolist() == [20, 40, 60]
    # phases: warm-up at 0, then memory init and XBM at step 20 share one marker
    assert [m.value() for m in w.monitor.loss.markers] == [0, 20]
    assert w.monitor.phase_label.text() == "XBM"
    assert "step 60 / 60" in w.monitor.progress_label.text()
    # the header follows the data at the next redraw tick (its interval grows with a redraw's cost)
    qtbot.waitUntil(lambda: w.monitor.status_label.text() == "fake run finished", timeout=5_000)
    # what the run is, for a run started elsewhere: its params, MLflow run and checkpoint on hover
    assert "train.seed = 0" in w.monitor.source_label.toolTip()
    assert w.bad_status.text() == "malformed lines: 1"
    qtbot.waitUntil(lambda: w.child_status.text() == "run finished", timeout=10_000)


def test_follows_latest_and_switches_to_a_new_run(qtbot, make_window, project):
    runs = project / "runs"
    w = make_window()
    assert w.follow_action.isChecked()
    qtbot.waitUntil(lambda: w.monitor.phase_label.text() == "waiting", timeout=5_000)
    # a run started elsewhere (e.g. `dvc repro` in a terminal)
    w.launch(fake_run_command(runs, "first", "--warmup", "5", "--xbm", "5")([]), "run")
    qtbot.waitUntil(lambda: w.monitor.data.status == "finished" and w.monitor.data.last_step == 10,
                    timeout=30_000)
    qtbot.waitUntil(lambda: not w.child.is_running(), timeout=10_000)
    w.launch(fake_run_command(runs, "second", "--warmup", "3", "--xbm", "4")([]), "run")
    qtbot.waitUntil(lambda: "second" in w.monitor.source_label.text() and w.monitor.data.status == "finished",
                    timeout=30_000)
    assert w.monitor.data.last_step == 7 and len(w.monitor.data.curves["loss"]) == 7
    # pick a run folder: the first run again, LATEST no longer followed
    w.follow_run(runs / "first")
    qtbot.waitUntil(lambda: "first" in w.monitor.source_label.text() and w.monitor.data.last_step == 10,
                    timeout=10_000)
    assert not w.follow_action.isChecked()


def test_big_run_loads_without_freezing(qtbot, make_window, project):
    """100,000 steps in the file: loaded by the worker thread while the GUI thread keeps serving events."""
    run = project / "runs" / "big"
    run.mkdir(parents=True)
    lines = [json.dumps(make_event("start", 0, run_id="big", params={}, total_steps=100_000))]
    for s in range(100_000):
        lines.append(json.dumps(make_event("step", s, **step_fields(s, "warmup" if s < 3000 else "xbm", 3000,
                                                                     50_000))))
    (run / "events.jsonl").write_text("\n".join(lines) + "\n")
    w = make_window(follow=run)
    # GUI-thread liveness probe: CPU time of the GUI thread between 20 ms ticks (wall time would measure the
    # machine's load; CPU time measures work done in this thread without returning to the event loop)
    ticks = [time.thread_time()]
    timer_id = w.startTimer(20)
    w.timerEvent = lambda e: ticks.append(time.thread_time())
    qtbot.waitUntil(lambda: w.monitor.data.last_step == 99_999, timeout=90_000)
    qtbot.waitUntil(lambda: len(curve_data(w, w.monitor.loss, "loss")[0]) == 100_000, timeout=20_000)
    w.killTimer(timer_id)
    longest = np.diff(ticks).max()
    # parsing 100,000 lines costs seconds of CPU: it happens in the tail's thread, never between two ticks here
    assert longest < 0.5, f"GUI thread busy for {longest:.2f} s CPU without serving events"
    # what is painted is downsampled to the plot's width, not 100,000 points
    w.monitor.graphics.grab()
    drawn = w.monitor.loss.curves["loss"].curve.xData
    assert len(drawn) < 5_000


def test_layout_and_last_params_remembered(qtbot, project, settings):
    w = MainWindow(project, settings, retry_s=60)
    qtbot.addWidget(w)
    w.show()
    w.resize(760, 640)  # the offscreen screen is 800 px: larger sizes are clamped on restore
    w.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, w.form_dock)
    w.form.editors["train.lr"].setText("0.0005")
    w.form.editors["memory.mode"].setCurrentText("index")
    w.form.extra.setText("memory.weight=0.5")
    w.tabs.setCurrentIndex(1)
    w.close()
    assert settings.fileName().startswith(str(project.parent))  # the test's file, not the user's
    w2 = MainWindow(project, settings, retry_s=60)
    qtbot.addWidget(w2)
    assert w2.form.editors["train.lr"].text() == "0.0005"
    assert w2.form.editors["memory.mode"].currentText() == "index"
    assert w2.form.extra.text() == "memory.weight=0.5"
    assert (w2.width(), w2.height()) == (760, 640)
    assert w2.dockWidgetArea(w2.form_dock) == Qt.DockWidgetArea.RightDockWidgetArea
    assert w2.tabs.currentIndex() == 1
    assert w2.form.overrides()[0] == ["memory.mode=index", "train.lr=0.0005", "memory.weight=0.5"]
    w2.close()
