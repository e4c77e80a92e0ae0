"""A tiny configuration of the pipeline for tests: 24 synthetic classes of 16 px images (and 8 to pretrain on), a
few steps per phase."""
from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]

TINY = {
    "data": {"train_size": 16, "test_resize": 16, "test_size": 16, "train_crop_scale": [0.8, 1.0], "val_fraction": 0.2,
             "synthetic": {"num_classes": 24, "images_per_class_min": 4, "images_per_class_max": 6,
                           "classes_per_superclass": 4, "image_size": 16, "pretrain_classes": 8}},
    # From scratch: a test that wants the pretrained start runs the pretrain stage and sets model.pretrained.
    "model": {"embedding_dim": 16, "pretrained": "none"},
    "pretrain": {"steps": 6, "batch_size": 8, "num_threads": 1},
    "train": {"batch_size": 8, "images_per_class": 2, "warmup_steps": 6, "xbm_steps": 8, "checkpoint_every": 4,
              "eval_every": 4, "num_threads": 1, "lr": 0.003, "warmup_lr": 0.003,
              "lr_schedule": "cosine", "drift_probe": 8, "drift_every": 2, "drift_dts": [2, 4]},
    "eval": {"recall_at": [1, 2], "batch_size": 64},
}


def tiny_params(**sections) -> dict:
    """The committed params.yaml with the tiny values (and `sections`) merged in."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())

    def merge(dst: dict, src: dict) -> None:
        for k, v in src.items():
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                merge(dst[k], v)
            else:
                dst[k] = copy.deepcopy(v)

    merge(raw, TINY)
    merge(raw, sections)
    return raw


def write_params(root: Path, **sections) -> Path:
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_params(**sections), sort_keys=False))
    return path


def stage_env() -> dict:
    """Environment for stage subprocesses: this interpreter first on PATH, one thread, no inherited tracking."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env["GLOO_SOCKET_IFNAME"] = "lo"  # torchrun's gloo ranks talk over the loopback only
    for var in ("MLFLOW_TRACKING_URI", "XBM_MLFLOW_RUN_ID", "XBM_MLFLOW_PARENT_RUN_ID"):
        env.pop(var, None)
    return env


def run_stage(root: Path, stage: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"pipeline.{stage}"], cwd=root, env=stage_env(),
                          capture_output=True, text=True, **kwargs)


def copy_project(dst: Path) -> None:
    """The files `dvc repro` needs: code, dvc.yaml, .dvcignore (params.yaml is written by the test)."""
    for name in ("xbmcore", "pipeline"):
        shutil.copytree(REPO / name, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("dvc.yaml",):
        shutil.copy2(REPO / name, dst / name)


def run_pipeline_in_process(root: Path):
    """The five stages in this process on the tiny configuration, tracking to root's own store: (params, metrics)."""
    from pipeline import stages
    from xbmcore.config import validate_params

    for var in ("MLFLOW_TRACKING_URI", "XBM_MLFLOW_RUN_ID", "XBM_MLFLOW_PARENT_RUN_ID"):
        os.environ.pop(var, None)
    p = validate_params(tiny_params())
    stages.run_download(p, root)
    stages.run_pretrain(p, root)
    stages.run_warmup(p, root)
    stages.run_memory_init(p, root)
    stages.run_train_xbm(p, root)
    return p, stages.run_evaluate(p, root)


def recomputed_test_metrics(params, root: Path) -> tuple[dict[str, float], dict[str, float]]:
    """Recall@K (eval.recall_at) and MAP@R of the trained model on the test split, recomputed apart from the
    evaluate stage: the saved weights loaded into a fresh model, the test images embedded, and the ranking done
    by brute force in float64 (tests/reference64.py). Returns (metrics, tolerance per metric: the share of
    queries a float32 rounding could flip). A stage that wrote made-up metrics, or a broken retrieval_metrics,
    disagrees with it."""
    from reference64 import metrics_float64
    from xbmcore.checkpoint import load_checkpoint
    from xbmcore.data import open_splits
    from xbmcore.evaluate import compute_embeddings, eval_sets
    from xbmcore.models import build_model

    model = build_model(params.model, load_weights=False)
    model.load_state_dict(load_checkpoint(root / "artifacts" / "train_xbm" / "model.pt")["model"])
    splits = open_splits(root / params.data.prepared / params.data.name, params.data)
    queries, gallery = eval_sets(splits, "test")
    assert gallery is None, "the tiny projects search the test split in itself"
    emb, labels = compute_embeddings(model, queries, batch_size=64)
    ref, ties, unsure = metrics_float64(emb, labels, params.eval.recall_at)
    tol = {name: n / len(emb) for name, n in ties.items()}
    tol["map@r"] = unsure
    return ref, tol


def assert_test_metrics(params, root: Path, metrics: dict[str, float]) -> None:
    """The evaluate stage's test metrics equal the recomputation (recomputed_test_metrics), up to the queries with
    a near tie (float32 there, float64 here). params None: the root's params.yaml."""
    import pytest

    from xbmcore.config import validate_params

    if params is None:
        params = validate_params(yaml.safe_load((root / "params.yaml").read_text()))
    ref, tol = recomputed_test_metrics(params, root)
    for name, want in ref.items():
        assert metrics[name] == pytest.approx(want, abs=tol[name] + 1e-9), (name, metrics, ref, tol)
