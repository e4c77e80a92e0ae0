"""A train_xbm stage killed (SIGKILL) and stopped (SIGTERM) mid-phase, then run again, ends where an uninterrupted
run ends, and its MLflow run holds one continuous curve."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import mlflow
import pytest
import torch

from gui.series import EventBatch, RunData
from pipeline import stages
from pipeline.tracking import run_key, tracking_uri
from tiny_project import stage_env, write_params
from xbmcore.backbones import resolve_input
from xbmcore.checkpoint import list_checkpoints, load_checkpoint
from xbmcore.config import load_params
from xbmcore.events import read_events

pytestmark = pytest.mark.slow
torch.set_num_threads(1)

# Long enough that the phase is still running when its first checkpoints appear.
LONG = {"train": {"xbm_steps": 300, "checkpoint_every": 40, "eval_every": 100}}


def start_stage(root, stage):
    return subprocess.Popen([sys.executable, "-m", f"pipeline.{stage}"], cwd=root, env=stage_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_checkpoint(proc, folder, after_step, timeout=300):
    """Newest checkpoint step once one later than `after_step` exists; fails if the stage ended first."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        steps = [s for s, _ in list_checkpoints(folder)]
        if steps and steps[-1] > after_step:
            return steps[-1]
        assert proc.poll() is None, f"the stage ended before a checkpoint after {after_step}:\n{proc.stdout.read()}"
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """Project root after download, warm-up and memory init (in-process)."""
    for var in ("MLFLOW_TRACKING_URI", "XBM_MLFLOW_RUN_ID", "XBM_MLFLOW_PARENT_RUN_ID"):
        os.environ.pop(var, None)
    root = tmp_path_factory.mktemp("warm")
    # As the stages' entry points see them: the `auto` data keys resolved (pipeline.cli), so run_key(p) is theirs.
    p = resolve_input(load_params(write_params(root, **LONG)), root)
    stages.run_download(p, root)
    stages.run_warmup(p, root)
    stages.run_memory_init(p, root)
    return root, p


def clone(src, dst):
    """A second project at the same point, with its own MLflow database and event files."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts", "runs"))
    return dst


def stop_after_checkpoint(folder, after_step):
    """In this process: SIGTERM to ourselves once a checkpoint later than `after_step` exists (the trainer's
    handler runs in the main thread, which is training)."""
    def watch():
        while not list_checkpoints(folder) or list_checkpoints(folder)[-1][0] <= after_step:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True).start()


def test_killed_and_stopped_runs_resume_to_the_uninterrupted_result(warm, tmp_path, capsys, monkeypatch):
    src, p = warm
    W, X = p.train.warmup_steps, p.train.xbm_steps
    ref = clone(src, tmp_path / "ref")
    cut = clone(src, tmp_path / "cut")
    folder = cut / "artifacts/train_xbm/checkpoints"

    # 1. SIGKILL (a separate process) once a checkpoint of the XBM phase exists: no chance to clean up.
    proc = start_stage(cut, "train_xbm")
    killed_after = wait_for_checkpoint(proc, folder, W)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # 2. Again (the stage's entry point, in this process), and SIGTERM after a later checkpoint: a clean stop
    #    after the step, with a checkpoint, exit status 128 + 15.
    monkeypatch.chdir(cut)
    stop_after_checkpoint(folder, killed_after)
    assert stages.main("train_xbm", ["--params", str(cut / "params.yaml")]) == 128 + signal.SIGTERM
    stopped = [e for e in read_events(cut / "runs" / run_key(p) / "events.jsonl") if e["kind"] == "end"][-1]
    assert stopped["status"] == "stopped" and "SIGTERM" in stopped["message"]
    assert list_checkpoints(folder)[-1][0] == stopped["step"] < W + X
    resumed = [e for e in read_events(cut / "runs" / run_key(p) / "events.jsonl") if e["kind"] == "phase"]
    assert resumed[-1]["resumed"] is True and resumed[-1]["step"] == killed_after
    # 3. To the end. The run ends FINISHED with the training: DVC may skip the evaluate stage (same model bytes).
    assert stages.main("train_xbm", ["--params", str(cut / "params.yaml")]) == 0
    client = mlflow.MlflowClient(tracking_uri(p, cut))
    assert [r.info.status for r in client.search_runs(
        [client.get_experiment_by_name(p.tracking.experiment).experiment_id])] == ["FINISHED"]
    # The monitor draws the killed, stopped and resumed phase as one forward curve, each step once.
    monitor = RunData()
    monitor.add(EventBatch.from_events(read_events(cut / "runs" / run_key(p) / "events.jsonl")))
    assert monitor.curves["loss"].x.tolist() == list(range(W + 1, W + X + 1))  # this copy's file: XBM phase
    assert monitor.evals["val/recall@1"].x.tolist() == [
        s for s in range(p.train.eval_every, W + X + 1, p.train.eval_every) if s > W]
    # The uninterrupted run, same setup.
    assert stages.main("train_xbm", ["--params", str(ref / "params.yaml")]) == 0

    # Exact resume on the CPU: same weights, hence the same Recall@1 (not merely within noise).
    a = load_checkpoint(ref / "artifacts/train_xbm/model.pt")
    b = load_checkpoint(cut / "artifacts/train_xbm/model.pt")
    assert a["step"] == b["step"] == W + X
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    r_ref = stages.run_evaluate(p, ref, log_model=False)
    r_cut = stages.run_evaluate(p, cut, log_model=False)
    assert r_cut["recall@1"] == r_ref["recall@1"]
    assert (ref / "plots/train.csv").read_text() == (cut / "plots/train.csv").read_text()

    # One MLflow run with one point per step, no duplicates, none missing, across the kill and the stop.
    client = mlflow.MlflowClient(tracking_uri(p, cut))
    exp = client.get_experiment_by_name(p.tracking.experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    rid = runs[0].info.run_id
    for key in ("loss", "memory_fill", "lr"):
        steps = sorted(m.step for m in client.get_metric_history(rid, key))
        assert steps == list(range(1, W + X + 1)), key
    evals = sorted(m.step for m in client.get_metric_history(rid, "val/recall_at_1"))
    assert evals == list(range(p.train.eval_every, W + X + 1, p.train.eval_every))
