"""The one event stream of a run: written by the trainer, read by the GUI, MLflow glue and tests.

Each event is one JSON object on one line of `events.jsonl`. Appending whole lines and flushing after each keeps
the file readable after a crash (at worst the last line is partial, and readers skip it and count it).

Kinds and their fields (all events also carry `kind`, `time` (unix seconds) and `step` (global optimiser step)):
  start       run_id, run_key, stage, params (flat dict), total_steps, numerics (what the stage's process computes
              with: portable mode, the kernels' instruction-set levels; xbmcore.portable.report)
  phase       phase ("warmup" | "memory_init" | "xbm" | "baseline" | "evaluate"), total_steps; for a training
              phase also start_step, resumed and resume_from: the step it continues from (start_step when it
              starts afresh, the checkpoint's step when it resumes). Steps after resume_from that an earlier
              execution wrote to the same file are superseded: readers drop their points with step > resume_from.
  step        the fields of `StepRecord` (STEP_FIELDS), typed as it declares them
  eval        phase, split, metrics ({"recall@1": ..., "map@r": ...})
  drift       phase, D ({"10": D(t; 10), "100": ..., ...}: the drift probe's mean ||f_t(x) - f_{t-dt}(x)||^2,
              for the dts whose earlier snapshot exists; xbmcore.drift)
  memory_view phase, k, anchors ([{index, label, super, negatives: [{index, sim, age, label, same_super}]}]: each
              probe anchor's k hardest memory negatives, best first), age_edges, age_hist (the active negatives'
              ages per bin), age_quantiles ({"p10", "p50", "p90"}), active_negatives, super_share,
              topk_super_share, memory_size (xbmcore.memory_view; MEMORY_VIEW_FIELDS)
  checkpoint  path
  end         status ("finished" | "failed" | "stopped"), message
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Optional, Protocol

KINDS = ("start", "phase", "step", "eval", "drift", "memory_view", "checkpoint", "end")
# The memory_view event's fields (besides kind/time/step), an anchor's and a negative's (xbmcore.memory_view).
MEMORY_VIEW_FIELDS = ("phase", "k", "anchors", "age_edges", "age_hist", "age_quantiles", "active_negatives",
                      "super_share", "topk_super_share", "memory_size")
MEMORY_VIEW_ANCHOR_FIELDS = ("index", "label", "super", "negatives")
MEMORY_VIEW_NEGATIVE_FIELDS = ("index", "sim", "age", "label", "same_super")
PHASES = ("warmup", "memory_init", "xbm", "baseline", "evaluate")


def _f(curve: bool = True, metric: bool = True):
    # curve: a column of the training curves (checkpointed history, plots/train.csv); metric: an MLflow metric.
    return field(metadata={"curve": curve, "metric": metric})


@dataclass
class StepRecord:
    """One optimiser step, the one list of its fields: the `step` event's schema, the history columns (and the
    plots header), and the MLflow metric names are all derived from it.

    Attributes:
        step: the global optimiser step, 1-based, counted across phases.
        phase: the phase the step belongs to (``"warmup"``, ``"xbm"``, ``"baseline"``).
        loss: the objective XBMObjective minimised; None (JSON null) when not finite.
        loss_batch: L(batch, batch), the batch term.
        loss_memory: L(batch, memory), the memory term before its weight (0 without a memory).
        pos_pairs: active positive pairs of the batch term.
        neg_pairs: active negative pairs of the batch term.
        mem_pos_pairs: active positive pairs of the memory term.
        mem_neg_pairs: active negative pairs of the memory term.
        memory_fill: the memory's fill level, 0..1 (0 without a memory).
        memory_size: entries stored (memory_fill x K); not a curve, not a metric.
        drift: mean ||new - old||^2 of the images that re-entered the memory at this step; None when none did.
        drift_age: mean age in steps of the embeddings they replaced; None when none did.
        lr: the learning rate of the step.
        images_per_s: training throughput (a timing: kept out of the curves, which are reproducible).
    """

    step: int = _f(metric=False)  # global optimiser step, 1-based
    phase: str = _f(metric=False)
    loss: Optional[float] = _f()  # None (JSON null) when not finite
    loss_batch: Optional[float] = _f()
    loss_memory: Optional[float] = _f()
    pos_pairs: int = _f()  # active pairs of the batch term
    neg_pairs: int = _f()
    mem_pos_pairs: int = _f()  # active pairs of the memory term
    mem_neg_pairs: int = _f()
    memory_fill: float = _f()  # 0..1
    memory_size: int = _f(curve=False, metric=False)  # entries stored (memory_fill x K)
    drift: Optional[float] = _f()  # mean ||new - old||^2 of the re-entering images, None when none re-entered
    drift_age: Optional[float] = _f()  # mean age in steps of the replaced embeddings
    lr: float = _f()
    images_per_s: float = _f(curve=False)  # a timing: kept out of the curves, which are reproducible

    @classmethod
    def of(cls, **values: Any) -> "StepRecord":
        """A record with each value converted to its declared type (counts to int, the rest to float or str).

        Args:
            **values: one value per field (tensors' Python numbers, numpy scalars, ...); None stays None.

        Returns:
            The record.

        Raises:
            KeyError: a field without a value.
        """
        return cls(**{f.name: None if values[f.name] is None else _CONVERT[f.type](values[f.name])
                      for f in _RECORD})

    def event(self) -> dict[str, Any]:
        """The record as a ``step`` event (`make_event`), ready for a Sink.

        Returns:
            ``{"kind": "step", "time": ..., "step": ..., <the other fields>}``.
        """
        fields_ = asdict(self)
        return make_event("step", fields_.pop("step"), **fields_)


_RECORD = fields(StepRecord)
_CONVERT = {"int": int, "float": float, "Optional[float]": float, "str": str}
# The `step` event's fields besides kind/time/step, the history columns, the MLflow metrics.
STEP_FIELDS = tuple(f.name for f in _RECORD if f.name != "step")
HISTORY_FIELDS = tuple(f.name for f in _RECORD if f.metadata["curve"])
METRIC_FIELDS = tuple(f.name for f in _RECORD if f.metadata["metric"])
# Numeric fields (curves a reader may draw); phase is a label.
NUMERIC_FIELDS = tuple(f.name for f in _RECORD if f.name not in ("step", "phase"))


def _clean(v: Any) -> Any:
    # JSON has no NaN/inf; keep the line valid and let readers see null.
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def make_event(kind: str, step: int, **fields: Any) -> dict[str, Any]:
    """An event: `kind`, the current unix time, `step` and the fields; non-finite floats become None.

    Args:
        kind: one of `KINDS` (start, phase, step, eval, drift, memory_view, checkpoint, end; see the module
            docstring).
        step: the global optimiser step the event belongs to.
        **fields: the kind's fields (a ``step`` event needs every one of `STEP_FIELDS`, a ``memory_view`` event
            every one of `MEMORY_VIEW_FIELDS`), JSON-serialisable.

    Returns:
        The event as a dict, one JSON line of ``events.jsonl`` once a sink writes it.

    Raises:
        ValueError: an unknown kind, or a step or memory_view event without all its fields.
    """
    if kind not in KINDS:
        raise ValueError(f"event kind must be one of {KINDS}, got {kind!r}")
    if kind in ("step", "memory_view"):
        missing = [f for f in (STEP_FIELDS if kind == "step" else MEMORY_VIEW_FIELDS) if f not in fields]
        if missing:
            raise ValueError(f"{kind} event is missing fields {missing}")
    ev = {"kind": kind, "time": time.time(), "step": int(step)}
    ev.update({k: _clean(v) for k, v in fields.items()})
    return ev


class Sink(Protocol):
    """Where a run's events go: anything with these two methods (the trainer calls `emit` only)."""

    def emit(self, event: dict[str, Any]) -> None:
        """Take one event.

        Args:
            event: an event from `make_event`.
        """
        ...

    def close(self) -> None:
        """Flush and release what the sink holds; no event follows."""
        ...


