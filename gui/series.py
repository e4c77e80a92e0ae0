"""The live model of one run: events turned into growable numpy columns the plots draw from.

No Qt here. `EventBatch.from_events` does the per-event Python work (it runs in the tail's worker thread);
`RunData.add` appends whole numpy columns, one extend per curve between two of the rare other events (it runs in
the GUI thread and stays cheap at any size).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xbmcore.events import NUMERIC_FIELDS

# The step event's numeric fields become curves (phase is a label).
CURVES = NUMERIC_FIELDS


class Series:
    """Growable (x, y) float64 buffers: preallocated and doubled when full, so n appends cost O(n) in total."""

    def __init__(self, capacity: int = 1024):
        self._x = np.empty(capacity)
        self._y = np.empty(capacity)
        self.n = 0

    def __len__(self) -> int:
        return self.n

    def extend(self, x: np.ndarray, y: np.ndarray) -> None:
        k = len(x)
        if k != len(y):
            raise ValueError(f"Series.extend: x has {k} values, y has {len(y)}")
        need = self.n + k
        if need > len(self._x):
            cap = max(len(self._x), 1)
            while cap < need:
                cap *= 2
            for name in ("_x", "_y"):
                grown = np.empty(cap)
                grown[: self.n] = getattr(self, name)[: self.n]
                setattr(self, name, grown)
        self._x[self.n:need] = x
        self._y[self.n:need] = y
        self.n = need

    def append(self, x: float, y: float) -> None:
        self.extend(np.array([x], float), np.array([y], float))

    @property
    def x(self) -> np.ndarray:
        return self._x[: self.n]  # a view: no copy per redraw

    @property
    def y(self) -> np.ndarray:
        return self._y[: self.n]

    def last(self) -> float | None:
        return float(self._y[self.n - 1]) if self.n else None

    def rewind(self, x0: float) -> None:
        """Drop the points with x >= x0 (x is kept increasing, so this is a binary search)."""
        self.n = int(np.searchsorted(self._x[: self.n], x0))


def moving_average(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last `window` finite values; NaN (a null in the events) stays a gap."""
    if window <= 1 or len(y) == 0:
        return y
    ok = np.isfinite(y)
    csum = np.concatenate(([0.0], np.cumsum(np.where(ok, y, 0.0))))
    cnt = np.concatenate(([0], np.cumsum(ok)))
    hi = np.arange(1, len(y) + 1)
    lo = np.maximum(hi - window, 0)
    out = (csum[hi] - csum[lo]) / np.maximum(cnt[hi] - cnt[lo], 1)
    out[~ok] = np.nan
    return out


@dataclass
class EventBatch:
    """Events of one poll in columns: step events as arrays, the rare kinds kept as dicts in order."""

    steps: np.ndarray                      # global step of each step event
    times: np.ndarray                      # unix seconds of each step event
    columns: dict[str, np.ndarray]         # CURVES -> values (NaN where the event had null)
    phase_changes: list[tuple[int, str]]   # (step, phase) where the phase differs from the event before
    others: list[dict[str, Any]]           # start / phase / eval / drift / checkpoint / end events
    last_phase: str | None = None
    # for each of `others`, how many step events came before it in the batch (so that add() keeps the order)
    others_at: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.steps) + len(self.others)

    @classmethod
    def from_events(cls, events: list[dict[str, Any]], prev_phase: str | None = None) -> "EventBatch":
        step_events = []
        others = []
        changes: list[tuple[int, str]] = []
        others_at: list[int] = []
        phase = prev_phase
        for ev in events:
            kind = ev["kind"]
            if kind == "step":
                step_events.append(ev)
            else:
                others.append(ev)
                others_at.append(len(step_events))
            p = ev.get("phase") if kind in ("step", "phase") else None
            if p is not None and p != phase:
                changes.append((int(ev["step"]), p))
                phase = p
        # dtype=float turns null (None) into NaN, which the curves draw as gaps.
        columns = {f: np.array([ev.get(f) for ev in step_events], dtype=float) for f in CURVES}
        return cls(
            steps=np.array([ev["step"] for ev in step_events], dtype=float),
            times=np.array([ev.get("time", np.nan) for ev in step_events], dtype=float),
            columns=columns,
            phase_changes=changes,
            others=others,
            last_phase=phase,
            others_at=others_at,
        )


