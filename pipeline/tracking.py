"""Tracking glue: the run's event file and its MLflow run, attached to by every stage of one pipeline execution.

Run identity. A run is keyed by a hash of the params sections that define its result (`xbm.run_key` tag). A stage
attaches to the newest run with its key whose execution is still open (`xbm.execution: open`; created if there is
none), so the stages of one execution, and a stage started again after a kill, log into one run with continuous
curves. Every stage ends the run when it exits, FINISHED, FAILED or KILLED, and the next stage opens it again: a
pipeline that stops after any stage (`dvc repro pretrain`, or DVC skipping the stages whose inputs did not change)
leaves no run RUNNING. The train_xbm stage closes the execution (`xbm.execution: done`) when the model is
written, and tags the run with the model's sha256 (`xbm.model_sha256`): the evaluate stage attaches to the run
that trained its model, logs the test metrics and ends it FINISHED again. So the next execution with the same key
gets a new run. `XBM_MLFLOW_RUN_ID` names the
run outright; `XBM_MLFLOW_PARENT_RUN_ID` nests it under a parent (the Optuna study: one child per trial).

Nothing here may stall or kill training: metrics go through `MLflowSink`'s background thread, and a store that
cannot be reached at attach time leaves the stage running with the event file only, with a warning (a tracking
server is asked once, with a short timeout, before MLflow's own retries would hold the stage for minutes).
"""
from __future__ import annotations

import logging
import os
import queue
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from xbmcore import portable
from xbmcore.atomic import write_text
from xbmcore.hashing import file_digest
from xbmcore.config import Params
from xbmcore.events import METRIC_FIELDS, JsonlSink, MultiSink, NullSink, ProgressSink, make_event

log = logging.getLogger(__name__)

RUN_KEY_TAG = "xbm.run_key"
MODEL_TAG = "xbm.model_sha256"
# "open" while the stages of one pipeline execution still log into the run, "done" once its model is trained.
EXECUTION_TAG = "xbm.execution"
# Whether the last stage ran in portable mode (xbmcore.portable), and the level of torch's CPU kernels.
PORTABLE_TAG = "xbm.portable"
KERNELS_TAG = "xbm.cpu_kernels"
PARENT_TAG = "mlflow.parentRunId"
# The experiment's kind, which decides MLflow 3's view of it: the classic training view (runs, metrics, models).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# The sections that define a run's result: same values, same run (tracking and tune do not change a result).
RESULT_SECTIONS = ("data", "model", "loss", "memory", "train", "eval")
# Step-event fields logged as MLflow metrics: those StepRecord marks as metrics.
STEP_METRICS = METRIC_FIELDS
EVENTS_FILE = "events.jsonl"
LATEST_FILE = "LATEST"


_USERINFO = re.compile(r"(://[^/:@\s]*):[^/@\s]*@")


def redact(text: str) -> str:
    """A URL (or any text holding one) with the password of its user:password@ part shown as ***: what the
    project prints and logs of a storage or tracking URL (a PostgreSQL study URL carries its password)."""
    return _USERINFO.sub(r"\1:***@", text)


def public_params(params: Params) -> dict[str, Any]:
    """params.flat() as logged to MLflow and the event file: URLs without their passwords."""
    return {k: redact(v) if isinstance(v, str) else v for k, v in params.flat().items()}


def metric_name(name: str) -> str:
    """MLflow refuses "@" in metric names: recall@1 -> recall_at_1, val/map@r -> val/map_at_r."""
    return name.replace("@", "_at_")


def run_key(params: Params) -> str:
    """The MLflow run's key: the result's params as written (weights="path": the pretrain stage rewrites the
    pretrained file while one pipeline execution runs, and every stage of it must find the same run)."""
    return params.digest(RESULT_SECTIONS, weights="path")


def project_home(root: Path) -> Path:
    """The user's project folder: `root`, or when `dvc exp run --temp/--queue` runs the stage in a temporary copy
    (<project>/.dvc/tmp/exps/<tmp>/), the project it was copied from. The MLflow database and the event files
    live there, so the runs of every copy land in one database and the monitor finds them."""
    parts = Path(root).resolve().parts
    for i in range(len(parts) - 3):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return Path(root).resolve()


