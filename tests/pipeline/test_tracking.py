"""MLflow glue: the sink never stalls or kills training; stages of one execution share one run."""
from __future__ import annotations

import logging
import threading
import time

import pytest

from pipeline.tracking import (
    EXECUTION_TAG, MODEL_TAG, MLflowSink, StageRun, attach_run, events_path, metric_name, project_home, run_key,
    tracking_uri,
)
from xbmcore.config import Params
from xbmcore.events import make_event


def step_event(step: int, loss: float = 0.5) -> dict:
    return make_event("step", step, phase="xbm", loss=loss, loss_batch=0.3, loss_memory=0.2, pos_pairs=4,
                      neg_pairs=10, mem_pos_pairs=2, mem_neg_pairs=100, memory_fill=0.5, memory_size=50,
                      drift=None, drift_age=None, lr=1e-3, images_per_s=100.0)


class SlowStore:
    def __init__(self, delay: float):
        self.delay, self.batches = delay, []

    def log_batch(self, run_id, metrics=(), synchronous=None):
        time.sleep(self.delay)
        self.batches.append(list(metrics))


class FailingStore:
    def __init__(self):
        self.calls = 0

    def log_batch(self, run_id, metrics=(), synchronous=None):
        self.calls += 1
        raise ConnectionError("database is locked")


class BlockedStore:
    """A store whose calls block until `gate` is set; it records the thread of every call (one from the test's
    own thread returns at once, so that a sink that logs synchronously fails the test instead of hanging it)."""

    def __init__(self):
        self.gate, self.in_call, self.threads = threading.Event(), threading.Event(), []

    def log_batch(self, run_id, metrics=(), synchronous=None):
        self.threads.append(threading.current_thread())
        if threading.current_thread() is threading.main_thread():
            return
        self.in_call.set()
        self.gate.wait()
        self.in_call.clear()


def test_a_blocked_store_does_not_stall_training():
    store = BlockedStore()
    sink = MLflowSink(store, "run", flush_s=0.05, close_timeout_s=0.2)
    try:
        for s in range(1, 2001):  # 2000 steps x 12 metrics: enqueued while the store hangs in its first call
            sink.emit(step_event(s))
        assert store.in_call.wait(30)
        assert threading.current_thread() not in store.threads  # no call from the training thread
        sink.close()  # gives up after close_timeout_s instead of waiting for the store:
        assert store.in_call.is_set() and len(store.threads) == 1  # it returned with the call still in flight
    finally:
        store.gate.set()
    sink._thread.join(30)
    assert not sink._thread.is_alive()  # and the thread ends after the call in flight


def test_slow_store_gets_everything_in_order_when_given_time():
    store = SlowStore(delay=0.05)
    sink = MLflowSink(store, "run", flush_s=0.05, max_batch=500)
    for s in range(1, 101):
        sink.emit(step_event(s, loss=s / 100))
    sink.close()
    got = [m for b in store.batches for m in b]
    assert len(got) == 100 * 10  # drift and drift_age are None: not logged
    loss = [(m.step, m.value) for m in got if m.key == "loss"]
    assert loss == [(s, s / 100) for s in range(1, 101)]
    assert max(len(b) for b in store.batches) <= 500


def test_failing_store_drops_with_a_warning_and_never_raises(caplog):
    store = FailingStore()
    sink = MLflowSink(store, "run", flush_s=0.01, retries=2, backoff_s=0.01)
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        for s in range(1, 11):
            sink.emit(step_event(s))
        sink.close()
    assert sink.dropped == 100 and sink.sent == 0
    assert store.calls % 3 == 0 and store.calls >= 3  # each batch: 1 try + 2 retries
    assert any("dropping metrics" in r.message and "database is locked" in r.message for r in caplog.records)
    assert not sink._thread.is_alive()


def test_steps_already_in_the_run_are_not_logged_again():
    store = SlowStore(delay=0)
    sink = MLflowSink(store, "run", logged={"loss": 5}, flush_s=0.01)
    for s in range(1, 9):
        sink.emit(step_event(s))
    sink.close()
    got = [m for b in store.batches for m in b]
    assert sorted(m.step for m in got if m.key == "loss") == [6, 7, 8]
    assert sorted(m.step for m in got if m.key == "lr") == list(range(1, 9))


def test_eval_metrics_are_named_split_slash_metric():
    ev = make_event("eval", 10, phase="xbm", split="val", metrics={"recall@1": 0.5, "map@r": 0.2})
    assert MLflowSink.metrics_of(ev) == {"val/recall_at_1": 0.5, "val/map_at_r": 0.2}
    assert metric_name("test/r_precision") == "test/r_precision"


