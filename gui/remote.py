"""Follow a run through an MLflow tracking server: the server's active runs, and one run's curves rebuilt from its
metric history, polled in a worker thread and fetched incrementally (only the steps not seen yet).

The run's metrics become events of the project's one schema (xbmcore/events.py), so the Live tab draws a remote
run with the same code, plots, phase markers and ETA as a local events file:

- steps: each step metric the pipeline logs (pipeline.tracking.STEP_METRICS) at its step; the time of a step is
  its metric timestamp (so speed and ETA are the run's own, not the network's);
- phases: from the run's params (warm-up steps 1..W, memory init at W, then XBM or the baseline), evaluation once
  test metrics appear; progress out of W + X steps;
- evaluations: the `val/...` and `test/...` metrics; the end: the run's status;
- memory views: the `memory_view/*.json` artifacts (the Memory tab), logged at each evaluation and at the end.

Steps are read up to the newest step of `loss`, the first metric of each step the sink sends (in step order,
in batches of up to 1,000 metrics). A batch can end inside that newest step; its other values then come after
the step was read and are not read again: a point missing from some curves, at most one step per batch. The
history is read with the server's `get-history-bulk-interval` endpoint in step ranges of at most its 2,500
points per request, which is exact (the server samples only past that size).

Plain HTTP with short timeouts (requests), not MlflowClient: MLflow's client retries a refused connection for
minutes, and the worker must instead say at once that the server is down or slow and try again at the next poll.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from PySide6.QtCore import QObject, QThread, Signal, Slot

from .series import EventBatch
from .tail import PollingWorker

CHUNK = 2500            # the server's most points per run and request (MAX_RESULTS_PER_RUN)
STEPS_PER_POLL = 10 * CHUNK  # a long run joined late fills in over a few polls, the first plots within one
TIMEOUT = (3.0, 15.0)   # connect, read (s): a refused port fails at once, a busy server gets 15 s
TERMINAL = {"FINISHED": "finished", "FAILED": "failed", "KILLED": "stopped"}


def is_server(uri: str | None) -> bool:
    return bool(uri) and uri.startswith(("http://", "https://"))


class ServerError(RuntimeError):
    """The server does not answer, is slow, or refuses the request; the text says which, for the status bar."""


class Server:
    """The few REST calls the monitor needs (MLflow REST API 2.0), each with a timeout and no retry."""

    def __init__(self, uri: str, timeout: tuple[float, float] = TIMEOUT):
        import requests

        self.uri = uri.rstrip("/")
        self.timeout = timeout
        self._http = requests.Session()
        # The client's own credentials, as MlflowClient would send them (a server behind basic auth or a token).
        if os.environ.get("MLFLOW_TRACKING_TOKEN"):
            self._http.headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
        elif os.environ.get("MLFLOW_TRACKING_USERNAME"):
            self._http.auth = (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ.get("MLFLOW_TRACKING_PASSWORD", ""))

    def _call(self, method: str, path: str, **kw) -> dict[str, Any]:
        import requests

        try:
            r = self._http.request(method, f"{self.uri}{path}", timeout=self.timeout, **kw)
        except requests.ConnectionError as err:
            raise ServerError(f"{self.uri} does not answer ({_reason(err)})") from None
        except requests.Timeout:
            raise ServerError(f"{self.uri} is slow: no answer within {self.timeout[1]:g} s") from None
        if r.status_code != 200:
            try:
                text = r.json().get("message", r.text)
            except ValueError:
                text = r.text
            raise ServerError(f"{self.uri} answered {r.status_code} to {path}: {text[:200]}")
        return r.json()

    def active_runs(self, max_results: int = 100) -> list["ActiveRun"]:
        exps = self._call("POST", "/api/2.0/mlflow/experiments/search", json={"max_results": 1000})
        names = {e["experiment_id"]: e["name"] for e in exps.get("experiments", [])}
        if not names:
            return []
        found = self._call("POST", "/api/2.0/mlflow/runs/search", json={
            "experiment_ids": list(names), "filter": "attributes.status = 'RUNNING'",
            "order_by": ["attributes.start_time DESC"], "max_results": max_results})
        out = []
        for r in found.get("runs", []):
            info, data = r["info"], r.get("data", {})
            tags = {t["key"]: t["value"] for t in data.get("tags", [])}
            steps = {m["key"]: int(m.get("step", 0)) for m in data.get("metrics", [])}
            out.append(ActiveRun(info["run_id"], info.get("run_name") or info["run_id"][:8],
                                 names.get(info["experiment_id"], "?"), tags.get("xbm.stage", ""),
                                 steps.get("loss"), int(info.get("start_time", 0)) / 1000))
        return out

    def run(self, run_id: str) -> dict[str, Any]:
        return self._call("GET", "/api/2.0/mlflow/runs/get", params={"run_id": run_id})["run"]

    def artifacts(self, run_id: str, path: str) -> list[str]:
        """The paths of the run's artifacts in folder `path` (not recursive)."""
        got = self._call("GET", "/api/2.0/mlflow/artifacts/list", params={"run_id": run_id, "path": path})
        return [f["path"] for f in got.get("files", []) if not f.get("is_dir")]

    def artifact_json(self, run_id: str, path: str) -> Any:
        """One JSON artifact of the run, parsed (the server's artifact download)."""
        return self._call("GET", "/get-artifact", params={"path": path, "run_uuid": run_id})

    def history(self, run_id: str, key: str, start: int, end: int) -> list[dict[str, Any]]:
        """Points of metric `key` with start <= step <= end, all of them (ranges of at most CHUNK steps)."""
        out = []
        for a in range(start, end + 1, CHUNK):
            b = min(end, a + CHUNK - 1)
            got = self._call("GET", "/ajax-api/2.0/mlflow/metrics/get-history-bulk-interval", params={
                "run_ids": run_id, "metric_key": key, "start_step": a, "end_step": b, "max_results": CHUNK})
            out += got.get("metrics", [])
        return out