def tracking_uri(params: Params, root: Path) -> str:
    """MLFLOW_TRACKING_URI, else tracking.uri, else sqlite:///<abs project home>/mlflow.db (relative database
    paths are taken from the project home, see project_home)."""
    home = project_home(root)
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params.tracking.uri
    if not uri:
        return f"sqlite:///{home / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.is_absolute():
            return f"sqlite:///{(home / path).resolve()}"
    return uri


def probe(uri: str, timeout_s: float = 5.0) -> None:
    """Raise OSError if an http(s) tracking server does not answer its health check within `timeout_s`.

    MLflow's client retries a refused connection 7 times with exponential backoff (about 4 minutes) before it
    fails; a stage, or the desktop app, asks this first to learn in seconds that the server is down. Other URIs
    (files, databases) pass: their own errors are immediate.
    """
    if uri.startswith(("http://", "https://")):
        import urllib.request

        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s).close()


def artifact_location(uri: str) -> str | None:
    """Artifacts (logged models) of a SQLite store go next to the database, not into the current folder (MLflow's
    default `./mlruns`, which a `dvc exp run --temp` copy would delete); a server decides for itself."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return None


def find_experiment(client, name: str) -> str | None:
    """The id of experiment `name`, or None when there is none yet. Read-only: nothing is created (the desktop
    app only looks)."""
    exp = client.get_experiment_by_name(name)
    return None if exp is None else exp.experiment_id


def open_experiment(client, name: str) -> str:
    """The id of experiment `name` (created if missing, artifacts per `artifact_location`), tagged as a training
    experiment: MLflow 3's UI picks an experiment's view from EXPERIMENT_KIND_TAG and, without it, may guess GenAI
    (traces, prompts) instead of the runs table. An experiment made before the tag existed gets it here; one
    whose kind someone set by hand keeps it."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location(client.tracking_uri),
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:  # created by a concurrent stage or study worker in the meantime
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if EXPERIMENT_KIND_TAG not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def events_path(params: Params, root: Path, key: str) -> Path:
    return project_home(root) / params.tracking.runs_dir / key / EVENTS_FILE


def git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


# ---- MLflow ----