def test_tracking_uri_is_absolute(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    p = Params()
    assert tracking_uri(p, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    p = Params.model_validate({"tracking": {"uri": "sqlite:///db/x.db"}})
    assert tracking_uri(p, tmp_path) == f"sqlite:///{tmp_path.resolve()}/db/x.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert tracking_uri(p, tmp_path) == "http://tracking:5000"


def test_temporary_experiment_copies_track_into_the_project(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    copy = tmp_path / ".dvc" / "tmp" / "exps" / "tmpab12cd"  # where `dvc exp run --temp` runs the stages
    copy.mkdir(parents=True)
    assert project_home(copy) == tmp_path.resolve() and project_home(tmp_path) == tmp_path.resolve()
    assert tracking_uri(Params(), copy) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert events_path(Params(), copy, "k") == tmp_path.resolve() / "runs" / "k" / "events.jsonl"


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    """One project root and MLflow database for the tests below (creating a database takes seconds)."""
    return tmp_path_factory.mktemp("project")


@pytest.fixture
def store(db, monkeypatch, request):
    for var in ("MLFLOW_TRACKING_URI", "XBM_MLFLOW_RUN_ID", "XBM_MLFLOW_PARENT_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    return db


def params(request, **sections) -> Params:
    """Default params in an experiment of the test's own name."""
    return Params.model_validate({"tracking": {"experiment": request.node.name}, **sections})


def test_stages_of_one_execution_share_a_run_until_it_finishes(store, request):
    p = params(request)
    with StageRun(p, store, "warmup", progress=False) as a:
        for s in range(1, 4):
            a.sink.emit(step_event(s))
    with StageRun(p, store, "train_xbm", progress=False) as b:
        b.sink.emit(step_event(4))
    assert a.run_id == b.run_id
    client = b.mlflow.client
    run = client.get_run(a.run_id)
    # Each stage ended the run as it exited (none is left RUNNING), and the execution stays open for the next.
    assert run.info.status == "FINISHED" and run.data.tags["xbm.run_key"] == run_key(p)
    assert run.data.tags[EXECUTION_TAG] == "open"
    assert run.data.params["memory.ratio"] == str(p.memory.ratio)
    assert [m.step for m in client.get_metric_history(a.run_id, "loss")] == [1, 2, 3, 4]
    with StageRun(p, store, "evaluate", finish=True, progress=False) as c:
        pass
    assert c.run_id == a.run_id and client.get_run(a.run_id).info.status == "FINISHED"
    assert client.get_run(a.run_id).data.tags[EXECUTION_TAG] == "done"
    # The next execution with the same params is a new run; other params are another run.
    assert attach_run(p, store, "warmup").run_id != a.run_id
    other = params(request, memory={"ratio": 0.2})
    assert attach_run(other, store, "warmup").key != run_key(p)
    # Every stage appended to the same events file, and LATEST names the run.
    assert (store / "runs" / "LATEST").read_text().strip() == run_key(p)
    kinds = [line.split('"kind":"')[1].split('"')[0]
             for line in (store / "runs" / run_key(p) / "events.jsonl").read_text().splitlines()]
    assert kinds.count("start") == 3 and kinds[-1] == "end"


def test_failure_and_stop_leave_the_run_open_for_a_rerun(store, request):
    from xbmcore.hooks import TrainingStopped

    p = params(request)
    with pytest.raises(TrainingStopped):
        with StageRun(p, store, "warmup", progress=False) as a:
            raise TrainingStopped(15, 3, "xbm")
    assert a.mlflow.client.get_run(a.run_id).info.status == "KILLED"
    with pytest.raises(ZeroDivisionError):
        with StageRun(p, store, "warmup", progress=False) as b:
            1 / 0
    assert b.run_id == a.run_id and b.mlflow.client.get_run(a.run_id).info.status == "FAILED"
    with StageRun(p, store, "warmup", progress=False) as c:
        assert c.mlflow.client.get_run(a.run_id).info.status == "RUNNING"  # opened again while the stage runs
    assert c.run_id == a.run_id and c.mlflow.client.get_run(a.run_id).info.status == "FINISHED"


def test_a_fresh_start_does_not_mix_with_an_abandoned_run(store, request):
    p = params(request)
    with StageRun(p, store, "warmup", progress=False) as a:
        a.sink.emit(step_event(1))
        a.sink.emit(step_event(2))
    # Not resuming: a stage that will log step 1 again starts a new run instead of hiding its points.
    with StageRun(p, store, "warmup", fresh_start=1, progress=False) as b:
        pass
    assert b.run_id != a.run_id


def test_parent_and_explicit_run_ids(store, monkeypatch, request):
    p = params(request)
    parent = attach_run(p, store, "tune")
    monkeypatch.setenv("XBM_MLFLOW_PARENT_RUN_ID", parent.run_id)
    child = attach_run(p, store, "train_xbm")
    assert child.run_id != parent.run_id
    assert child.client.get_run(child.run_id).data.tags["mlflow.parentRunId"] == parent.run_id
    assert attach_run(p, store, "evaluate").run_id == child.run_id
    monkeypatch.delenv("XBM_MLFLOW_PARENT_RUN_ID")
    monkeypatch.setenv("XBM_MLFLOW_RUN_ID", parent.run_id)
    assert attach_run(p, store, "evaluate").run_id == parent.run_id


def test_an_unreachable_store_leaves_the_stage_running(tmp_path, monkeypatch, caplog):
    (tmp_path / "blocker").write_text("a file where the database's folder should be")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/blocker/mlflow.db")
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        with StageRun(Params(), tmp_path, "warmup", progress=False) as run:
            run.sink.emit(step_event(1))
    assert run.mlflow is None
    assert any("cannot attach" in r.message for r in caplog.records)
    assert (tmp_path / "runs" / run_key(Params()) / "events.jsonl").read_text().count('"kind":"step"') == 1


def test_evaluate_attaches_to_the_finished_run_that_trained_its_model(store, request):
    p = params(request)
    with StageRun(p, store, "train_xbm", finish=True, progress=False) as a:
        a.sink.emit(step_event(1))
        a.set_tags({MODEL_TAG: "sha-of-model"})
    client = a.mlflow.client
    assert client.get_run(a.run_id).info.status == "FINISHED"  # whether or not evaluate runs after it
    with StageRun(p, store, "evaluate", finish=True, model_sha256="sha-of-model", progress=False) as b:
        b.sink.emit(make_event("eval", 1, phase="evaluate", split="test", metrics={"recall@1": 0.5}))
    assert b.run_id == a.run_id
    run = client.get_run(a.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["test/recall_at_1"] == 0.5
    # A model no run trained here (another copy's): the usual rule, here a new run.
    with StageRun(p, store, "evaluate", finish=True, model_sha256="other", progress=False) as c:
        pass
    assert c.run_id != a.run_id


class ArtifactStore(SlowStore):
    """Keeps the metrics, and the artifacts' files (read while they exist) with the thread that logged them."""

    def __init__(self):
        super().__init__(0.0)
        self.artifacts = {}

    def log_artifact(self, run_id, path, artifact_path=None):
        from pathlib import Path

        self.artifacts[f"{artifact_path}/{Path(path).name}"] = (Path(path).read_bytes(), threading.current_thread())


def memory_view_event(step: int) -> dict:
    neg = dict(index=9, sim=0.75, age=120, label=3, same_super=True)
    return make_event("memory_view", step, phase="xbm", k=1,
                      anchors=[dict(index=1, label=2, super=0, negatives=[neg])],
                      age_edges=[0, 10, 100], age_hist=[2, 5, 1], age_quantiles={"p10": 3.0, "p50": 40.0, "p90": 150.0},
                      active_negatives=8, super_share=0.25, topk_super_share=1.0, memory_size=50)


def test_a_memory_view_gives_metrics_and_an_artifact_at_each_evaluation_and_at_the_end():
    import io
    import json

    from PIL import Image

    store = ArtifactStore()
    sink = MLflowSink(store, "run", flush_s=0.01, images=lambda: (lambda i: Image.new("RGB", (16, 16), (i, 0, 0))))
    sink.emit(memory_view_event(500))
    sink.emit(make_event("eval", 500, phase="xbm", split="val", metrics={"recall@1": 0.5}))
    sink.emit(memory_view_event(1000))
    sink.emit(memory_view_event(1200))  # the phase's end: logged when the sink closes
    sink.close()
    metrics = {(m.key, m.step): m.value for b in store.batches for m in b}
    assert metrics[("memory_view/age_p50", 500)] == 40.0 and metrics[("memory_view/age_p90", 1200)] == 150.0
    assert metrics[("memory_view/super_share", 1000)] == 0.25 and metrics[("memory_view/topk_super_share", 500)] == 1
    assert sorted(store.artifacts) == ["memory_view/step_0000500.json", "memory_view/step_0000500.png",
                                       "memory_view/step_0001200.json", "memory_view/step_0001200.png"]
    data, thread = store.artifacts["memory_view/step_0001200.png"]
    assert thread is not threading.main_thread()  # drawn and sent off the training thread
    assert Image.open(io.BytesIO(data)).size[0] >= 640
    assert json.loads(store.artifacts["memory_view/step_0000500.json"][0])["anchors"][0]["negatives"][0]["sim"] == 0.75
