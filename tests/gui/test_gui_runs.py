"""Runs and study panels: read MLflow and Optuna stores off the GUI thread; missing stores are said and retried."""
import shutil
import sqlite3

import numpy as np
import pytest
from PySide6.QtCore import Qt

from gui.runs import RunsPanel
from gui.stores import describe_error, fetch_runs
from gui.study import StudyPanel


def _panel(qtbot, uri, retry_s=60):
    p = RunsPanel(lambda: (uri, "xbm"), retry_s=retry_s)
    qtbot.addWidget(p)
    p.show()
    return p


def test_runs_table_with_nested_trials(qtbot, mlflow_db, tmp_path):
    path, ids = mlflow_db
    p = _panel(qtbot, f"sqlite:///{path}")
    p.start()
    qtbot.waitUntil(lambda: p.tree.topLevelItemCount() == 3, timeout=60_000)
    top = {p.tree.topLevelItem(i).text(0): p.tree.topLevelItem(i) for i in range(3)}
    assert set(top) == {"xbm", "baseline", "study"}
    assert top["study"].childCount() == 1 and top["study"].child(0).text(0) == "trial-0"
    xbm = top["xbm"]
    assert [xbm.text(c) for c in (1, 3, 4, 5, 7, 9)] == ["finished", "synthetic", "contrastive", "0.5 queue",
                                                         "0.001", "75.7%"]
    assert top["baseline"].text(5) == "off"
    assert "4 runs (1 trials nested" in p.state_label.text()
    p.shutdown()


def test_overlay_of_selected_runs(qtbot, mlflow_db):
    path, ids = mlflow_db
    p = _panel(qtbot, f"sqlite:///{path}")
    p.smoothing.setCurrentIndex(0)  # raw: the values as logged
    p.refresh()
    qtbot.waitUntil(lambda: p.tree.topLevelItemCount() == 3, timeout=60_000)
    for i in range(p.tree.topLevelItemCount()):
        it = p.tree.topLevelItem(i)
        it.setSelected(it.text(0) in ("xbm", "baseline"))
    qtbot.waitUntil(lambda: len(p.plot.getPlotItem().listDataItems()) == 2, timeout=30_000)
    curves = {c.name(): c.getOriginalDataset() for c in p.plot.getPlotItem().listDataItems()}
    assert curves["xbm"][1].tolist() == [0.9, 0.7, 0.5, 0.4]
    assert curves["baseline"][0].tolist() == [0, 1, 2]
    p.smoothing.setCurrentIndex(1)  # 10-step mean: the loss is smoothed, evaluations never are
    assert {c.name(): c.getOriginalDataset()[1].tolist()[-1] for c in p.plot.getPlotItem().listDataItems()} == \
        pytest.approx({"xbm": 0.625, "baseline": 0.8166666666666667})
    p.metric_combo.setCurrentText("val/recall@1")  # logged as val/recall_at_1; shown in percent
    qtbot.waitUntil(lambda: {c.name(): c.getOriginalDataset()[1].tolist()
                             for c in p.plot.getPlotItem().listDataItems()} == {"xbm": [75.7], "baseline": [71.5]},
                    timeout=30_000)
    p.shutdown()


def test_missing_store_is_said_and_retried(qtbot, mlflow_db, tmp_path):
    path, _ = mlflow_db
    target = tmp_path / "later" / "mlflow.db"
    p = _panel(qtbot, f"sqlite:///{target}", retry_s=0.3)
    p.start()
    qtbot.waitUntil(lambda: "no tracking store" in p.state_label.text(), timeout=30_000)
    assert "Retrying every 0.3 s" in p.state_label.text() and p.state_label.property("error")
    assert not target.exists()  # looking never creates a store
    target.parent.mkdir()
    shutil.copy(path, target)
    qtbot.waitUntil(lambda: p.tree.topLevelItemCount() == 3, timeout=60_000)
    assert not p.state_label.property("error")
    p.shutdown()


def test_locked_store_is_named():
    from sqlalchemy.exc import OperationalError

    err = OperationalError("SELECT 1", {}, sqlite3.OperationalError("database is locked"))
    assert describe_error(err) == "store is locked by another process"


def test_locked_store_fails_the_call_not_the_window(tmp_path, mlflow_db):
    path, _ = mlflow_db
    db = tmp_path / "mlflow.db"
    shutil.copy(path, db)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process writing
    try:
        with pytest.raises(Exception) as info:
            fetch_runs(f"sqlite:///{db}?timeout=0.2", "xbm")
        assert describe_error(info.value) == "store is locked by another process"
    finally:
        holder.execute("ROLLBACK")
        holder.close()


@pytest.fixture
def study_db(project):
    import optuna

    storage = f"sqlite:///{project / 'optuna.db'}"
    study = optuna.create_study(study_name="xbm", storage=storage, direction="maximize")
    dists = {"memory.ratio": optuna.distributions.FloatDistribution(0.01, 1.0, log=True),
             "train.lr": optuna.distributions.FloatDistribution(1e-4, 3e-3, log=True)}
    for ratio, lr, value in ((0.1, 1e-3, 0.70), (0.5, 3e-4, 0.76), (0.02, 2e-3, None), (0.9, 1e-4, 0.72)):
        study.enqueue_trial({"memory.ratio": ratio, "train.lr": lr})
        t = study.ask(dists)
        if value is None:
            study.tell(t, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(t, value)
    return storage, study


def test_study_trials_and_best_params(qtbot, project, study_db):
    storage, study = study_db
    panel = StudyPanel(lambda: (None, project, "xbm"), retry_s=60)
    qtbot.addWidget(panel)
    panel.show()
    panel.start()
    qtbot.waitUntil(lambda: panel.table.rowCount() == 4, timeout=30_000)
    headers = [panel.table.horizontalHeaderItem(c).text() for c in range(panel.table.columnCount())]
    assert headers == ["Trial", "State", "Value", "Duration", "memory.ratio", "train.lr"]
    states = sorted(panel.table.item(r, 1).text() for r in range(4))
    assert states == ["complete", "complete", "complete", "pruned"]
    best = study.best_trial
    assert f"trial {best.number}, value {best.value:.4f}" in panel.best_label.text()
    assert "3 complete, 1 pruned" in panel.state_label.text()
    with qtbot.waitSignal(panel.use_params) as sig:
        qtbot.mouseClick(panel.use_button, Qt.MouseButton.LeftButton)
    assert sig.args[0] == best.params
    # objective per trial and the best so far
    x, y = panel.best_line.getData()
    assert np.all(np.diff(y) >= 0) and y[-1] == pytest.approx(0.76)
    panel.shutdown()


def test_missing_study_storage_is_said(qtbot, project):
    panel = StudyPanel(lambda: (None, project, "xbm"), retry_s=60)
    qtbot.addWidget(panel)
    panel.refresh()
    qtbot.waitUntil(lambda: "no study storage" in panel.state_label.text(), timeout=30_000)
    assert not (project / "optuna.db").exists()
    panel.shutdown()
