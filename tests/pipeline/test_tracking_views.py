"""What the tools of the field show of our runs: MLflow's experiment kind (its UI's training view) and the name of
the Optuna study's objective (optuna-dashboard's axis, trials_dataframe's column)."""
from __future__ import annotations

import optuna
import pytest
from mlflow.tracking import MlflowClient

from pipeline.study import Worker, resolve_storage
from pipeline.study.mlflow_runs import StudyTracker
from pipeline.tracking import EXPERIMENT_KIND_TAG, attach_run
from tiny_project import tiny_params
from xbmcore.config import validate_params

KIND = "custom_model_development"  # the value MLflow 3's UI reads, spelt out here rather than imported


def kind_of(client: MlflowClient, name: str) -> str | None:
    return client.get_experiment_by_name(name).tags.get(EXPERIMENT_KIND_TAG)


def test_experiments_of_the_pipeline_and_the_study_are_training_experiments(tmp_path, monkeypatch):
    for var in ("MLFLOW_TRACKING_URI", "XBM_MLFLOW_RUN_ID", "XBM_MLFLOW_PARENT_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    # Made before this change (no tag), and one whose kind a user chose: ours gets the tag, theirs keeps its own.
    old = client.create_experiment("old")
    client.create_experiment("theirs", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    assert kind_of(client, "old") is None

    for name in ("new", "old", "theirs"):
        params = validate_params(tiny_params(tracking={"uri": uri, "experiment": name}))
        attach_run(params, tmp_path, "download")
    assert kind_of(client, "new") == KIND
    assert kind_of(client, "old") == KIND
    assert client.get_experiment_by_name("old").experiment_id == old  # tagged in place, not made anew
    assert kind_of(client, "theirs") == "genai_development"

    # The study's parent run: a new experiment and an untagged one.
    client.create_experiment("old-study")
    for name in ("study", "old-study"):
        StudyTracker(uri, name).attach_parent(optuna.create_study(direction="maximize"), {}, "in-memory")
        assert kind_of(client, name) == KIND
    assert [r.data.tags["xbm.role"] for r in client.search_runs(
        [client.get_experiment_by_name("study").experiment_id])] == ["study"]


@pytest.mark.parametrize("metric", ["recall@1", "map@r"])
def test_the_study_objective_is_named_after_tune_metric(tmp_path, metric):
    params = validate_params(tiny_params(tune={"metric": metric, "n_trials": 1}))
    storage = resolve_storage(None, tmp_path)

    def objective(trial_params, trial_dir, report) -> float:
        return 0.5

    Worker(params, tmp_path, storage, objective).run()
    # Read back from the storage, as optuna-dashboard does.
    study = optuna.load_study(study_name=params.tune.study_name, storage=storage.open())
    assert study.metric_names == [f"val_{metric}"]
    assert [t.value for t in study.trials] == [0.5]
    assert list(study.trials_dataframe(attrs=("number", "value")).columns) == ["number", f"value_val_{metric}"]