@dataclass
class TrackedRun:
    client: Any  # mlflow.MlflowClient
    run_id: str
    experiment_id: str
    key: str
    # Newest step already logged per metric: a resumed stage re-runs the steps after its checkpoint, and their
    # points (logged before the kill) are not logged twice.
    logged: dict[str, int] = field(default_factory=dict)

    def log_metrics(self, values: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(metric_name(k), float(v), now, step)
                                                    for k, v in values.items() if v is not None],
                              synchronous=True)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items() if v is not None],
                              synchronous=True)

    def terminate(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


def attach_run(params: Params, root: Path, stage: str, fresh_start: int | None = None,
               model_sha256: str | None = None) -> TrackedRun:
    """The MLflow run of this pipeline execution (see the module docstring); logs params and tags on it.

    fresh_start: the first step a stage that does NOT resume a checkpoint will log. A candidate run that already
    holds a later step belongs to an abandoned execution, and a new run is started instead of mixing the two.
    model_sha256: the model this stage reads; the newest run with that MODEL_TAG (the run that trained it, in any
    status) is the one to attach to.
    """
    import mlflow
    from mlflow.entities import Param, RunStatus, RunTag

    uri = tracking_uri(params, root)
    probe(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp_id = open_experiment(client, params.tracking.experiment)
    key = run_key(params)
    parent = os.environ.get("XBM_MLFLOW_PARENT_RUN_ID")
    run = None
    if os.environ.get("XBM_MLFLOW_RUN_ID"):
        run = client.get_run(os.environ["XBM_MLFLOW_RUN_ID"])
    elif model_sha256 and (found := client.search_runs(
            [exp_id], f"tags.`{RUN_KEY_TAG}` = '{key}' and tags.`{MODEL_TAG}` = '{model_sha256}'",
            order_by=["attributes.start_time DESC"], max_results=1)):
        run = found[0]
    else:
        filt = f"tags.`{RUN_KEY_TAG}` = '{key}' and tags.`{EXECUTION_TAG}` = 'open'"
        if parent:
            filt += f" and tags.`{PARENT_TAG}` = '{parent}'"
        found = client.search_runs([exp_id], filt, order_by=["attributes.start_time DESC"], max_results=1)
        run = found[0] if found else None
    logged = {}
    if run is not None:
        logged = {k: max(m.step for m in client.get_metric_history(run.info.run_id, k)) for k in run.data.metrics}
        if fresh_start is not None and logged.get("loss", -1) >= fresh_start and \
                not os.environ.get("XBM_MLFLOW_RUN_ID"):
            log.warning("MLflow run %s already holds steps from an earlier execution with the same params; "
                        "starting a new run", run.info.run_id)
            run, logged = None, {}
    if run is None:
        tags = {RUN_KEY_TAG: key, EXECUTION_TAG: "open"}
        if parent:
            tags[PARENT_TAG] = parent
        kind = "xbm" if params.memory.enabled else "baseline"
        run = client.create_run(exp_id, tags=tags, run_name=f"{params.data.name}-{kind}-{key[:6]}")
    elif run.info.status != RunStatus.to_string(RunStatus.RUNNING):
        client.update_run(run.info.run_id, status="RUNNING")  # a stopped or failed execution goes on
    tr = TrackedRun(client, run.info.run_id, exp_id, key, logged)

    have = run.data.params
    flat = {k: str(v)[:6000] for k, v in public_params(params).items()}
    new = [Param(k, v) for k, v in flat.items() if k not in have]
    changed = sorted(k for k, v in flat.items() if k in have and have[k] != v)
    if changed:  # only sections outside the run key can differ (tracking, tune); MLflow params are immutable
        log.warning("MLflow run %s keeps its first values of %s", run.info.run_id, ", ".join(changed))
    commit = git_commit(root)
    tags = [RunTag("xbm.stage", stage), RunTag("mlflow.source.name", f"pipeline.{stage}")]
    if commit:
        tags += [RunTag("git.commit", commit), RunTag("mlflow.source.git.commit", commit)]
    lock = file_digest(root / "dvc.lock", missing_ok=True)
    if lock:
        tags.append(RunTag("dvc.lock_sha256", lock))
    for i in range(0, max(len(new), 1), 100):  # log_batch takes at most 100 params per call
        client.log_batch(tr.run_id, params=new[i:i + 100], tags=tags if i == 0 else [], synchronous=True)
    return tr


class MLflowSink:
    """An events Sink that logs step and eval events as MLflow metrics from a background thread.

    A ``memory_view`` event gives metrics (its age quantiles and super-class shares) and, at the next evaluation
    and at the end, an artifact: the view drawn as a PNG (pipeline.figures.draw_memory_view, thumbnails from
    `images()` when given) and its JSON, under ``memory_view/``, drawn and sent by the same thread.

    `emit` only enqueues (no I/O on the training thread). The thread sends batches of up to `max_batch` metrics
    at least every `flush_s` seconds; a failing call is retried `retries` times with backoff, then its metrics
    are dropped with a warning. `close` waits at most `close_timeout_s` for the rest: a slow or dead store can
    neither stall nor kill training.
    """

    def __init__(self, client, run_id: str, logged: dict[str, int] | None = None, flush_s: float = 1.0,
                 max_batch: int = 1000, retries: int = 3, backoff_s: float = 0.5, max_queue: int = 200_000,
                 close_timeout_s: float = 15.0, images: Callable[[], Callable[[int], Any]] | None = None):
        from mlflow.entities import Metric  # imported here: importing mlflow takes seconds, never mid-training

        self._metric = Metric
        self.client, self.run_id = client, run_id
        self.logged = dict(logged or {})
        self.flush_s, self.max_batch, self.retries, self.backoff_s = flush_s, max_batch, retries, backoff_s
        self.close_timeout_s = close_timeout_s
        self.dropped = 0
        self.sent = 0
        self._q: queue.Queue = queue.Queue(maxsize=max_queue)
        # memory views (xbmcore.memory_view) to draw and log as artifacts, in the thread: at each evaluation and
        # at the end, the latest view not logged yet. `images()` gives image_of(training index) for thumbnails.
        self._views: queue.Queue = queue.Queue()
        self._view: dict[str, Any] | None = None
        self._view_logged = -1
        self._images, self._image_of = images, None
        self.views_logged: list[str] = []
        self._closing = threading.Event()
        self._abandon = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mlflow-sink", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        """Metrics waiting in the queue (not those of the call in flight)."""
        return self._q.qsize()

    @staticmethod
    def metrics_of(event: dict[str, Any]) -> dict[str, float]:
        """The MLflow metrics of one event: step fields as-is, eval metrics as '<split>/<metric>' with "@" spelt
        "_at_" (val/recall_at_1), the one character of our metric names that MLflow refuses."""
        if event["kind"] == "step":
            return {k: event[k] for k in STEP_METRICS if event.get(k) is not None}
        if event["kind"] == "eval":
            split = event.get("split", "val")
            return {metric_name(f"{split}/{k}"): v for k, v in event["metrics"].items() if v is not None}
        if event["kind"] == "drift":  # the drift probe's D(t; dt) as drift_probe/dt_<dt>, and what goes with it
            out = {f"drift_probe/dt_{dt}": v for dt, v in event["D"].items() if v is not None}
            out.update({f"drift_probe/backbone_dt_{dt}": v for dt, v in (event.get("D_backbone") or {}).items()
                        if v is not None})
            out.update({f"drift_probe/{k}": event[k] for k in ("directed", "cos10") if event.get(k) is not None})
            st = event.get("staleness") or {}
            out.update({f"memory/{k}": st[k] for k in ("active_neg_age", "mean_age") if st.get(k) is not None})
            out.update({f"memory/grad_share_{b.replace('-', '_').replace('+', '_plus')}": v
                        for b, v in (st.get("grad_share") or {}).items() if v is not None})
            return out
        if event["kind"] == "memory_view":  # the ages of the active memory negatives, the super-class shares
            out = {f"memory_view/age_{k}": v for k, v in (event.get("age_quantiles") or {}).items() if v is not None}
            out.update({f"memory_view/{k}": event[k] for k in ("super_share", "topk_super_share",
                                                                  "active_negatives") if event.get(k) is not None})
            return out
        return {}

    def emit(self, event: dict[str, Any]) -> None:
        kind = event["kind"]
        if kind == "memory_view":
            self._view = event
        elif kind in ("eval", "end"):
            self._queue_view()
        Metric = self._metric
        step, ts = int(event["step"]), int(event["time"] * 1000)
        for k, v in self.metrics_of(event).items():
            if step <= self.logged.get(k, -1):
                continue  # already in the run (logged before a kill, or backfilled)
            try:
                self._q.put_nowait(Metric(k, float(v), ts, step))
            except queue.Full:
                self._drop(1, "the queue is full (the tracking store is slower than training)")

    def _drop(self, n: int, why: str) -> None:
        if self.dropped == 0 or (self.dropped + n) // 10_000 > self.dropped // 10_000:
            log.warning("MLflow: dropping metrics, %s (%d dropped so far)", why, self.dropped + n)
        self.dropped += n

    def _loop(self) -> None:
        while not self._abandon.is_set():
            batch = []
            deadline = time.monotonic() + self.flush_s
            while len(batch) < self.max_batch:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    break
                try:
                    batch.append(self._q.get(timeout=min(timeout, 0.1)))
                except queue.Empty:
                    if self._closing.is_set():
                        break
            if batch:
                self._send(batch)
            while not self._views.empty() and not self._abandon.is_set():
                self._log_view(self._views.get())
            if not batch and self._closing.is_set() and self._q.empty() and self._views.empty():
                return

    def _queue_view(self) -> None:
        if self._view is not None and self._view["step"] != self._view_logged:
            self._view_logged = self._view["step"]
            self._views.put(self._view)

    def _log_view(self, view: dict[str, Any]) -> None:
        """Draw one memory view and log it (PNG and JSON) under memory_view/; a failure is a warning."""
        import json
        import tempfile

        from pipeline.figures import draw_memory_view, save_png

        try:
            if self._image_of is None and self._images is not None:
                self._image_of = self._images()
            with tempfile.TemporaryDirectory() as tmp:
                name = f"step_{int(view['step']):07d}"
                png = save_png(draw_memory_view(view, self._image_of), Path(tmp) / f"{name}.png")
                (Path(tmp) / f"{name}.json").write_text(json.dumps(view))
                for path in (png, Path(tmp) / f"{name}.json"):
                    self.client.log_artifact(self.run_id, str(path), "memory_view")
            self.views_logged.append(name)
        except Exception as err:  # never reaches the training thread
            log.warning("MLflow: the memory view of step %s was not logged (%s: %s)", view.get("step"),
                        type(err).__name__, err)

    def _send(self, batch: list) -> None:
        for attempt in range(self.retries + 1):
            try:
                self.client.log_batch(self.run_id, metrics=batch, synchronous=True)
                self.sent += len(batch)
                return
            except Exception as err:  # any store error: retry, then drop; never reaches the training thread
                if attempt == self.retries or self._abandon.is_set():
                    self._drop(len(batch), f"the store failed {attempt + 1} times ({type(err).__name__}: {err})")
                    return
                time.sleep(self.backoff_s * 2 ** attempt)

    def close(self) -> None:
        self._queue_view()  # the last view, at the end
        self._closing.set()
        self._thread.join(self.close_timeout_s)
        if self._thread.is_alive():
            self._abandon.set()  # the thread ends after the call in flight; the rest is dropped
            log.warning("MLflow: the store did not take the last %d metrics within %.0f s; they are dropped",
                        self._q.qsize(), self.close_timeout_s)


def _train_images(params: Params, root: Path) -> Callable[[int], Any]:
    """image_of(index) of the prepared training split (the memory view's thumbnails); opened when first needed."""
    from xbmcore.data import open_splits

    train = open_splits(Path(root) / params.data.prepared / params.data.name, params.data).train
    return train.image


# ---- a stage's view of the run ----

class _RunSink(MultiSink):
    """MultiSink that remembers the last step seen and whether an `end` event went out."""

    def __init__(self, sinks):
        super().__init__(sinks)
        self.ended = False
        self.last_step = 0

    def emit(self, event: dict[str, Any]) -> None:
        self.ended |= event["kind"] == "end"
        self.last_step = max(self.last_step, int(event["step"]))
        super().emit(event)


class StageRun:
    """Context manager for one stage: the events file (+ LATEST), the MLflow run and the sink to train into.

    On exit the stage ends the MLflow run: KILLED after a SIGTERM/SIGINT stop, FAILED after an error, else
    FINISHED. `finish` (train_xbm, evaluate) also closes the execution, so that no later stage attaches to the run.
    A run that the Optuna study owns (XBM_MLFLOW_RUN_ID) is left to it unless the stage failed or was stopped.
    """

    def __init__(self, params: Params, root: Path, stage: str, total_steps: int | None = None,
                 fresh_start: int | None = None, finish: bool = False, progress: bool | None = None,
                 model_sha256: str | None = None):
        self.params, self.root, self.stage, self.finish = params, Path(root), stage, finish
        self.key = run_key(params)
        self.events_path = events_path(params, self.root, self.key)
        self.events_path.parent.mkdir(parents=True, exist_ok=True)
        write_text(project_home(self.root) / params.tracking.runs_dir / LATEST_FILE, self.key + "\n")
        self.mlflow: TrackedRun | None = None
        try:
            self.mlflow = attach_run(params, self.root, stage, fresh_start, model_sha256)
        except Exception as err:  # the store is down or locked: train anyway, the event file has everything
            log.warning("MLflow: cannot attach to %s (%s: %s); this stage logs to %s only",
                        tracking_uri(params, self.root), type(err).__name__, err, self.events_path)
        sinks: list = [JsonlSink(self.events_path), ProgressSink(enabled=progress)]
        self._mlflow_sink = None
        if self.mlflow is not None:
            self._mlflow_sink = MLflowSink(self.mlflow.client, self.mlflow.run_id, self.mlflow.logged,
                                           images=lambda: _train_images(params, self.root))
            sinks.append(self._mlflow_sink)
        self.sink = _RunSink(sinks)
        numerics = portable.report()
        self.set_tags({PORTABLE_TAG: str(numerics["portable"]).lower(), KERNELS_TAG: numerics["aten_capability"]})
        self.sink.emit(make_event("start", 0, run_id=self.run_id, run_key=self.key, stage=stage,
                                  params=public_params(params), total_steps=total_steps, numerics=numerics))

    @property
    def run_id(self) -> str | None:
        return None if self.mlflow is None else self.mlflow.run_id

    def backfill(self, history: dict[str, list], evals: list[dict[str, Any]],
                 drift: list[dict[str, Any]] = ()) -> None:
        """Log curves computed by an earlier stage (a cached warm-up) that this MLflow run does not hold yet."""
        if self._mlflow_sink is None:
            return
        now = time.time()
        for i, step in enumerate(history["step"]):
            ev = {"kind": "step", "step": step, "time": now, **{k: history[k][i] for k in STEP_METRICS
                                                               if k in history}}
            self._mlflow_sink.emit(ev)
        for e in evals:
            metrics = {k: v for k, v in e.items() if k not in ("step", "phase", "split")}
            self._mlflow_sink.emit({"kind": "eval", "step": e["step"], "time": now, "split": e["split"],
                                    "metrics": metrics})
        for h in drift:
            self._mlflow_sink.emit({**h, "kind": "drift", "step": h["step"], "time": now,
                                    "D": {str(k): v for k, v in h["D"].items()},
                                    "D_backbone": {str(k): v for k, v in (h.get("D_backbone") or {}).items()}})

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.mlflow is not None:
            self.safe("setting tags", self.mlflow.set_tags, tags)

    def safe(self, what: str, fn, *args, **kwargs) -> Any:
        """Call a tracking function (log the model, metrics, tags); a store error is a warning, not a failure."""
        if self.mlflow is None:
            return None
        try:
            probe(self.mlflow.client.tracking_uri)  # a server gone since: seconds, not MLflow's minutes of retries
            return fn(*args, **kwargs)
        except Exception as err:
            log.warning("MLflow: %s failed (%s: %s)", what, type(err).__name__, err)
            return None

    def __enter__(self) -> "StageRun":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Without the trainer's hooks imported (download, evaluate), nothing can have raised their TrainingStopped.
        hooks = sys.modules.get("xbmcore.hooks")
        stopped = exc_type is not None and hooks is not None and issubclass(exc_type, hooks.TrainingStopped)
        step = self.sink.last_step
        if exc_type is not None and not self.sink.ended:  # the trainer reports its own stops and failures
            status = "stopped" if issubclass(exc_type, KeyboardInterrupt) else "failed"
            self.sink.emit(make_event("end", step, status=status, message=f"{exc_type.__name__}: {exc}"))
        elif exc_type is None and self.finish:
            self.sink.emit(make_event("end", step, status="finished", message=f"{self.stage} done"))
        self.sink.close()
        if exc_type is None:
            if self.finish:
                self.set_tags({EXECUTION_TAG: "done"})
            status = "FINISHED" if self.finish or not os.environ.get("XBM_MLFLOW_RUN_ID") else None
        elif stopped or not issubclass(exc_type, Exception):  # a stop signal, Ctrl-C, SystemExit
            status = "KILLED"
        else:
            status = "FAILED"
        if status is not None and self.mlflow is not None:
            self.safe("setting the run status", self.mlflow.terminate, status)


class WorkerRun:
    """StageRun's stand-in on the ranks other than 0 of a torchrun job: they train, rank 0 alone writes events
    and MLflow."""

    mlflow = None
    run_id = None

    def __init__(self) -> None:
        self.sink = NullSink()

    def backfill(self, history: dict[str, list], evals: list[dict[str, Any]],
                 drift: list[dict[str, Any]] = ()) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass

    def __enter__(self) -> "WorkerRun":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        pass


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a process outside one (torchrun sets RANK before the stage starts)."""
    return int(os.environ.get("RANK", "0")) == 0


def stage_run(params: Params, root: Path, stage: str, **kwargs) -> "StageRun | WorkerRun":
    """The stage's run: a StageRun on rank 0 (or without torchrun), a WorkerRun on the other ranks."""
    return StageRun(params, root, stage, **kwargs) if is_main_process() else WorkerRun()


def configure_logging() -> None:
    """Stage entry points: our warnings and MLflow's go to stderr, one line each."""
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("pipeline", "xbmcore"):
        logging.getLogger(name).setLevel(logging.INFO)
