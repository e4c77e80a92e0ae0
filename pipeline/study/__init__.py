"""Optuna studies over the XBM phase: storage, workers, MLflow structure, report (entry: pipeline.tune)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from xbmcore.config import Params
from pipeline.study.mlflow_runs import StudyTracker
from pipeline.study.report import EvaluateTest, finalize
from pipeline.study.runner import Objective, Worker
from pipeline.study.storage import resolve_storage


def run_study(params: Params, root: Path, objective: Objective, evaluate_test: EvaluateTest | None = None,
              tracking_uri: str | None = None) -> tuple[Worker, dict[str, Any] | None]:
    """Run one worker until the budget is spent, then write the report if no other worker is still busy.

    tracking_uri None: no MLflow (the stages' own tracking is unaffected).
    """
    storage = resolve_storage(params.tune.storage, root)
    tracker = StudyTracker(tracking_uri, params.tracking.experiment) if tracking_uri else None
    worker = Worker(params, root, storage, objective, tracker)
    worker.run()
    return worker, finalize(worker, evaluate_test)


__all__ = ["run_study", "Worker", "finalize", "resolve_storage", "StudyTracker"]
