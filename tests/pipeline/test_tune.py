"""The Optuna study: budget, resume after a kill, several workers, failures, pruning, MLflow structure.

Most tests drive the study with a cheap fake objective (a known function of the sampled values that reports
like the trainer does); subprocess workers run the same fake objective from a script written into tmp_path.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from pipeline.study import Worker, resolve_storage, run_study
from pipeline.study.space import memory_on_step
from xbmcore.backbones import resolve_input
from xbmcore.config import validate_params

REPO = Path(__file__).resolve().parents[2]
WARMUP, EVAL_EVERY = 100, 10


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    # Creating MLflow's SQLite schema takes seconds; tests copy one made here.
    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture(autouse=True)
def mlflow_db(tmp_path, mlflow_template) -> Path:
    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    return tmp_path / "mlflow.db"


def tiny(tmp_path: Path, **tune) -> dict:
    return {"train": {"warmup_steps": WARMUP, "xbm_steps": 30, "eval_every": EVAL_EVERY},
            "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
            "tune": {"n_trials": 3, "prune_grace_steps": 0, "heartbeat_s": 1.0, "stale_after_s": 60.0, **tune}}


def value_of(params) -> float:
    # Known optimum at memory.ratio = 0.3; any function of the sampled values would do.
    return 1.0 - abs(params.memory.ratio - 0.3)


def fake_objective(params, trial_dir, report):
    on = memory_on_step(params)
    v = value_of(params)
    for i in range(1, 4):
        report(on + i * params.train.eval_every, v * i / 3)
    return v


def load(tmp_path: Path, name: str = "xbm") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=resolve_storage(None, tmp_path).open())


def mlflow_runs(tmp_path: Path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("xbm").experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("xbm.role") == "study"]
    children = {int(r.data.tags["xbm.trial"]): r for r in runs if r.data.tags.get("xbm.role") == "trial"}
    return client, parents, children


def test_storage_paths_are_absolute_and_journal_files_are_plain_paths(tmp_path):
    assert resolve_storage(None, tmp_path).url == f"sqlite:///{tmp_path / 'optuna.db'}"
    assert resolve_storage("sqlite:///sub/s.db", tmp_path).url == f"sqlite:///{tmp_path / 'sub/s.db'}"
    assert resolve_storage("sqlite:////abs/s.db", tmp_path).url == "sqlite:////abs/s.db"
    assert resolve_storage("postgresql://u@h/db", tmp_path).lock_path is None
    journal = resolve_storage("studies/x.journal", tmp_path)
    assert journal.url == str(tmp_path / "studies/x.journal")
    assert isinstance(journal.open(), optuna.storages.JournalStorage)
    assert resolve_storage("journal:studies/x.journal", tmp_path) == journal
    assert resolve_storage(f"journal://{tmp_path}/studies/x.journal", tmp_path) == journal  # journal:///abs
    with pytest.raises(ValueError, match="sqlite:///optuna.db"):
        resolve_storage("optuna.db", tmp_path)


def test_space_rejects_a_senseless_study(tmp_path):
    with pytest.raises(ValueError, match="memory.size"):
        Worker(validate_params({"memory": {"size": 100}}), tmp_path, resolve_storage(None, tmp_path),
               fake_objective)
    with pytest.raises(ValueError, match="tune.space.*low < high"):
        validate_params({"tune": {"space": {"margin": [0.6, 0.4]}}})


def test_multi_similarity_space_and_seeded_sampling(tmp_path):
    raw = tiny(tmp_path, n_trials=2, study_name="ms")
    raw["loss"] = {"name": "multi_similarity"}
    params = validate_params(raw)
    workers = [Worker(params, tmp_path / d, resolve_storage(None, tmp_path / d), fake_objective) for d in "ab"]
    for w in workers:
        assert w.run() == 2
    t1, t2 = (w.study.trials for w in workers)
    assert set(t1[0].params) == {"memory.ratio", "memory.weight", "train.lr",
                                 "loss.ms_alpha", "loss.ms_beta", "loss.ms_base"}
    assert [t.params for t in t1] == [t.params for t in t2]  # same seed: the same draws, trial by trial
    assert t1[0].params != t1[1].params


def test_failing_trial_is_failed_and_the_study_goes_on(tmp_path):
    calls = []

    def objective(params, trial_dir, report):
        calls.append(trial_dir.name)
        if len(calls) == 2:
            raise FloatingPointError("loss is nan at step 105")
        return fake_objective(params, trial_dir, report)

    params = validate_params(tiny(tmp_path, pruner="none"))
    worker, summary = run_study(params, tmp_path, objective, lambda p, d: {"recall@1": 0.25},
                                tracking_uri=params.tracking.uri)
    states = [t.state for t in load(tmp_path).trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    complete = [t for t in load(tmp_path).trials if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value)
    assert summary["best_trial"] == best.number and summary["best_value"] == pytest.approx(best.value)
    assert summary["trials"] == {"complete": 2, "pruned": 0, "failed": 1}
    assert summary["test"] == {"recall@1": 0.25}
    # keep_artifacts="best": only the best trial's folder is left
    assert sorted(p.name for p in (worker.out_dir / "trials").iterdir()) == [f"{best.number:04d}"]

    client, parents, children = mlflow_runs(tmp_path)
    failed = children[1]
    assert failed.info.status == "FAILED" and failed.data.tags["xbm.trial_state"] == "failed"
    assert "loss is nan" in failed.data.tags["xbm.error"]
    assert "FloatingPointError" in Path(client.download_artifacts(failed.info.run_id, "error.txt",
                                                                  str(tmp_path))).read_text()


def test_pruned_only_after_the_memory_is_on(tmp_path):
    # n_warmup_steps = memory switch-on (WARMUP) + grace 20: reports before step 120 are never judged.
    params = validate_params(tiny(tmp_path, n_trials=2, prune_startup_trials=1, prune_grace_steps=20))
    seen = []

    def objective(params, trial_dir, report):
        good = not seen
        seen.append(trial_dir.name)
        steps = (50, 110, 120, 130, 140)  # 50 and 110: before the grace period ends
        for s in steps:
            report(s, 0.9 if good else 0.1)
        return 0.9 if good else 0.1

    worker, _ = run_study(params, tmp_path, objective, tracking_uri=params.tracking.uri)
    good, bad = load(tmp_path).trials
    assert good.state == TrialState.COMPLETE
    assert bad.state == TrialState.PRUNED
    assert sorted(bad.intermediate_values) == [50, 110, 120]  # reported twice while worse, not pruned
    assert worker.study.pruner._n_warmup_steps == WARMUP + 20

    _, _, children = mlflow_runs(tmp_path)
    assert children[1].info.status == "KILLED" and children[1].data.tags["xbm.trial_state"] == "pruned"


def test_mlflow_parent_and_nested_trials(tmp_path):
    params = validate_params(tiny(tmp_path, n_trials=3, pruner="none"))
    worker, summary = run_study(params, tmp_path, fake_objective, tracking_uri=params.tracking.uri)
    client, parents, children = mlflow_runs(tmp_path)
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert sorted(children) == [0, 1, 2]
    study = load(tmp_path)
    for t in study.trials:
        run = children[t.number]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["xbm.trial_state"] == "complete" and run.info.status == "FINISHED"
        assert float(run.data.params["memory.ratio"]) == pytest.approx(t.params["memory.ratio"])
        assert run.data.params["train.xbm_steps"] == "30"
        assert run.data.metrics["tune/val_recall_at_1"] == pytest.approx(t.value)
        assert t.user_attrs["xbm.mlflow_run_id"] == run.info.run_id
    best = study.best_trial
    assert parent.data.metrics["tune/best_value"] == pytest.approx(best.value)
    assert parent.data.tags["xbm.best_trial"] == str(best.number)
    for k, v in best.params.items():
        assert float(parent.data.tags[f"best.{k}"]) == pytest.approx(v)
    history = client.get_metric_history(parent.info.run_id, "tune/val_recall_at_1")
    assert sorted(m.step for m in history) == [0, 1, 2]
    logged = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"best_params.yaml", "summary.json", "history.png", "parallel_coordinate.png",
            "importances.png", "importances.json"} <= logged

    best_file = yaml.safe_load((worker.out_dir / "best_params.yaml").read_text())
    assert best_file == best.params
    assert summary["command"].startswith("dvc exp run -S ")
    for k in best.params:
        assert f"-S {k}=" in summary["command"]
    for png in ("history.png", "parallel_coordinate.png", "importances.png"):
        assert (worker.out_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


WORKER_SCRIPT = """
import os, sys, time
sys.path.insert(0, {repo!r})
from pathlib import Path
from xbmcore.config import load_params
from pipeline.study import run_study
from pipeline.study.space import memory_on_step