class NullSink:
    """Drops every event: a rank other than 0, a benchmark."""

    def emit(self, event: dict[str, Any]) -> None:
        """Drop the event.

        Args:
            event: any event.
        """
        pass

    def close(self) -> None:
        """Nothing to close."""
        pass


class JsonlSink:
    """Append-only JSON-lines file, flushed per event so a tailing reader sees each step at once.

    Args:
        path: the events file (``events.jsonl``); its folder is created, an existing file is appended to.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def emit(self, event: dict[str, Any]) -> None:
        """Append the event as one JSON line and flush it.

        Args:
            event: an event from `make_event`.
        """
        self._f.write(json.dumps(event, separators=(",", ":")) + "\n")
        self._f.flush()

    def close(self) -> None:
        """Flush, fsync and close the file (again: a no-op)."""
        if not self._f.closed:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()


class ProgressSink:
    """tqdm bar over the steps, only when stderr is a terminal (never clutters logs or DVC output).

    Args:
        total: unused (each ``phase`` event gives its phase's total steps).
        enabled: show the bar; None: only when stderr is a terminal.
    """

    def __init__(self, total: int | None = None, enabled: bool | None = None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._bar = None
        self._total = total

    def emit(self, event: dict[str, Any]) -> None:
        """A ``phase`` event starts a bar over its steps, a ``step`` event advances it (with loss and fill).

        Args:
            event: an event from `make_event`; other kinds are ignored.
        """
        if not self.enabled:
            return
        from tqdm import tqdm

        if event["kind"] == "phase":
            if self._bar is not None:
                self._bar.close()
            done = event.get("resume_from", 0) - event.get("start_step", 0)  # a resumed phase's steps so far
            self._bar = tqdm(total=event.get("total_steps"), desc=event["phase"], initial=done, dynamic_ncols=True)
        elif event["kind"] == "step" and self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{event['loss']:.4f}" if event["loss"] is not None else "nan",
                                  fill=f"{event['memory_fill']:.2f}")

    def close(self) -> None:
        """Close the current bar."""
        if self._bar is not None:
            self._bar.close()


class MultiSink:
    """Several sinks as one: each event goes to every sink, in order.

    Args:
        sinks: the sinks (e.g. a JsonlSink and a ProgressSink).
    """

    def __init__(self, sinks: Iterable[Sink]):
        self.sinks = list(sinks)

    def emit(self, event: dict[str, Any]) -> None:
        """Pass the event to every sink.

        Args:
            event: an event from `make_event`.
        """
        for s in self.sinks:
            s.emit(event)

    def close(self) -> None:
        """Close every sink."""
        for s in self.sinks:
            s.close()


@dataclass
class EventReader:
    """Incremental reader for a growing events.jsonl (the GUI polls it; tests read it whole).

    Keeps the byte offset of the last complete line; a partial last line is left for the next poll, a complete
    line that is not a valid event is skipped and counted in `bad_lines`.

    Attributes:
        path: the events file (it may not exist yet).
        offset: the byte offset up to which the file has been read.
        bad_lines: complete lines skipped because they are not valid events.
    """

    path: Path
    offset: int = 0
    bad_lines: int = 0
    _pending: bytes = field(default=b"", repr=False)

    def poll(self) -> list[dict[str, Any]]:
        """The events completed since the last poll.

        Returns:
            The new events in file order; empty when nothing new (or no file yet).
        """
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        if not chunk:
            return []
        data = self._pending + chunk
        self.offset += len(chunk)
        lines = data.split(b"\n")
        self._pending = lines.pop()  # b"" when data ended with a newline
        events = []
        for line in lines:
            if not line.strip():
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                self.bad_lines += 1
                continue
            if not isinstance(ev, dict) or ev.get("kind") not in KINDS or "step" not in ev:
                self.bad_lines += 1
                continue
            events.append(ev)
        return events


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """Every complete, valid event of an events file.

    Args:
        path: the ``events.jsonl`` file.

    Returns:
        The events in file order (a partial last line and invalid lines left out); empty without the file.
    """
    return EventReader(Path(path)).poll()