def _reason(err: Exception) -> str:
    text = str(err)
    for known in ("Connection refused", "Name or service not known", "No route to host", "timed out"):
        if known in text:
            return known.lower()
    return type(err).__name__


@dataclass
class ActiveRun:
    run_id: str
    name: str
    experiment: str
    stage: str
    step: int | None
    start_time: float

    def label(self) -> str:
        at = f", step {self.step:,}" if self.step is not None else ""
        stage = f" · {self.stage}{at}" if self.stage else at
        return f"{self.name} ({self.experiment}){stage}"


def _warmup_end(params: dict[str, str], tags: dict[str, str]) -> int:
    """The step the run's warm-up ends at: train.warmup_steps, or with `auto` the warmup_end tag the warm-up stage
    sets when it ends (until then every step is the warm-up's, at most train.warmup_max_steps)."""
    value = params.get("train.warmup_steps") or "0"
    if value != "auto":
        return int(value)
    if "warmup_end" in tags:
        return int(tags["warmup_end"])
    return int(params.get("train.warmup_max_steps") or 0)


@dataclass
class RemoteRun:
    """One run on a server as a stream of events: `poll()` returns what is new since the last call. No Qt."""

    server: Server
    run_id: str
    frontier: int = 0                     # every step metric is complete up to this step
    eval_seen: dict[str, int] = field(default_factory=dict)
    phase: str | None = None
    started: bool = False
    ended: bool = False
    views_loaded: set = field(default_factory=set)  # memory_view/*.json artifacts read
    views_listed: float = -1e9             # when the memory_view folder was last listed (monotonic s)
    views_final: bool = False              # listed once after the run ended

    VIEWS_EVERY_S = 10.0                   # how often the memory_view folder is listed while the run goes on

    def poll(self) -> list[dict[str, Any]]:
        from pipeline.tracking import STEP_METRICS

        run = self.server.run(self.run_id)
        params = {p["key"]: p["value"] for p in run.get("data", {}).get("params", [])}
        latest = {m["key"]: int(m.get("step", 0)) for m in run.get("data", {}).get("metrics", [])}
        status = run["info"]["status"]
        tags = {t["key"]: t["value"] for t in run.get("data", {}).get("tags", [])}
        warmup = _warmup_end(params, tags)
        xbm = int(params.get("train.xbm_steps", 0) or 0)
        main = "xbm" if params.get("memory.enabled", "True").lower() != "false" else "baseline"
        events: list[dict[str, Any]] = []
        if not self.started:
            self.started = True
            # MLflow params are strings; the monitor shows a few of them as they are.
            events.append({"kind": "start", "step": 0, "time": run["info"].get("start_time", 0) / 1000,
                           "run_id": self.run_id, "params": params, "total_steps": warmup + xbm or None})
            events.append({"kind": "phase", "step": 0, "time": 0.0, "phase": "warmup"})

        # Steps: up to the newest step of loss (the first metric of each step the pipeline logs).
        top = min(latest.get("loss", 0), self.frontier + STEPS_PER_POLL)
        if top > self.frontier:
            rows: dict[int, dict[str, Any]] = {}
            for key in STEP_METRICS:
                if latest.get(key, -1) <= self.frontier:
                    continue  # nothing new (or never logged, like loss_memory in the warm-up)
                for m in self.server.history(self.run_id, key, self.frontier + 1, top):
                    row = rows.setdefault(int(m["step"]), {})
                    row[key] = float(m["value"])
                    if key == "loss":
                        row["time"] = int(m["timestamp"]) / 1000
            for step in sorted(rows):
                row = rows[step]
                if "loss" not in row:
                    continue  # a metric logged at a step without a training step (the memory fill at init)
                phase = "warmup" if step <= warmup else main
                if phase != self.phase and phase != "warmup":
                    # as a local run says it: memory init, then the phase, both at the last warm-up step
                    events += [{"kind": "phase", "step": warmup, "time": row["time"], "phase": p}
                               for p in ("memory_init", phase)]
                self.phase = phase
                ev = {"kind": "step", "step": step, "time": row.pop("time"), "phase": phase}
                ev.update({k: row.get(k) for k in STEP_METRICS})
                ev["memory_size"] = None  # K is not in the run's metrics (the fill is)
                events.append(ev)
            self.frontier = top

        # Evaluations: val/<metric> during training, test/<metric> at the end (logged with "@" spelt "_at_",
        # see pipeline.tracking.metric_name).
        evals: dict[tuple[str, int], dict[str, float]] = {}
        for key, step in latest.items():
            split, _, name = key.partition("/")
            if split not in ("val", "test") or step <= self.eval_seen.get(key, -1):
                continue
            for m in self.server.history(self.run_id, key, self.eval_seen.get(key, -1) + 1, step):
                evals.setdefault((split, int(m["step"])), {})[name.replace("_at_", "@")] = float(m["value"])
            self.eval_seen[key] = step
        for (split, step), metrics in sorted(evals.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            if split == "test" and self.phase != "evaluate":
                events.append({"kind": "phase", "step": step, "time": time.time(), "phase": "evaluate"})
                self.phase = "evaluate"
            events.append({"kind": "eval", "step": step, "time": time.time(), "split": split, "metrics": metrics})

        # Memory views (xbmcore.memory_view): the JSON artifacts the run's MLflowSink logs at each evaluation and
        # at the end, each the memory_view event itself; listed every VIEWS_EVERY_S while the run logs views.
        if "memory_view/active_negatives" in latest and not self.views_final and \
                (status in TERMINAL or time.monotonic() - self.views_listed >= self.VIEWS_EVERY_S):
            self.views_listed, self.views_final = time.monotonic(), status in TERMINAL
            for path in sorted(self.server.artifacts(self.run_id, "memory_view")):
                if path.endswith(".json") and path not in self.views_loaded:
                    ev = self.server.artifact_json(self.run_id, path)
                    self.views_loaded.add(path)
                    if isinstance(ev, dict) and ev.get("kind") == "memory_view":
                        events.append(ev)

        if status in TERMINAL and not self.ended:
            self.ended = True
            events.append({"kind": "end", "step": self.frontier, "time": time.time(), "status": TERMINAL[status],
                           "message": f"run {status.lower()} on the server"})
        elif status == "RUNNING" and self.ended:  # resumed (a stage started again)
            self.ended = False
        return events


# --- the worker thread ---------------------------------------------------------------------------------------

class _RemoteWorker(PollingWorker):
    runs = Signal(object)          # list[ActiveRun]
    switched = Signal(str)         # now following this run (the plots restart)
    batch = Signal(object)         # EventBatch
    health = Signal(bool, str)     # the server answered?, what to say in the status bar

    def __init__(self, interval_ms: int, timeout: tuple[float, float]):
        super().__init__(interval_ms)
        self._timeout = timeout
        self._server: Server | None = None
        self._want: str | None = None     # a run id, "" for the newest active run, None: not following
        self._run: RemoteRun | None = None
        self._phase: str | None = None

    @Slot(str)
    def set_server(self, uri: str) -> None:
        self._server = Server(uri, self._timeout) if is_server(uri) else None
        self._run = None
        self.poll()

    @Slot(str)
    def follow(self, run_id: str) -> None:
        self._want, self._run = run_id, None
        self.poll()

    @Slot()
    def unfollow(self) -> None:
        self._want, self._run = None, None

    @Slot()
    def poll(self) -> None:
        if self._server is None:
            return
        t0 = time.monotonic()
        try:
            active = self._server.active_runs()
            self.runs.emit(active)
            target = self._want
            if target == "":
                target = active[0].run_id if active else None
            if target is not None and (self._run is None or self._run.run_id != target):
                self._run = RemoteRun(self._server, target)
                self._phase = None
                name = next((r.name for r in active if r.run_id == target), None)
                self.switched.emit(f"{self._server.uri} · " + (f"{name} ({target[:8]})" if name else f"run {target}"))
            if self._want is not None and self._run is not None:
                events = self._run.poll()
                for i in range(0, len(events), 20_000):
                    b = EventBatch.from_events(events[i:i + 20_000], self._phase)
                    self._phase = b.last_phase
                    self.batch.emit(b)
        except ServerError as err:
            self.health.emit(False, f"tracking server: {err}; retrying every {self._interval_ms / 1000:g} s")
            return
        ms = (time.monotonic() - t0) * 1000
        n = len(active)
        self.health.emit(True, f"tracking server {self._server.uri}: {n} active run{'s' * (n != 1)} · "
                               f"poll {ms:.0f} ms · {time.strftime('%H:%M:%S')}")


class RemoteTail(QObject):
    """GUI-thread handle on the server poller: set_server, follow(run id or "" = newest active run), unfollow."""

    runs = Signal(object)
    switched = Signal(str)
    batch = Signal(object)
    health = Signal(bool, str)
    _set_server = Signal(str)
    _follow = Signal(str)
    _unfollow = Signal()
    _stop = Signal()

    def __init__(self, interval_ms: int = 2000, timeout: tuple[float, float] = TIMEOUT,
                 parent: QObject | None = None):
        super().__init__(parent)
        self.uri: str | None = None
        self._thread = QThread()
        self._thread.setObjectName("mlflow-remote")
        self._worker = _RemoteWorker(interval_ms, timeout)
        self._worker.moveToThread(self._thread)
        self._thread.started.connect(self._worker.start)
        self._thread.finished.connect(self._worker.deleteLater)
        for name in ("runs", "switched", "batch", "health"):
            getattr(self._worker, name).connect(getattr(self, name))
        self._set_server.connect(self._worker.set_server)
        self._follow.connect(self._worker.follow)
        self._unfollow.connect(self._worker.unfollow)
        self._stop.connect(self._worker.stop)
        self._thread.start()

    def set_server(self, uri: str | None) -> None:
        self.uri = uri if is_server(uri) else None
        self._set_server.emit(self.uri or "")

    def follow(self, run_id: str = "") -> None:
        self._follow.emit(run_id)

    def unfollow(self) -> None:
        self._unfollow.emit()

    def shutdown(self) -> None:
        if self._thread.isRunning():
            self._stop.emit()
            self._thread.quit()
            self._thread.wait(20_000)  # a request in flight ends within its timeout
