"""Read-only access to the tracking store (MLflow) and the study storage (Optuna). No Qt here.

These run in a background thread (see worker.py). They never create a store: opening a missing SQLite file
through MLflow or Optuna would create an empty database (and run migrations) just because the window looked.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xbmcore.config import Params

# Params shown as columns of the runs table (MLflow params are the flat dotted keys of params.yaml).
KEY_PARAMS = ("data.name", "loss.name", "memory.enabled", "memory.ratio", "memory.mode", "train.batch_size",
              "train.lr", "train.xbm_steps")


def mlflow_metric(name: str) -> str:
    """MLflow refuses "@" in metric names; the pipeline logs val/recall@1 as val/recall_at_1."""
    from pipeline.tracking import metric_name

    return metric_name(name)


class StoreUnavailable(RuntimeError):
    """The store is missing or locked; the panels say so and retry."""


def tracking_uri(params: Params, root: Path) -> str:
    """The pipeline's own rule (env MLFLOW_TRACKING_URI, tracking.uri, the project's mlflow.db)."""
    from pipeline.tracking import tracking_uri as pipeline_tracking_uri

    return pipeline_tracking_uri(params, root)


def sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):].split("?", 1)[0]) if uri.startswith("sqlite:///") else None


def check_store(uri: str, what: str) -> None:
    """Raise StoreUnavailable for a missing database file or a tracking server that does not answer (asked with
    a short timeout: MLflow's client would retry for minutes before the panel could say so)."""
    from pipeline.tracking import probe

    path = sqlite_path(uri) if "://" in uri else Path(uri)  # no scheme: an Optuna journal file
    if path is not None and not path.exists():
        raise StoreUnavailable(f"no {what} at {path} yet")
    try:
        probe(uri)
    except OSError as err:
        raise StoreUnavailable(f"tracking server {uri} does not answer ({getattr(err, 'reason', err)})") from None


def describe_error(err: Exception) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, StoreUnavailable):
        return text
    low = str(err).lower()
    if "database is locked" in low or "database is busy" in low:
        return "store is locked by another process"
    if "unable to open database" in low:
        return "cannot open the database file"
    if "connection refused" in low or "max retries exceeded" in low:
        return "tracking server does not answer"
    return f"{type(err).__name__}: {text[:300]}"


# --- MLflow ---------------------------------------------------------------------------------------------------

@dataclass
class RunRow:
    run_id: str
    name: str
    status: str
    start_time: float | None          # unix seconds
    parent_id: str | None
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


_clients: dict[str, Any] = {}


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    if uri not in _clients:
        _clients[uri] = MlflowClient(tracking_uri=uri)
    return _clients[uri]


def experiment_client(uri: str, experiment: str) -> tuple[Any, str]:
    """(client, experiment id) of a store that answers; StoreUnavailable while the store or the experiment is not
    there yet (the pipeline's lookup, pipeline.tracking.find_experiment: read-only, nothing is created)."""
    from pipeline.tracking import find_experiment

    check_store(uri, "tracking store")
    client = _client(uri)
    experiment_id = find_experiment(client, experiment)
    if experiment_id is None:
        raise StoreUnavailable(f"no experiment {experiment!r} in {uri} yet")
    return client, experiment_id


def fetch_runs(uri: str, experiment: str, max_results: int = 500) -> list[RunRow]:
    client, experiment_id = experiment_client(uri, experiment)
    runs = client.search_runs([experiment_id], order_by=["attributes.start_time DESC"], max_results=max_results)
    return [
        RunRow(
            run_id=r.info.run_id,
            name=r.info.run_name or r.info.run_id[:8],
            status=r.info.status,
            start_time=r.info.start_time / 1000 if r.info.start_time else None,
            parent_id=r.data.tags.get("mlflow.parentRunId"),
            params={k: r.data.params[k] for k in KEY_PARAMS if k in r.data.params},
            metrics=dict(r.data.metrics),
        )
        for r in runs
    ]


def fetch_histories(uri: str, run_ids: list[str], metric: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """run_id -> (steps, values) of one metric, sorted by step (the last value wins on a repeated step)."""
    check_store(uri, "tracking store")
    client = _client(uri)
    out = {}
    for rid in run_ids:
        hist = client.get_metric_history(rid, metric)
        steps = np.array([m.step for m in hist], dtype=float)
        values = np.array([m.value for m in hist], dtype=float)
        order = np.argsort(steps, kind="stable")
        steps, values = steps[order], values[order]
        keep = np.append(steps[1:] != steps[:-1], True) if len(steps) else np.array([], bool)
        out[rid] = (steps[keep], values[keep])
    return out


# --- Optuna ---------------------------------------------------------------------------------------------------

@dataclass
class TrialRow:
    number: int
    state: str
    value: float | None
    params: dict[str, Any]
    duration_s: float | None


@dataclass
class StudyInfo:
    storage: str
    name: str
    names: list[str]
    direction: str
    trials: list[TrialRow]
    best: TrialRow | None


def fetch_study(storage_spec: str | None, root: Path, study_name: str | None) -> StudyInfo:
    """The study named study_name (else the newest) in the storage the study itself resolves from tune.storage."""
    import optuna
    from pipeline.study.storage import resolve_storage

    resolved = resolve_storage(storage_spec, root)
    storage = resolved.url
    check_store(storage, "study storage")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    opened = resolved.open()
    names = optuna.study.get_all_study_names(storage=opened)
    if not names:
        raise StoreUnavailable(f"no study in {storage} yet")
    name = study_name if study_name in names else names[-1]
    study = optuna.load_study(study_name=name, storage=opened)
    trials = [
        TrialRow(
            number=t.number, state=t.state.name, value=t.value, params=dict(t.params),
            duration_s=t.duration.total_seconds() if t.duration is not None else None,
        )
        for t in study.get_trials(deepcopy=False)
    ]
    complete = [t for t in trials if t.state == "COMPLETE" and t.value is not None]
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    best = (max if maximize else min)(complete, key=lambda t: t.value) if complete else None
    return StudyInfo(storage=storage, name=name, names=names, direction="maximize" if maximize else "minimize", trials=trials,
                     best=best)
