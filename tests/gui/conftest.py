import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # before any Qt import: no display needed

import pytest  # noqa: E402
from PySide6.QtCore import QSettings  # noqa: E402


@pytest.fixture
def settings(tmp_path):
    """A QSettings file under tmp: tests never read or write the user's settings."""
    return QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat)


@pytest.fixture
def project(tmp_path):
    """A project folder with a params.yaml and its own tracking/study stores (absent until written)."""
    root = tmp_path / "project"
    root.mkdir()
    (root / "params.yaml").write_text(
        "data:\n  name: synthetic\nloss:\n  name: contrastive\n  margin: 0.5\n"
        "memory:\n  ratio: 0.5\n  mode: queue\ntrain:\n  batch_size: 16\n  images_per_class: 4\n"
        "  lr: 0.001\n  warmup_steps: 20\n  xbm_steps: 40\n  device: cpu\n  seed: 0\n"
    )
    return root


@pytest.fixture(autouse=True)
def _no_outside_tracking(monkeypatch):
    """The window resolves stores like the pipeline; keep it on the test's project, never a real server."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(autouse=True)
def _gc_in_gui_thread(qapp):
    """As in the app: Python's cyclic GC runs only in the GUI thread (a collection started by a worker thread
    could finalise Qt objects of the GUI thread and abort)."""
    import gc

    from pyqtgraph.util.garbage_collector import GarbageCollector

    collector = GarbageCollector(interval=0.2)
    yield
    collector.timer.stop()
    gc.collect()
    gc.enable()


@pytest.fixture(scope="session")
def mlflow_db(tmp_path_factory):
    """A tracking store as the pipeline leaves it: two runs, and a study run with one nested trial."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    client = MlflowClient(f"sqlite:///{path}")
    exp = client.create_experiment("xbm")

    def run(name, params, losses, recall, parent=None):
        tags = {"mlflow.parentRunId": parent} if parent else {}
        r = client.create_run(exp, run_name=name, tags=tags)
        rid = r.info.run_id
        for k, v in params.items():
            client.log_param(rid, k, v)
        for step, v in enumerate(losses):
            client.log_metric(rid, "loss", v, step=step)
        if recall is not None:
            client.log_metric(rid, "val/recall_at_1", recall, step=len(losses))
        client.set_terminated(rid, "FINISHED" if recall is not None else "FAILED")
        return rid

    ids = {
        "xbm": run("xbm", {"data.name": "synthetic", "loss.name": "contrastive", "memory.enabled": "True",
                           "memory.ratio": "0.5", "memory.mode": "queue", "train.lr": "0.001"},
                   [0.9, 0.7, 0.5, 0.4], 0.757),
        "baseline": run("baseline", {"data.name": "synthetic", "memory.enabled": "False"}, [0.9, 0.8, 0.75],
                        0.715),
    }
    ids["study"] = run("study", {}, [], None)
    ids["trial"] = run("trial-0", {"memory.ratio": "0.1"}, [0.6, 0.5], 0.7, parent=ids["study"])
    return path, ids
