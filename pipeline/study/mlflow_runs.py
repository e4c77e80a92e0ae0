"""The study in MLflow: one parent run per study, one nested run per trial.

The parent's id is kept in the study's storage (a study user attribute), so every worker and every restart
attaches to the same parent. The trial's stages log their curves into the trial's run through
XBM_MLFLOW_RUN_ID; this module writes what only the study knows: the sampled values, the trial state, the
objective value, and on the parent the best trial so far.
"""
from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path
from typing import Any

import optuna
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.exc import SQLAlchemyError

from pipeline.study.storage import objective_name
from pipeline.tracking import metric_name, open_experiment

log = logging.getLogger(__name__)

PARENT_ATTR = "xbm.mlflow_parent"
RUN_ATTR = "xbm.mlflow_run_id"  # trial user attribute: the trial's run, closed by whoever fails it when stale
# Trial state -> MLflow run status: a pruned trial was stopped on purpose, not broken.
STATUS = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED", TrialState.FAIL: "FAILED"}
STATE_TAG = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}


def _now_ms() -> int:
    return int(time.time() * 1000)


def _chunks(items: list, n: int = 100):  # MLflow takes at most 100 params / 1000 metrics per batch
    for i in range(0, len(items), n):
        yield items[i:i + n]


class StudyTracker:
    def __init__(self, uri: str, experiment: str):
        self.uri, self.experiment = uri, experiment
        self.client: MlflowClient | None = None  # opened in attach_parent, under the study lock
        self.experiment_id: str | None = None
        self.parent_id: str | None = None

    def _open(self) -> str:
        # Two processes creating a new SQLite tracking database at once race in MLflow's schema migration
        # (the study lock covers workers, not the stages of other runs); the loser's error is transient: the
        # winner completes the schema, so it retries.
        for attempt in range(5):
            try:
                self.client = MlflowClient(self.uri)
                return open_experiment(self.client, self.experiment)  # the stages' experiment, tagged alike
            except (MlflowException, SQLAlchemyError) as err:
                if attempt == 4:
                    raise
                log.warning("tracking store %s not ready (%s); retrying", self.uri, str(err).splitlines()[0])
                time.sleep(1.0 + attempt)
        raise AssertionError("unreachable")

    # -- parent -------------------------------------------------------------------------------------------

    def attach_parent(self, study: optuna.Study, params_flat: dict[str, Any], storage_url: str) -> str:
        """Find the study's parent run in this tracking store or create it (call under the study lock)."""
        self.experiment_id = self._open()
        ref = study.user_attrs.get(PARENT_ATTR) or {}
        if ref.get("uri") == self.uri:
            try:
                run = self.client.get_run(ref["run_id"])
                if run.info.lifecycle_stage == "active":
                    self.parent_id = run.info.run_id
                    self.client.update_run(self.parent_id, status="RUNNING")
                    return self.parent_id
            except MlflowException:
                pass  # deleted from the store: start a new parent below
        run = self.client.create_run(self.experiment_id, run_name=f"study-{study.study_name}", tags={
            "xbm.study": study.study_name, "xbm.role": "study", "xbm.storage": storage_url,
        })
        self.parent_id = run.info.run_id
        params = [Param(k, str(v)) for k, v in sorted(params_flat.items())]
        for batch in _chunks(params):
            self.client.log_batch(self.parent_id, params=batch)
        study.set_user_attr(PARENT_ATTR, {"uri": self.uri, "run_id": self.parent_id})
        return self.parent_id

    def update_best(self, best: FrozenTrial | None, n_finished: int) -> None:
        """Best value (a curve over the finished-trial count) and the best params as `best.<key>` tags."""
        if best is None:
            return
        tags = [RunTag("xbm.best_trial", str(best.number))]
        tags += [RunTag(f"best.{k}", repr(v)) for k, v in sorted(best.params.items())]
        self.client.log_batch(self.parent_id, metrics=[Metric("tune/best_value", best.value, _now_ms(), n_finished)],
                              tags=tags)

    def log_report(self, files: list[Path], test_metrics: dict[str, float] | None) -> None:
        for f in files:
            self.client.log_artifact(self.parent_id, str(f))
        if test_metrics:
            ts = _now_ms()
            self.client.log_batch(self.parent_id, metrics=[
                Metric(metric_name(f"test/{k}"), float(v), ts, 0) for k, v in sorted(test_metrics.items())])

    def finish(self) -> None:
        self.client.set_terminated(self.parent_id, status="FINISHED")

    # -- trials -------------------------------------------------------------------------------------------

    def start_trial(self, study: optuna.Study, number: int, params_flat: dict[str, Any],
                    sampled: dict[str, float]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=f"trial-{number:04d}", tags={
            "mlflow.parentRunId": self.parent_id, "xbm.study": study.study_name, "xbm.role": "trial",
            "xbm.trial": str(number), "xbm.trial_state": "running", "xbm.tuned_keys": ",".join(sorted(sampled)),
        })
        params = [Param(k, str(v)) for k, v in sorted(params_flat.items())]
        for batch in _chunks(params):
            self.client.log_batch(run.info.run_id, params=batch)
        return run.info.run_id

    def start_warmup(self, params_flat: dict[str, Any], digest: str) -> str:
        run = self.client.create_run(self.experiment_id, run_name=f"warmup-{digest[:6]}", tags={
            "mlflow.parentRunId": self.parent_id, "xbm.role": "warmup", "xbm.warmup_digest": digest})
        return run.info.run_id

    def start_pretrain(self) -> str:
        """The run of a pretrain stage that the study runs because model.pretrained was missing."""
        run = self.client.create_run(self.experiment_id, run_name="pretrain", tags={
            "mlflow.parentRunId": self.parent_id, "xbm.role": "pretrain"})
        return run.info.run_id

    def end_stale(self, trial: FrozenTrial) -> None:
        """Close the run of a trial whose worker died (it was left RUNNING in MLflow too)."""
        run_id = trial.user_attrs.get(RUN_ATTR)
        if run_id is None:
            return
        try:
            self.client.log_batch(run_id, tags=[RunTag("xbm.trial_state", "failed"),
                                                RunTag("xbm.error", "worker died while the trial ran")])
            self.client.set_terminated(run_id, status="FAILED")
        except MlflowException as err:  # another tracking store, or deleted: nothing to close here
            log.warning("MLflow run %s of trial %d not closed: %s", run_id, trial.number, err)

    def end_trial(self, run_id: str, trial: FrozenTrial, metric: str, error: BaseException | None) -> None:
        tags = [RunTag("xbm.trial_state", STATE_TAG.get(trial.state, "failed"))]
        metrics = []
        if trial.value is not None:  # a pruned trial keeps its last reported value
            metrics.append(Metric(metric_name(f"tune/{objective_name(metric)}"), trial.value, _now_ms(), 0))
        if error is not None:
            tags.append(RunTag("xbm.error", repr(error)[:4000]))
            text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
            self.client.log_text(run_id, text, "error.txt")
        self.client.log_batch(run_id, metrics=metrics, tags=tags)
        self.client.set_terminated(run_id, status=STATUS.get(trial.state, "FAILED"))
        if trial.state == TrialState.COMPLETE:
            self.client.log_metric(self.parent_id, metric_name(f"tune/{objective_name(metric)}"), trial.value,
                                   step=trial.number)
