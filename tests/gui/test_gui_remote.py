"""Following a run through a tracking server: a run logs to the session's `mlflow server` (PostgreSQL backend)
through the pipeline's own MLflowSink, and the window's Live tab receives its points; a server that is down or
stalls is said in the status bar and retried while the window stays responsive."""
from __future__ import annotations

import socket

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PySide6.QtCore import QTimer

import servers
from gui.app import MainWindow
from gui.remote import RemoteRun, RemoteTail, Server
from gui.runs import RunsPanel
from pipeline.tracking import STEP_METRICS, MLflowSink
from xbmcore.events import make_event

pytestmark = pytest.mark.slow
WARMUP, XBM = 20, 40


def step_event(step: int) -> dict:
    xbm = step > WARMUP
    return make_event(
        "step", step, phase="xbm" if xbm else "warmup", loss=1.0 / step, loss_batch=0.5 / step,
        loss_memory=0.25 / step if xbm else None, pos_pairs=10 + step, neg_pairs=100 + step,
        mem_pos_pairs=1000 + step if xbm else None, mem_neg_pairs=5000 + step if xbm else None,
        memory_fill=min(1.0, 0.5 + 0.01 * (step - WARMUP)) if xbm else None, memory_size=None,
        drift=0.01 * step if xbm and step % 3 == 0 else None, drift_age=5.0 if xbm and step % 3 == 0 else None,
        lr=1e-3, images_per_s=200.0 + step)


class ServerRunLog:
    """A training run on 'another machine': params and per-step metrics sent as the pipeline sends them."""

    def __init__(self, uri: str, experiment: str, warmup_steps: int | str = WARMUP):
        self.client = MlflowClient(uri)
        exp = self.client.get_experiment_by_name(experiment) or None
        exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        run = self.client.create_run(exp_id, run_name=f"{experiment}-run", tags={"xbm.stage": "train_xbm"})
        self.run_id = run.info.run_id
        for k, v in {"train.warmup_steps": warmup_steps, "train.warmup_max_steps": 3 * WARMUP,
                     "train.xbm_steps": XBM, "memory.enabled": True, "data.name": "synthetic",
                     "loss.name": "contrastive"}.items():
            self.client.log_param(self.run_id, k, v)

    def log(self, steps, evals=()) -> None:
        sink = MLflowSink(self.client, self.run_id, flush_s=0.1)
        for s in steps:
            sink.emit(step_event(s))
        for s, v in evals:
            sink.emit(make_event("eval", s, phase="xbm", split="val", metrics={"recall@1": v}))
        sink.close()
        assert sink.dropped == 0


def test_a_run_with_an_auto_warmup_is_followed_by_its_warmup_end_tag(mlflow_server):
    run = ServerRunLog(mlflow_server.uri, "remote-auto", warmup_steps="auto")
    run.log(range(1, 16))
    remote = RemoteRun(Server(mlflow_server.uri), run.run_id)
    events = remote.poll()  # the warm-up still running: its end is not known yet, every step is the warm-up's
    assert events[0]["total_steps"] == 3 * WARMUP + XBM  # at most warmup_max_steps + the XBM phase
    assert {e["phase"] for e in events if e["kind"] == "step"} == {"warmup"}
    assert [e["step"] for e in events if e["kind"] == "step"] == list(range(1, 16))
    # The warm-up stage tags where it ended; the XBM phase's steps follow.
    run.client.set_tag(run.run_id, "warmup_end", str(WARMUP))
    run.log(range(16, 26))
    events = remote.poll()
    assert [(e["phase"], e["step"]) for e in events if e["kind"] == "phase"] == \
        [("memory_init", WARMUP), ("xbm", WARMUP)]
    assert [(e["step"], e["phase"]) for e in events if e["kind"] == "step"] == \
        [(s, "warmup" if s <= WARMUP else "xbm") for s in range(16, 26)]


def test_remote_run_reads_only_new_steps(mlflow_server):
    run = ServerRunLog(mlflow_server.uri, "remote-incremental")
    run.log(range(1, 26), evals=[(24, 0.5)])
    server = Server(mlflow_server.uri)
    calls = []
    history = server.history
    server.history = lambda rid, key, a, b: calls.append((key, a, b)) or history(rid, key, a, b)
    remote = RemoteRun(server, run.run_id)

    events = remote.poll()
    steps = [e for e in events if e["kind"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 26))
    for e in steps:  # every logged field, value for value
        ref = step_event(e["step"])
        assert {k: e[k] for k in STEP_METRICS} == pytest.approx({k: ref[k] for k in STEP_METRICS}, nan_ok=True)
        assert e["phase"] == ref["phase"]
    assert [(e["phase"], e["step"]) for e in events if e["kind"] == "phase"] == \
        [("warmup", 0), ("memory_init", WARMUP), ("xbm", WARMUP)]
    assert [e["metrics"] for e in events if e["kind"] == "eval"] == [{"recall@1": 0.5}]
    assert ("loss", 1, 25) in calls and ("loss_memory", 1, 25) in calls

    calls.clear()
    assert [e for e in remote.poll() if e["kind"] != "start"] == []  # nothing new: nothing read
    assert calls == []
    run.log(range(26, 31))
    calls.clear()
    assert [e["step"] for e in remote.poll() if e["kind"] == "step"] == list(range(26, 31))
    assert ("loss", 26, 30) in calls and all(a == 26 for _, a, _ in calls)
    run.client.set_terminated(run.run_id, "FINISHED")
    assert [(e["kind"], e.get("status")) for e in remote.poll()] == [("end", "finished")]


