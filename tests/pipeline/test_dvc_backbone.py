"""`dvc exp run -S model.backbone=timm:<a small ViT> -S model.pretrained=<a local file>` on the embedded set, in a
temporary copy of the project: timm's test_vit (0.3 M parameters) at the tiny project's 16 px, a few steps."""
from __future__ import annotations

import json

import pytest

from test_dvc_pipeline import dvc, git, project

pytestmark = pytest.mark.slow
timm = pytest.importorskip("timm")


@pytest.mark.timeout(600)
def test_dvc_exp_run_with_a_timm_vit_from_a_local_safetensors_file(tmp_path, monkeypatch):
    import torch

    # The project's own store, whatever an earlier test in this process pointed MLflow at.
    for var in ("MLFLOW_TRACKING_URI", "XBM_MLFLOW_RUN_ID", "XBM_MLFLOW_PARENT_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    from safetensors.torch import save_file

    root = project(tmp_path)
    torch.manual_seed(0)
    (root / "weights").mkdir()
    save_file(timm.create_model("test_vit", img_size=16, num_classes=10).state_dict(),
              str(root / "weights" / "vit.safetensors"))
    git(root, "add", "-A")
    git(root, "commit", "-qm", "weights")
    out = dvc(root, "exp", "run", "-S", "model.backbone=timm:test_vit", "-S", "model.pretrained=weights/vit.safetensors",
              "-S", "model.input_size=16", "-S", "train.backbone_lr_scale=0.1",
              "-S", "train.freeze_backbone_warmup=true")
    for stage in ("warmup", "memory_init", "train_xbm", "evaluate"):
        assert f"Running stage '{stage}'" in out.stdout
    metrics = json.loads((root / "metrics.json").read_text())
    assert set(metrics["test"]) >= {"recall@1", "map@r", "r_precision", "nmi"}
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("xbm").experiment_id])[0]
    assert run.data.params["model.backbone"] == "timm:test_vit" and run.data.tags.get("xbm.model_uri")
    # The logged model embeds an image through pipeline.embed.
    from pipeline import embed

    assert embed.main(["--model", run.data.tags["xbm.model_uri"], "--images", str(root / "data/prepared/synthetic"),
                       "--split", "test", "--params", str(root / "params.yaml"), "--out", str(tmp_path / "emb"),
                       "--workers", "0"]) == 0
