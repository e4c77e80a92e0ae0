"""The one event stream of a run: written by the trainer, read by the GUI, MLflow glue and tests.

Each event is one JSON object on one line of `events.jsonl`. Appending whole lines and flushing after each keeps
the file readable after a crash (at worst the last line is partial, and readers skip it and count it).

Kinds and their fields (all events also carry `kind`, `time` (unix seconds) and `step` (global optimiser step)):
  start       run_id, params (flat dict), total_steps
  phase       phase ("warmup" | "memory_init" | "xbm" | "baseline" | "evaluate"), total_steps
  step        phase, loss, loss_batch, loss_memory, pos_pairs, neg_pairs, mem_pos_pairs, mem_neg_pairs,
              memory_fill (0..1), memory_size (entries stored), drift (mean ||new-old||^2 of this step or null),
              drift_age (mean age in steps of the replaced embeddings, or null), lr, images_per_s
  eval        phase, split, metrics ({"recall@1": ..., "map@r": ...})
  drift       phase, D ({"10": D(t; 10), "100": ..., ...}: the drift probe's mean ||f_t(x) - f_{t-dt}(x)||^2,
              for the dts whose earlier snapshot exists; xbmcore.drift)
  checkpoint  path
  end         status ("finished" | "failed" | "stopped"), message
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol

KINDS = ("start", "phase", "step", "eval", "drift", "checkpoint", "end")
PHASES = ("warmup", "memory_init", "xbm", "baseline", "evaluate")

# Fields every `step` event carries; sinks and readers rely on this list instead of guessing.
STEP_FIELDS = (
    "phase", "loss", "loss_batch", "loss_memory", "pos_pairs", "neg_pairs", "mem_pos_pairs", "mem_neg_pairs",
    "memory_fill", "memory_size", "drift", "drift_age", "lr", "images_per_s",
)


def _clean(v: Any) -> Any:
    # JSON has no NaN/inf; keep the line valid and let readers see null.
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def make_event(kind: str, step: int, **fields: Any) -> dict[str, Any]:
    if kind not in KINDS:
        raise ValueError(f"event kind must be one of {KINDS}, got {kind!r}")
    if kind == "step":
        missing = [f for f in STEP_FIELDS if f not in fields]
        if missing:
            raise ValueError(f"step event is missing fields {missing}")
    ev = {"kind": kind, "time": time.time(), "step": int(step)}
    ev.update({k: _clean(v) for k, v in fields.items()})
    return ev


class Sink(Protocol):
    def emit(self, event: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class JsonlSink:
    """Append-only JSON-lines file, flushed per event so a tailing reader sees each step at once."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def emit(self, event: dict[str, Any]) -> None:
        self._f.write(json.dumps(event, separators=(",", ":")) + "\n")
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()


class ProgressSink:
    """tqdm bar over the steps, only when stderr is a terminal (never clutters logs or DVC output)."""

    def __init__(self, total: int | None = None, enabled: bool | None = None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._bar = None
        self._total = total

    def emit(self, event: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if event["kind"] == "phase":
            if self._bar is not None:
                self._bar.close()
            self._bar = tqdm(total=event.get("total_steps"), desc=event["phase"], initial=0, dynamic_ncols=True)
        elif event["kind"] == "step" and self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{event['loss']:.4f}" if event["loss"] is not None else "nan",
                                  fill=f"{event['memory_fill']:.2f}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class MultiSink:
    def __init__(self, sinks: Iterable[Sink]):
        self.sinks = list(sinks)

    def emit(self, event: dict[str, Any]) -> None:
        for s in self.sinks:
            s.emit(event)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


@dataclass
class EventReader:
    """Incremental reader for a growing events.jsonl (the GUI polls it; tests read it whole).

    Keeps the byte offset of the last complete line; a partial last line is left for the next poll, a complete
    line that is not a valid event is skipped and counted in `bad_lines`.
    """

    path: Path
    offset: int = 0
    bad_lines: int = 0
    _pending: bytes = field(default=b"", repr=False)

    def poll(self) -> list[dict[str, Any]]:
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
    return EventReader(Path(path)).poll()