def test_window_follows_a_run_on_the_server_live(qtbot, project, settings, mlflow_server):
    run = ServerRunLog(mlflow_server.uri, "remote-live")
    run.log(range(1, 31), evals=[(24, 0.4)])
    settings.setValue("remote/uri", mlflow_server.uri)
    win = MainWindow(project, settings=settings, retry_s=3600, remote=RemoteTail(interval_ms=300))
    qtbot.addWidget(win)

    # The toolbar lists the server's active runs; picking ours follows it.
    qtbot.waitUntil(lambda: run.run_id in [win.server_runs.itemData(i) for i in range(win.server_runs.count())],
                    timeout=20_000)
    idx = [win.server_runs.itemData(i) for i in range(win.server_runs.count())].index(run.run_id)
    assert "remote-live-run" in win.server_runs.itemText(idx)
    win.server_runs.setCurrentIndex(idx)
    win._server_run_picked(idx)
    qtbot.waitUntil(lambda: win.monitor.data.last_step == 30, timeout=20_000)
    d = win.monitor.data
    np.testing.assert_array_equal(d.curves["loss"].x, np.arange(1, 31))
    np.testing.assert_allclose(d.curves["loss"].y, 1.0 / np.arange(1, 31))
    assert d.total_steps == WARMUP + XBM and d.phase == "xbm"
    assert [p for _, p in d.phases] == ["warmup", "memory_init", "xbm"]
    assert d.evals["val/recall@1"].y.tolist() == [0.4]
    assert "server" in win.server_status.text() and "active run" in win.server_status.text()
    assert win.server_runs.currentData() == run.run_id and not win.follow_action.isChecked()
    assert win.monitor.source_label.text().endswith(f"remote-live-run ({run.run_id[:8]})")

    # It goes on: new points are added (not a reload), the plots redraw, the ETA is the run's own.
    run.log(range(31, 46))
    qtbot.waitUntil(lambda: win.monitor.data.last_step == 45, timeout=20_000)
    assert win.monitor.data is d and d.curves["loss"].n == 45
    win.monitor.redraw()
    x, y = win.monitor.loss.curves["loss"].getData()
    assert len(x) == 45
    assert win.monitor.progress_label.text() == f"step 45 / {WARMUP + XBM}"
    run.client.set_terminated(run.run_id, "FINISHED")
    qtbot.waitUntil(lambda: d.status == "finished", timeout=20_000)

    assert win._tracking()[0] == mlflow_server.uri  # the Runs tab reads the same server
    win.follow_action.setChecked(True)  # back to the local runs: the server's points no longer reach the plots
    assert win._source == "local" and win.server_runs.currentData() is None
    win.close()


def test_a_server_down_or_slow_is_said_and_retried_while_the_window_responds(qtbot, project, settings,
                                                                             mlflow_server):
    port = int(mlflow_server.uri.rsplit(":", 1)[1])
    gate = servers.Gate(port)
    uri = f"http://127.0.0.1:{gate.port}"
    settings.setValue("remote/uri", uri)
    win = MainWindow(project, settings=settings, retry_s=3600,
                     remote=RemoteTail(interval_ms=300, timeout=(1.0, 1.0)))
    qtbot.addWidget(win)
    try:
        qtbot.waitUntil(lambda: "does not answer" in win.server_status.text(), timeout=10_000)
        assert "retrying" in win.server_status.text()

        gate.set("slow")  # accepts, never answers: the read timeout says so
        ticks = []
        tick = QTimer(win)
        tick.timeout.connect(lambda: ticks.append(1))
        tick.start(20)
        qtbot.waitUntil(lambda: "is slow" in win.server_status.text(), timeout=10_000)
        assert len(ticks) > 10  # the GUI thread kept running its timers while the poller waited

        gate.set("up")  # the server is back: the next poll says so
        qtbot.waitUntil(lambda: "active run" in win.server_status.text(), timeout=10_000)
        assert not win.server_status.text().startswith("⚠")
        tick.stop()
    finally:
        win.close()
        gate.close()


def test_runs_tab_lists_the_servers_runs_and_says_when_it_is_down(qtbot, mlflow_server):
    run = ServerRunLog(mlflow_server.uri, "remote-runs")
    run.log(range(1, 6))
    panel = RunsPanel(lambda: (mlflow_server.uri, "remote-runs"), retry_s=3600)
    qtbot.addWidget(panel)
    panel.refresh()
    qtbot.waitUntil(lambda: panel.tree.topLevelItemCount() == 1, timeout=20_000)
    assert panel.tree.topLevelItem(0).text(0) == "remote-runs-run"
    panel.shutdown()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    down = RunsPanel(lambda: (dead, "xbm"), retry_s=3600)
    qtbot.addWidget(down)
    down.refresh()  # said within seconds, not after MLflow's minutes of retries
    qtbot.waitUntil(lambda: "does not answer" in down.state_label.text(), timeout=10_000)
    assert "Retrying every" in down.state_label.text()
    down.shutdown()