params_file, step_s, wait_for, hold = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
root = Path(params_file).parent
started = root / "started"
started.mkdir(exist_ok=True)

def objective(params, trial_dir, report):
    (started / trial_dir.name).touch()
    deadline = time.time() + 60
    while len(list(started.iterdir())) < wait_for and time.time() < deadline:
        time.sleep(0.05)  # lets the test line workers up (both busy at once)
    while int(trial_dir.name) == hold and time.time() < deadline:
        time.sleep(0.05)  # held inside the objective until the test kills the worker
    v = 1.0 - abs(params.memory.ratio - 0.3)
    for i in range(1, 4):
        time.sleep(step_s)  # the trial's work
        report(memory_on_step(params) + i * params.train.eval_every, v)
    return v

params = load_params(params_file)
run_study(params, root, objective, tracking_uri=params.tracking.uri)
"""


def spawn(tmp_path: Path, raw: dict, step_s: float, wait_for: int = 0, hold: int = -1) -> subprocess.Popen:
    """A study worker whose trials take 3 x step_s; trial `hold`'s objective waits (up to 60 s) to be killed."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    script = tmp_path / "worker.py"
    script.write_text(WORKER_SCRIPT.format(repo=str(REPO)))
    return subprocess.Popen([sys.executable, str(script), str(tmp_path / "params.yaml"), str(step_s),
                             str(wait_for), str(hold)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_until(cond, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.time() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"worker exited early:\n{proc.stdout.read().decode()}")
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)  # the poll interval


def test_resume_after_kill(tmp_path):
    raw = tiny(tmp_path, n_trials=4, pruner="none")
    proc = spawn(tmp_path, raw, step_s=0.0, hold=2)
    # Trial 2's objective has begun (it touches the file first) and waits there: killed inside it.
    wait_until(lambda: (tmp_path / "started" / "0002").exists(), 90, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = load(tmp_path).trials
    assert [t.state for t in before] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.RUNNING]

    proc = spawn(tmp_path, raw, step_s=0.0)
    out = proc.communicate(timeout=90)[0].decode()
    assert proc.returncode == 0, out
    after = load(tmp_path).trials
    # completed kept as they were, the interrupted one failed, the budget of 4 counted across both runs
    assert [t.state for t in after] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL,
                                        TrialState.COMPLETE]
    assert [t.value for t in after[:2]] == [t.value for t in before[:2]]
    assert after[2].params == before[2].params
    assert after[0].user_attrs["xbm.worker"]["pid"] != after[3].user_attrs["xbm.worker"]["pid"]

    _, parents, children = mlflow_runs(tmp_path)
    assert len(parents) == 1 and sorted(children) == [0, 1, 2, 3]
    assert children[2].info.status == "FAILED" and children[2].data.tags["xbm.trial_state"] == "failed"
    assert all(children[n].info.status == "FINISHED" for n in (0, 1, 3))