@dataclass
class RunData:
    """Everything the monitor shows about one run, accumulated from event batches."""

    curves: dict[str, Series] = field(default_factory=lambda: {f: Series() for f in CURVES})
    step_times: Series = field(default_factory=Series)            # x = step, y = unix time
    evals: dict[str, Series] = field(default_factory=dict)        # "val/recall@1", "drift/D_100" -> Series
    phases: list[tuple[int, str]] = field(default_factory=list)   # (first step, phase)
    run_id: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    total_steps: int | None = None      # the whole run's, as announced by the latest start event
    last_step: int | None = None
    status: str | None = None           # from the end event: finished | failed | stopped
    message: str | None = None
    checkpoint: str | None = None
    events: int = 0

    @property
    def phase(self) -> str | None:
        return self.phases[-1][1] if self.phases else None

    def add(self, batch: EventBatch) -> None:
        """Append a batch, in event order. A training phase event's `resume_from` says from which step the run
        continues: the points after it (written by an earlier execution into the same file, or before a kill
        since the last checkpoint) are dropped, so the curves never step back."""
        self.events += len(batch)
        a = 0
        for ev, at in zip(batch.others, batch.others_at):
            self._extend(batch, a, at)
            a = at
            if ev["kind"] == "phase" and ev.get("resume_from") is not None:
                self._rewind(int(ev["resume_from"]) + 1)
                self.last_step = min(self.last_step, int(ev["resume_from"])) if self.last_step is not None else None
                self.status = None
            self._other(ev)
        self._extend(batch, a, len(batch.steps))
        for step, phase in batch.phase_changes:
            if not self.phases or self.phases[-1][1] != phase:
                self.phases.append((step, phase))

    def _extend(self, batch: EventBatch, a: int, b: int) -> None:
        if a == b:
            return
        steps = batch.steps
        if self.last_step is not None and steps[a] <= self.last_step:  # an events file without resume_from
            self._rewind(steps[a])
        for f, s in self.curves.items():
            s.extend(steps[a:b], batch.columns[f][a:b])
        self.step_times.extend(steps[a:b], batch.times[a:b])
        self.last_step = int(steps[b - 1])
        self.status = None  # steps after an `end` event: the run was resumed

    def _rewind(self, x0: float) -> None:
        for s in (*self.curves.values(), self.step_times, *self.evals.values()):
            s.rewind(x0)
        self.phases = [(st, ph) for st, ph in self.phases if st < x0] or self.phases[:1]

    def _other(self, ev: dict[str, Any]) -> None:
        kind = ev["kind"]
        if kind == "start":
            self.run_id = ev.get("run_id") or self.run_id
            self.params.update(ev.get("params") or {})
            self.total_steps = ev.get("total_steps") or self.total_steps
            self.status = None
        elif kind == "eval":
            for name, value in (ev.get("metrics") or {}).items():
                key = f"{ev.get('split', 'val')}/{name}"
                self.evals.setdefault(key, Series(64)).append(ev["step"], np.nan if value is None else value)
        elif kind == "drift":  # the drift probe's D(t; dt), one sparse series per dt, kept with the evaluations
            for dt, value in (ev.get("D") or {}).items():
                self.evals.setdefault(f"drift/D_{dt}", Series(64)).append(ev["step"], np.nan if value is None else value)
            # the backbone's D, how directed the drift is, and where the memory term's gradient comes from
            for dt, value in (ev.get("D_backbone") or {}).items():
                self._sparse(f"drift/backbone_{dt}", ev["step"], value)
            st = ev.get("staleness") or {}
            share = st.get("grad_share") or {}
            for key, value in (("drift/directed", ev.get("directed")), ("drift/cos10", ev.get("cos10")),
                               ("memory/active_neg_age", st.get("active_neg_age")),
                               ("memory/grad_old", None if not share else
                                sum(v or 0.0 for b, v in share.items() if b in ("100-1000", "1000+")))):
                if key in self.evals or value is not None:
                    self._sparse(key, ev["step"], value)
        elif kind == "checkpoint":
            self.checkpoint = ev.get("path")
        elif kind == "end":
            self.status = ev.get("status")
            self.message = ev.get("message")

    def _sparse(self, key: str, step: int, value: float | None) -> None:
        self.evals.setdefault(key, Series(64)).append(step, np.nan if value is None else value)

    def steps_per_s(self, window: int = 50) -> float | None:
        """Recent training speed from step timestamps, over at most `window` steps of the current phase."""
        s = self.step_times
        if s.n < 2:
            return None
        first = s.n - 1 - min(window, s.n - 1)
        if self.phases:  # never span a phase switch (memory init or evaluation in between)
            start = self.phases[-1][0]
            first = max(first, int(np.searchsorted(s.x[: s.n], start)))
        ds = s.x[s.n - 1] - s.x[first]
        dt = s.y[s.n - 1] - s.y[first]
        if ds <= 0 or not dt > 0:
            return None
        return float(ds / dt)

    def eta_s(self) -> float | None:
        """Seconds to the announced total at the recent speed; None while either is unknown."""
        if self.total_steps is None or self.last_step is None or self.status is not None:
            return None
        rate = self.steps_per_s()
        if not rate:
            return None
        return max(0.0, (self.total_steps - self.last_step) / rate)  # the trainer's steps count 1..total
