"""The stage functions in-process on a tiny configuration: files, curves, metrics and the MLflow run."""
from __future__ import annotations

import csv
import io
import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline import stages
from pipeline.tracking import run_key, tracking_uri
from tiny_project import assert_test_metrics, run_pipeline_in_process, tiny_params
from xbmcore.checkpoint import load_checkpoint
from xbmcore.config import validate_params
from pipeline.embedding_store import Embedder
from xbmcore.events import read_events

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project root with the tiny dataset prepared and the full pipeline run once."""
    root = tmp_path_factory.mktemp("project")
    p, metrics = run_pipeline_in_process(root)
    return root, p, metrics


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_pipeline_files_and_metrics(project):
    root, p, metrics = project
    W, X = p.train.warmup_steps, p.train.xbm_steps
    assert set(metrics) == {"recall@1", "recall@2", "map@r", "r_precision", "nmi"}
    assert_test_metrics(p, root, metrics)
    assert json.loads((root / "metrics.json").read_text()) == {"test": metrics, "step": W + X}
    state = load_checkpoint(root / "artifacts/warmup/state.pt")
    assert state["step"] == W and state["phase"] == "warmup" and state["memory"] is None
    mem = load_checkpoint(root / "artifacts/memory_init/memory.pt")
    assert mem["enabled"] and mem["step"] == W and int(mem["memory"]["fill"]) > 0
    train = _csv(root / "plots/train.csv")
    assert [int(r["step"]) for r in train] == list(range(1, W + X + 1))
    assert {r["phase"] for r in train[:W]} == {"warmup"} and {r["phase"] for r in train[W:]} == {"xbm"}
    assert float(train[W]["memory_fill"]) == 1.0 and float(train[W]["loss_memory"]) > 0
    # Each phase its own lr: warm-up constant, then cosine from train.lr to 0 over the XBM phase.
    assert {float(r["lr"]) for r in train[:W]} == {p.train.warmup_lr}
    assert p.train.lr_schedule == "cosine" and float(train[W]["lr"]) == p.train.lr
    assert [float(r["lr"]) for r in train[W:]] == sorted((float(r["lr"]) for r in train[W:]), reverse=True)
    assert 0 < float(train[-1]["lr"]) < 0.05 * p.train.lr
    val = _csv(root / "plots/val.csv")
    assert [int(r["step"]) for r in val] == [4, 8, 12]
    events = read_events(root / "runs" / run_key(p) / "events.jsonl")
    phases = [e["phase"] for e in events if e["kind"] == "phase"]
    assert phases == ["warmup", "memory_init", "xbm", "evaluate"]
    assert events[-1]["kind"] == "end" and events[-1]["status"] == "finished"
    assert (root / "runs" / "LATEST").read_text().strip() == run_key(p)


def test_one_finished_mlflow_run_with_continuous_curves_and_the_model(project):
    root, p, metrics = project
    client = mlflow.MlflowClient(tracking_uri(p, root))
    exp = client.get_experiment_by_name(p.tracking.experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["xbm.run_key"] == run_key(p)
    assert run.data.params["train.batch_size"] == "8" and run.data.params["memory.mode"] == "queue"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(steps) == list(range(1, 15))
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/recall_at_1")] == [4, 8, 12]
    assert run.data.metrics["test/recall_at_1"] == pytest.approx(metrics["recall@1"])
    assert run.data.metrics["test/map_at_r"] == pytest.approx(metrics["map@r"])
    # The memory view at the XBM phase's end (step 14): its metrics, and its PNG and JSON as artifacts.
    assert [m.step for m in client.get_metric_history(run.info.run_id, "memory_view/age_p50")] == [14]
    views = sorted(a.path for a in client.list_artifacts(run.info.run_id, "memory_view"))
    assert views == ["memory_view/step_0000014.json", "memory_view/step_0000014.png"]
    models = mlflow.search_logged_models(experiment_ids=[exp.experiment_id], output_format="list")
    assert [m.source_run_id for m in models] == [run.info.run_id]
    # The logged model embeds encoded images as the library does (pipeline/pyfunc_model.py).
    loaded = mlflow.pyfunc.load_model(f"models:/{models[0].model_id}")
    model, _ = stages.load_model(p, root)
    images = [np.random.default_rng(i).integers(0, 256, (20, 18, 3), dtype=np.uint8) for i in range(3)]
    pngs = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    want = Embedder(model, p.model.model_dump(), p.data.test_resize, p.data.test_size).embed_images(pngs)
    np.testing.assert_allclose(loaded.predict(pd.DataFrame({"image": pngs})), want, atol=1e-5)


def test_study_layout_baseline_from_the_shared_warmup(project):
    """A trial: its own artifacts folder, the shared warm-up, the baseline, another lr for the XBM phase."""
    root, _, _ = project
    p = validate_params(tiny_params(memory={"enabled": False}, train={"lr": 0.0005, "lr_schedule": "constant"},
                                    tracking={"experiment": "trials"}))
    trial = root / "trial"
    stages.run_memory_init(p, root, artifacts=trial)
    assert load_checkpoint(trial / "memory_init/memory.pt")["enabled"] is False
    seen = []
    stages.run_train_xbm(p, root, artifacts=trial, on_eval=lambda step, m: seen.append((step, m["recall@1"])))
    assert [s for s, _ in seen] == [8, 12]
    train = _csv(trial / "plots/train.csv")
    assert {r["phase"] for r in train[6:]} == {"baseline"}
    assert {float(r["memory_fill"]) for r in train[6:]} == {0.0}
    assert {float(r["lr"]) for r in train[:6]} == {0.003} and {float(r["lr"]) for r in train[6:]} == {0.0005}
    val = stages.run_evaluate(p, root, split="val", artifacts=trial)
    assert json.loads((trial / "metrics.json").read_text())["val"] == val
    assert not (root / "artifacts/train_xbm/checkpoints/step_00000100.pt").exists()


def test_memory_switch_must_match_memory_init(project):
    root, _, _ = project
    p = validate_params(tiny_params(memory={"enabled": False}))
    with pytest.raises(ValueError, match="memory.enabled is False, but memory_init ran with True"):
        stages.run_train_xbm(p, root)


def test_bad_params_stop_the_stage_with_the_key(tmp_path, capsys):
    bad = tmp_path / "params.yaml"
    bad.write_text("memory:\n  ratio: 1.5\n")
    assert stages.main("warmup", ["--params", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "memory.ratio" in err and "1.5" in err
