"""A team's setup for real: PostgreSQL on 127.0.0.1, `mlflow server` on it, `dvc repro` logging there, and two
`python -m pipeline.tune` workers sharing one postgresql:// study (one of them SIGKILLed).

The servers are session fixtures (tests/conftest.py): one PostgreSQL and one MLflow server for all tests.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from pipeline.study import Worker, resolve_storage
from pipeline.study.storage import StorageError
from pipeline.study.workers import WORKER_ATTR
import servers
from tiny_project import assert_test_metrics, copy_project, stage_env, tiny_params, write_params
from xbmcore.config import validate_params

pytestmark = pytest.mark.slow
GITIGNORE = "/data/\n/artifacts/\n/runs/\n/mlartifacts/\nmlflow.db\n__pycache__/\n"


def run(cmd, root, env, check=True, timeout=600) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr[-4000:]}")
    return out


def server_env(uri: str) -> dict:
    env = stage_env()
    env["MLFLOW_TRACKING_URI"] = uri
    return env


def test_dvc_repro_logs_to_a_tracking_server_on_postgres(tmp_path, mlflow_server):
    root = tmp_path
    copy_project(root)
    write_params(root, tracking={"experiment": "team-repro"})
    (root / ".gitignore").write_text(GITIGNORE)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    for cmd in ([*git, "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"], [*git, "add", "-A"],
                [*git, "commit", "-qm", "project"]):
        run(cmd, root, stage_env())
    run([sys.executable, "-m", "dvc", "repro"], root, server_env(mlflow_server.uri))
    assert not (root / "mlflow.db").exists()  # nothing went to a local store

    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("team-repro")
    (r,) = client.search_runs([exp.experiment_id])
    assert r.info.status == "FINISHED"
    p = tiny_params()["train"]
    assert r.data.params["train.xbm_steps"] == str(p["xbm_steps"])
    loss = client.get_metric_history(r.info.run_id, "loss")
    assert sorted(m.step for m in loss) == list(range(1, p["warmup_steps"] + p["xbm_steps"] + 1))
    test = json.loads((root / "metrics.json").read_text())["test"]
    assert_test_metrics(None, root, test)
    assert r.data.metrics["test/recall_at_1"] == pytest.approx(test["recall@1"])
    # The server keeps what it was sent in PostgreSQL, the artifacts in its own destination folder.
    assert any(mlflow_server.artifacts.rglob("MLmodel"))

    # The logged model loads back through the server and embeds like the local checkpoint.
    mlflow.set_tracking_uri(mlflow_server.uri)
    (logged,) = mlflow.search_logged_models(experiment_ids=[exp.experiment_id], output_format="list")
    assert logged.source_run_id == r.info.run_id
    served = mlflow.pyfunc.load_model(f"models:/{logged.model_id}").unwrap_python_model().embedder.model
    from pipeline.stages import load_model

    params = validate_params(yaml.safe_load((root / "params.yaml").read_text()), "params.yaml")
    local, _ = load_model(params, root)
    x = torch.randn(3, 3, params.data.test_size, params.data.test_size)
    with torch.no_grad():
        np.testing.assert_allclose(served(x).numpy(), local.eval()(x).numpy(), rtol=1e-5, atol=1e-6)


# ---- the shared study ----

def tune_params(root: Path, storage: str, **tune) -> Path:
    return write_params(root, train={"xbm_steps": 6, "eval_every": 3}, tracking={"experiment": "team-tune"},
                        tune={"storage": storage, "study_name": "team", "n_trials": 4, "heartbeat_s": 1.0,
                              "stale_after_s": 30.0, "keep_artifacts": "all", "pruner": "none", **tune})


def test_two_workers_share_a_postgres_study_and_survive_a_sigkill(tmp_path, postgres, mlflow_server):
    root = tmp_path
    copy_project(root)
    url = postgres.create_database("study_two_workers")
    tune_params(root, url)
    env = server_env(mlflow_server.uri)
    cmd = [sys.executable, "-m", "pipeline.tune"]
    logs = [open(root / f"worker{i}.log", "w+") for i in range(2)]
    workers = [subprocess.Popen(cmd, cwd=root, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
               for f in logs]
    storage = resolve_storage(url, root).open()
    try:
        # Kill worker 0 while a trial of its own runs (it has then claimed trials like any worker).
        deadline = time.monotonic() + 300
        victim = None
        while victim is None and time.monotonic() < deadline:
            assert workers[0].poll() is None, "worker 0 ended before it ran a trial"
            try:
                running = optuna.load_study(study_name="team", storage=storage).get_trials(
                    deepcopy=False, states=(TrialState.RUNNING,))
            except KeyError:  # no worker has created the study yet
                running = []
            for t in running:
                if (t.user_attrs.get(WORKER_ATTR) or {}).get("pid") == workers[0].pid:
                    victim = t.number
            time.sleep(0.2)  # the poll interval
        assert victim is not None, "worker 0 never ran a trial"
        workers[0].send_signal(signal.SIGKILL)
        workers[0].wait()
        assert workers[1].wait(timeout=400) == 0
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    out = [(f.seek(0), f.read())[1] for f in logs]

    trials = optuna.load_study(study_name="team", storage=storage).get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3]  # the budget, exactly: no surplus trial
    # The trial worker 0 was running when it died (the one seen, or the next if it had just moved on) failed;
    # every other trial completed.
    failed = [t.number for t in trials if t.state != TrialState.COMPLETE]
    assert len(failed) == 1 and failed[0] >= victim, [(t.number, t.state) for t in trials]
    victim = failed[0]
    assert trials[victim].state == TrialState.FAIL
    assert f"trial {victim} was left RUNNING by a dead worker" in out[1]
    # None done twice: each trial started in exactly one worker, and both workers ran trials.
    started = [{n for n in range(4) if f"trial {n}: " in text} for text in out]
    assert started[0] & started[1] == set() and started[0] | started[1] == set(range(4))
    assert victim in started[0] and started[1]
    pids = {t.number: t.user_attrs[WORKER_ATTR]["pid"] for t in trials}
    assert {n for n, pid in pids.items() if pid == workers[0].pid} == started[0]
    assert (root / "artifacts" / "tune" / "team" / "summary.json").is_file()
    # The study URL's password is in none of what the workers wrote: MLflow params and tags, summary, events.
    client = MlflowClient(mlflow_server.uri)
    runs = client.search_runs([client.get_experiment_by_name("team-tune").experiment_id], max_results=100)
    assert len(runs) >= 5 and all(r.data.params.get("tune.storage", "").startswith("postgresql://xbm:***@")
                                  for r in runs if r.data.tags.get("xbm.role") in ("study", "trial"))
    written = [str(r.data.params) + str(r.data.tags) for r in runs]
    written += [p.read_text() for p in root.rglob("*") if p.suffix in (".json", ".jsonl", ".yaml", ".log")
                and p.name != "params.yaml"]
    assert servers.PG_PASSWORD not in "".join(written)


def test_redact_hides_only_the_password():
    from pipeline.tracking import redact

    assert redact("postgresql://xbm:s3cr:et@db:5432/optuna") == "postgresql://xbm:***@db:5432/optuna"
    assert redact("postgresql+psycopg://u:p@h/d?sslmode=require") == "postgresql+psycopg://u:***@h/d?sslmode=require"
    for kept in ("postgresql://xbm@db/optuna", "sqlite:////a/b.db", "http://127.0.0.1:5000", "artifacts/x.journal"):
        assert redact(kept) == kept


def fake_objective(params, trial_dir, report):
    return 1.0 - abs(params.memory.ratio - 0.3)


def test_wrong_password_is_refused_before_any_trial(tmp_path, postgres):
    url = postgres.create_database("study_password")
    bad = postgres.url("study_password", password="not-the-password")
    params = validate_params(tiny_params(tune={"storage": bad, "n_trials": 1}), "params")
    calls = []
    with pytest.raises(StorageError) as err:
        Worker(params, tmp_path, resolve_storage(bad, tmp_path), lambda *a: calls.append(a) or 0.0)
    msg = str(err.value)
    assert msg.startswith("tune.storage: cannot connect to postgresql://xbm:***@127.0.0.1:")
    assert 'password authentication failed for user "xbm"' in msg and "not-the-password" not in msg
    assert calls == [] and optuna.get_all_study_names(url) == []

    # The command line says it in one line and exits 2.
    write_params(tmp_path, tune={"storage": bad})
    out = run([sys.executable, "-m", "pipeline.tune"], tmp_path, stage_env(), check=False, timeout=300)
    assert out.returncode == 2, out.stderr
    assert "password authentication failed" in out.stderr and "Traceback" not in out.stderr
    assert "trial 0" not in out.stdout


def test_a_study_name_reused_with_another_space_is_refused(tmp_path, postgres):
    url = postgres.create_database("study_space")
    first = validate_params(tiny_params(tune={"storage": url, "n_trials": 2}), "params")
    w = Worker(first, tmp_path, resolve_storage(url, tmp_path), fake_objective)
    assert w.run() == 2
    other = validate_params(tiny_params(loss={"name": "multi_similarity"},
                                        tune={"storage": url, "n_trials": 3,
                                              "space": {"memory_ratio": [0.1, 0.5], "lr": None}}), "params")
    with pytest.raises(ValueError) as err:
        Worker(other, tmp_path, resolve_storage(url, tmp_path), fake_objective)
    msg = str(err.value)
    assert "study 'xbm'" in msg and "another search space" in msg
    assert "memory.ratio: [0.01, 1] log -> [0.1, 0.5] log" in msg
    assert "train.lr: [1e-05, 0.0003] log -> not searched" in msg
    assert "loss.margin: [0.3, 0.7] -> not searched" in msg and "loss.ms_alpha: not searched -> [1, 4]" in msg
    assert len(optuna.load_study(study_name="xbm", storage=url).trials) == 2  # nothing added
    # The same space again (a bigger budget) resumes the study.
    again = validate_params(tiny_params(tune={"storage": url, "n_trials": 3}), "params")
    assert Worker(again, tmp_path, resolve_storage(url, tmp_path), fake_objective).run() == 1


# ---- a tracking server that does not answer ----

def test_training_goes_on_when_the_tracking_server_does_not_answer(tmp_path, monkeypatch, caplog):
    from pipeline.stages import run_download, run_warmup

    dead = f"http://127.0.0.1:{servers.free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    params = validate_params(tiny_params(), "params")
    run_download(params, tmp_path)
    run_warmup(params, tmp_path)
    # Said in the log (once per stage, after the probe's seconds, not MLflow's minutes of retries), and the event
    # file has every step.
    said = [r.getMessage() for r in caplog.records if "cannot attach" in r.getMessage()]
    assert len(said) == 2 and all(m.startswith(f"MLflow: cannot attach to {dead}") and "only" in m for m in said)
    events = [json.loads(line) for line in next((tmp_path / "runs").glob("*/events.jsonl")).read_text().splitlines()]
    steps = [e["step"] for e in events if e["kind"] == "step"]
    assert steps == list(range(1, params.train.warmup_steps + 1))


def test_points_logged_during_an_outage_reach_the_server_when_it_is_back(mlflow_server):
    """The sink's call in flight rides MLflow's own HTTP retries (a refused connection is retried after 0, 4,
    8, 16 ... s), so the points of an outage reach the server when it is back, none dropped."""
    from pipeline.tracking import MLflowSink
    from xbmcore.events import make_event

    port = int(mlflow_server.uri.rsplit(":", 1)[1])
    gate = servers.Gate(port)
    gate.set("up")
    client = MlflowClient(f"http://127.0.0.1:{gate.port}")
    exp = client.create_experiment("outage")
    rid = client.create_run(exp).info.run_id
    sink = MLflowSink(client, rid, flush_s=0.1)
    try:
        for step in range(1, 11):
            sink.emit(make_event("eval", step, split="val", metrics={"recall@1": step / 100}))
        direct = MlflowClient(mlflow_server.uri)
        wait(lambda: len(direct.get_metric_history(rid, "val/recall_at_1")) == 10, 30)
        gate.set("down")
        for step in range(11, 21):
            sink.emit(make_event("eval", step, split="val", metrics={"recall@1": step / 100}))
        # The sink's thread has taken the outage's points from its queue: their call is in flight, riding the
        # retries. None of them reached the server, none was dropped.
        wait(lambda: sink.queued == 0, 30)
        assert len(direct.get_metric_history(rid, "val/recall_at_1")) == 10
        assert sink.dropped == 0
        gate.set("up")
        wait(lambda: len(direct.get_metric_history(rid, "val/recall_at_1")) == 20, 120)
        got = sorted((m.step, m.value) for m in direct.get_metric_history(rid, "val/recall_at_1"))
        assert got == [(s, s / 100) for s in range(1, 21)]
        assert sink.dropped == 0 and sink.sent == 20
    finally:
        sink.close()
        gate.close()


def wait(cond, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)  # the poll interval
