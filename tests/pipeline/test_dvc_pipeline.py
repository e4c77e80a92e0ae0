"""The whole pipeline through DVC, on the tiny configuration, in a temporary copy of the project."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tiny_project import assert_test_metrics, copy_project, stage_env, write_params
from xbmcore import portable
from xbmcore.events import read_events

pytestmark = pytest.mark.slow

GITIGNORE = "/data/\n/artifacts/\n/runs/\n/mlartifacts/\nmlflow.db\n__pycache__/\n/dvc_plots/\n"


def dvc(root, *args, check=True) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=stage_env(), capture_output=True,
                         text=True, timeout=600)
    if check and out.returncode:
        raise AssertionError(f"dvc {' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


def git(root, *args) -> None:
    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args], cwd=root,
                   check=True, capture_output=True)


def project(root, **sections):
    """A git + DVC project with the tiny params (and `sections`), committed."""
    copy_project(root)
    write_params(root, **sections)
    (root / ".gitignore").write_text(GITIGNORE)
    git(root, "init", "-q")
    dvc(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "project")
    return root


def test_dvc_repro_metrics_plots_and_exp_run(tmp_path):
    root = project(tmp_path, model={"pretrained": "artifacts/pretrain/model.pt"})  # the committed chain

    out = dvc(root, "repro")
    for stage in ("download", "pretrain", "warmup", "memory_init", "train_xbm", "evaluate"):
        assert f"Running stage '{stage}'" in out.stdout
    metrics = json.loads(dvc(root, "metrics", "show", "--json").stdout)
    test = next(iter(metrics.values()))["data"]["metrics.json"]["data"]["test"]  # the workspace
    assert_test_metrics(None, root, test)
    plots = json.loads(dvc(root, "plots", "show", "--json").stdout)["data"]
    assert set(plots) == {"loss", "memory_fill", "drift", "drift_probe", "recall_at_1", "plots/retrieval.png"}
    assert [p["type"] for p in plots["plots/retrieval.png"]] == ["image"]
    # The probe's D(t; dt) from step 0 through both training stages (its snapshots travel in the warm-up state).
    rows = (root / "plots" / "drift.csv").read_text().splitlines()
    assert rows[0] == "step,D_2,D_4" and [r.split(",")[0] for r in rows[1:]] == [str(s) for s in range(0, 15, 2)]
    assert all(r.split(",")[2] for r in rows[3:])  # D(t; 4) from step 4 on
    # One execution, one MLflow run, ended: no stage leaves it RUNNING.
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("xbm").experiment_id])
    assert [(r.info.status, r.data.tags["xbm.execution"]) for r in runs] == [("FINISHED", "done")]
    # Every stage that trains or embeds ran in portable mode, its kernels at AVX2, in its own process.
    starts = {e["stage"]: e["numerics"] for e in read_events(root / "runs" / runs[0].data.tags["xbm.run_key"]
                                                              / "events.jsonl") if e["kind"] == "start"}
    assert set(starts) == {"download", "pretrain", "warmup", "memory_init", "train_xbm", "evaluate"}
    if portable.unsupported() is None:
        for stage in ("pretrain", "warmup", "memory_init", "train_xbm", "evaluate"):
            n = starts[stage]
            assert n["portable"] and n["aten_capability"] == "AVX2" and not n["numpy_avx512"], (stage, n)
            assert n["env"] == portable.PORTABLE_ENV
        assert starts["evaluate"]["faiss_simd"] == "AVX2"

    # Nothing changed: nothing runs again.
    assert "Data and pipelines are up to date" in dvc(root, "repro").stdout

    git(root, "add", "-A")
    git(root, "commit", "-qm", "baseline run")
    out = dvc(root, "exp", "run", "-S", "memory.ratio=0.2", "-S", "loss.margin=0.4")
    assert "Stage 'download' didn't change, skipping" in out.stdout
    assert "Running stage 'train_xbm'" in out.stdout
    exps = json.loads(dvc(root, "exp", "show", "--json").stdout)
    rows = [e for e in exps if e["rev"] != "workspace"]
    runs = [x for e in rows for x in (e.get("experiments") or [])]
    assert len(runs) == 1
    data = runs[0]["revs"][0]["data"]
    assert data["params"]["params.yaml"]["data"]["memory"]["ratio"] == 0.2
    assert "recall@1" in data["metrics"]["metrics.json"]["data"]["test"]
    # The memory and the XBM phase's length are not the warm-up's business: changing them leaves it cached.
    write_params(root, model={"pretrained": "artifacts/pretrain/model.pt"}, memory={"ratio": 0.3},
                 loss={"margin": 0.4}, train={"xbm_steps": 10})
    changed = json.loads(dvc(root, "status", "--json").stdout)
    assert set(changed) == {"memory_init", "train_xbm"}  # evaluate follows once model.pt changes


@pytest.mark.timeout(900)
def test_check_repro_reproduces_the_committed_run_and_names_where_it_parts(tmp_path):
    root = project(tmp_path, model={"pretrained": "artifacts/pretrain/model.pt"})
    dvc(root, "repro")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "the committed run")

    def check(*args):
        return subprocess.run([sys.executable, "-m", "pipeline.check_repro", *args], cwd=root, env=stage_env(),
                              capture_output=True, text=True, timeout=600)

    # This machine reproduces the committed run byte for byte, stage by stage, in a fresh clone of the commit.
    same = check()
    assert same.returncode == 0, same.stdout + same.stderr
    lines = same.stdout.splitlines()
    assert lines[-1] == ("reproduced: every output of download, pretrain, warmup, memory_init, train_xbm, evaluate "
                         "is byte for byte the committed one")
    compared = [line.split()[:3] for line in lines if " same" in line or "DIFFERS" in line]
    assert [c[0] for c in compared[:8]] == ["download", "pretrain", "warmup", "warmup", "memory_init", "train_xbm",
                                            "train_xbm", "train_xbm"]
    assert {c[-1] for c in compared} == {"same"} and len(compared) >= 15  # every out, then the tracked files

    # Another pretrained start (a changed commit): the bytes part at the pretrain stage, and the metrics differ.
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["pretrain"]["seed"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git(root, "commit", "-qam", "the pretrain seed changed, the lock not")
    other = check()
    assert other.returncode == 1, other.stdout + other.stderr
    assert "the bytes first part at the pretrain stage" in other.stdout
    assert "download     data/prepared/synthetic" in other.stdout and "DIFFERS" in other.stdout
    assert "test.recall@1: " in other.stdout or "test.map@r: " in other.stdout


def test_dvc_exp_run_with_two_processes_logs_one_mlflow_run(tmp_path):
    root = project(tmp_path)
    out = dvc(root, "exp", "run", "-S", "train.nproc=2")
    for stage in ("warmup", "memory_init", "train_xbm", "evaluate"):
        assert f"Running stage '{stage}'" in out.stdout
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("xbm").experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]  # rank 0 alone tracks
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.params["train.nproc"] == "2"
    total = 6 + 8  # tiny_project's warm-up and XBM steps
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == list(range(1, total + 1))
    assert "test/recall_at_1" in run.data.metrics