def test_two_workers_share_one_journal_study(tmp_path):
    raw = tiny(tmp_path, n_trials=6, pruner="none", storage="study.journal")
    # Each worker's first trial waits until two trials have started, so both workers surely take part.
    procs = [spawn(tmp_path, raw, step_s=0.05, wait_for=2) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    study = optuna.load_study(study_name="xbm", storage=resolve_storage("study.journal", tmp_path).open())
    numbers = [t.number for t in study.trials]
    assert sorted(numbers) == list(range(6))  # none twice, exactly the budget
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    pids = {t.user_attrs["xbm.worker"]["pid"] for t in study.trials}
    assert len(pids) == 2
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 6  # workers draw distinct values

    _, parents, children = mlflow_runs(tmp_path)
    assert len(parents) == 1 and sorted(children) == list(range(6))
    assert sum("still running in other workers" in o for o in outs) <= 1


def test_real_stages_share_the_pipelines_warmup(tmp_path, monkeypatch):
    """`python -m pipeline.tune` in-process on the tiny synthetic project, after the pipeline's own warm-up."""
    import torch

    from pipeline import stages, tune
    from tiny_project import tiny_params

    torch.set_num_threads(1)
    for var in ("MLFLOW_TRACKING_URI", "XBM_MLFLOW_RUN_ID", "XBM_MLFLOW_PARENT_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    # A constant schedule: the logged lr is then exactly the phase's own (the warm-up's, then the trial's).
    raw = tiny_params(train={"lr_schedule": "constant"}, tune={"n_trials": 2, "pruner": "none"})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    base = resolve_input(validate_params(raw), tmp_path)  # as the entry points resolve it (pipeline.cli)
    stages.run_download(base, tmp_path)
    stages.run_warmup(base, tmp_path)  # what `dvc repro` leaves in artifacts/warmup

    assert tune.main(["--params", str(tmp_path / "params.yaml")]) == 0
    shared = next((tmp_path / "artifacts/tune/warmup").glob("*/warmup/state.pt"))
    assert shared.stat().st_ino == (tmp_path / "artifacts/warmup/state.pt").stat().st_ino  # reused, linked

    study = load(tmp_path)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    summary = yaml.safe_load((tmp_path / "artifacts/tune/xbm/summary.json").read_text())
    best = study.best_trial
    assert summary["best_trial"] == best.number and summary["split"] == "val"
    assert set(summary["test"]) == {"recall@1", "recall@2", "map@r", "r_precision", "nmi"}
    # the warm-up depends on the loss (not on the XBM phase's lr): its margin stayed at the params' value there
    assert summary["warmup_kept"] == {"loss.margin": base.loss.margin}

    client, parents, children = mlflow_runs(tmp_path)
    assert len(parents) == 1
    roles = [r.data.tags.get("xbm.role") for r in client.search_runs([parents[0].info.experiment_id])]
    assert "warmup" not in roles  # nothing was trained again
    W, X = base.train.warmup_steps, base.train.xbm_steps
    for t in study.trials:
        run_id = children[t.number].info.run_id
        lr = {m.step: m.value for m in client.get_metric_history(run_id, "lr")}
        assert sorted(lr) == list(range(1, W + X + 1))  # the warm-up's curve, then the trial's own
        assert all(lr[s] == pytest.approx(base.train.warmup_lr) for s in range(1, W + 1))
        assert all(lr[s] == pytest.approx(t.params["train.lr"]) for s in range(W + 1, W + X + 1))
        val = client.get_metric_history(run_id, "val/recall_at_1")
        assert [m.step for m in val if m.step > W] == [8, 12, 14]  # periodic evaluations, then the final one
        assert [m.value for m in val if m.step == 14] == [pytest.approx(t.value)]
    assert children[best.number].data.metrics["test/recall_at_1"] == pytest.approx(summary["test"]["recall@1"])
    assert parents[0].data.metrics["test/recall_at_1"] == pytest.approx(summary["test"]["recall@1"])


def _tracking_free(monkeypatch) -> None:
    import torch

    torch.set_num_threads(1)
    for var in ("MLFLOW_TRACKING_URI", "XBM_MLFLOW_RUN_ID", "XBM_MLFLOW_PARENT_RUN_ID"):
        monkeypatch.delenv(var, raising=False)


def test_study_makes_the_missing_pretrained_weights_like_the_pretrain_stage(tmp_path, monkeypatch, capsys):
    """A fresh clone: model.pretrained is the pretrain stage's out, which is missing; the study runs the stage."""
    from pipeline import stages, tune
    from tiny_project import tiny_params
    from xbmcore.checkpoint import training_digest

    _tracking_free(monkeypatch)
    raw = tiny_params(model={"pretrained": "artifacts/pretrain/model.pt"}, tune={"n_trials": 1, "pruner": "none"})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    base = resolve_input(validate_params(raw), tmp_path)  # as the entry points resolve it (pipeline.cli)
    made = tmp_path / "artifacts/pretrain/model.pt"
    assert not made.exists()

    assert tune.main(["--params", str(tmp_path / "params.yaml")]) == 0
    out = capsys.readouterr().out
    assert "model.pretrained: artifacts/pretrain/model.pt is missing; running the pretrain stage" in out
    assert made.is_file()
    # What the pretrain stage writes with the same params in another project: the same bytes.
    other = tmp_path / "other"
    stages.run_download(base, other)
    assert stages.run_pretrain(base, other).read_bytes() == made.read_bytes()

    # The shared warm-up started from these weights (its digest hashes them: the root's file, not the cwd's).
    digest = training_digest(stages.resolve_pretrained(base, tmp_path), "warmup")
    assert (tmp_path / "artifacts/tune/warmup" / digest / "warmup/state.pt").is_file()
    assert [t.state for t in load(tmp_path).trials] == [TrialState.COMPLETE]
    client, parents, _ = mlflow_runs(tmp_path)
    nested = {r.data.tags.get("xbm.role"): r for r in client.search_runs([parents[0].info.experiment_id])}
    assert nested["pretrain"].data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    assert nested["pretrain"].info.status == "FINISHED"
    assert "pretrain_loss" in nested["pretrain"].data.metrics

    # A second worker finds the weights: nothing is made again.
    raw["tune"]["n_trials"] = 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    before = made.stat().st_mtime_ns
    assert tune.main(["--params", str(tmp_path / "params.yaml")]) == 0
    assert "pretrain stage" not in capsys.readouterr().out
    assert made.stat().st_mtime_ns == before


def test_study_names_a_missing_pretrained_file_it_cannot_make(tmp_path, monkeypatch, capsys):
    from pipeline import tune
    from tiny_project import tiny_params

    _tracking_free(monkeypatch)
    raw = tiny_params(model={"pretrained": "weights/mine.pt"}, tune={"n_trials": 1})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))

    assert tune.main(["--params", str(tmp_path / "params.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"model.pretrained: {tmp_path / 'weights/mine.pt'} is not a file" in err
    assert not (tmp_path / "artifacts/pretrain").exists()  # only the pretrain stage's own out is made
    assert not (tmp_path / "optuna.db").exists() or not load(tmp_path).trials


def test_dvc_lock_params_compare_with_the_studys_params():
    """The pretrain out is checked out of the DVC cache only for the params dvc.lock recorded."""
    from pipeline.study.pretrained import same_params
    from xbmcore.config import load_params

    recorded = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"]["pretrain"]["params"]
    assert same_params(recorded, load_params(REPO / "params.yaml"))
    # The study runs with the `auto` data keys resolved (pipeline.cli), dvc.lock records `auto`.
    assert same_params(recorded, resolve_input(load_params(REPO / "params.yaml"), REPO), REPO)
    assert not same_params(recorded, load_params(REPO / "params.yaml", ["pretrain.steps=10"]))
    assert not same_params(recorded, load_params(REPO / "params.yaml", ["data.synthetic.seed=1"]))
    # a key the study's params do not touch (the warm-up's) leaves the pretrain out as it is
    assert same_params(recorded, load_params(REPO / "params.yaml", ["train.warmup_lr=0.01"]))
    assert not same_params({"other.yaml": {}}, load_params(REPO / "params.yaml"))


@pytest.mark.slow
def test_study_checks_the_pretrained_weights_out_of_the_dvc_cache(tmp_path, monkeypatch, capsys):
    """`dvc repro pretrain` cached the out; after it is deleted the study checks it out, and DVC sees no change."""
    import json

    from pipeline import tune
    from tiny_project import copy_project, stage_env, write_params

    _tracking_free(monkeypatch)

    def dvc(*args):
        done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=tmp_path, env=stage_env(),
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done.stdout

    copy_project(tmp_path)
    write_params(tmp_path, model={"pretrained": "artifacts/pretrain/model.pt"},
                 tune={"n_trials": 1, "pruner": "none"},
                 tracking={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    dvc("init", "--no-scm", "-q")
    dvc("repro", "pretrain")
    made = tmp_path / "artifacts/pretrain/model.pt"
    cached = made.read_bytes()
    made.unlink()

    assert tune.main(["--params", str(tmp_path / "params.yaml")]) == 0
    assert "artifacts/pretrain/model.pt was missing; checked out from the DVC cache" in capsys.readouterr().out
    assert made.read_bytes() == cached
    assert json.loads(dvc("status", "pretrain", "--json")) == {}

    # Neither the out nor the cache: the stage runs in the study, and its out goes to the cache as dvc.lock has
    # it, so that `dvc repro` does not run the stage again for an out "not in cache".
    made.unlink()
    shutil.rmtree(tmp_path / ".dvc/cache")
    lock = (tmp_path / "dvc.lock").read_bytes()
    assert tune.main(["--params", str(tmp_path / "params.yaml")]) == 0  # the budget is spent: no trial
    out = capsys.readouterr().out
    assert "running the pretrain stage" in out and "(and in the DVC cache, as dvc.lock records it)" in out
    assert made.read_bytes() == cached
    assert json.loads(dvc("status", "pretrain", "--json")) == {}
    assert (tmp_path / "dvc.lock").read_bytes() == lock
