"""The event stream: StepRecord's schema round-trips through a JSON-lines file, and the incremental reader keeps a
partial last line for the next poll and counts (and skips) lines that are not events."""
from __future__ import annotations

import json
import math
import typing
from dataclasses import asdict, fields

import pytest

from xbmcore.events import (
    HISTORY_FIELDS, KINDS, METRIC_FIELDS, STEP_FIELDS, EventReader, JsonlSink, StepRecord, make_event, read_events,
)


def record(**over) -> StepRecord:
    values = dict(step=7, phase="xbm", loss=0.5, loss_batch=0.25, loss_memory=0.25, pos_pairs=4, neg_pairs=12,
                  mem_pos_pairs=30, mem_neg_pairs=900, memory_fill=0.75, memory_size=48, drift=0.01, drift_age=3.5,
                  lr=1e-4, images_per_s=123.0)
    values.update(over)
    return StepRecord.of(**values)


def test_the_field_lists_derive_from_the_record():
    names = [f.name for f in fields(StepRecord)]
    assert list(STEP_FIELDS) == names[1:]  # all but the step itself
    assert set(HISTORY_FIELDS) == set(names) - {"memory_size", "images_per_s"}  # a count and a timing
    assert set(METRIC_FIELDS) == set(names) - {"step", "phase", "memory_size"}


def test_a_step_record_round_trips_through_a_file(tmp_path):
    sink = JsonlSink(tmp_path / "events.jsonl")
    rec = record()
    sink.emit(rec.event())
    sink.close()
    (ev,) = read_events(tmp_path / "events.jsonl")
    assert ev["kind"] == "step" and isinstance(ev["time"], float)
    back = StepRecord.of(step=ev["step"], **{k: ev[k] for k in STEP_FIELDS})
    assert back == rec
    hints = typing.get_type_hints(StepRecord)
    for name, value in asdict(back).items():  # each value has its declared type after the trip
        want = {int: int, float: float, str: str}.get(hints[name], float)
        assert isinstance(value, want), (name, value)


def test_of_converts_to_the_declared_types_and_keeps_none():
    rec = record(pos_pairs=4.0, memory_size=48.0, loss="0.5", drift=None, drift_age=None)
    assert type(rec.pos_pairs) is int and type(rec.memory_size) is int and rec.loss == 0.5
    assert rec.drift is None and rec.drift_age is None


def test_a_non_finite_loss_is_written_as_null():
    ev = record(loss=math.nan, loss_batch=math.inf).event()
    line = json.dumps(ev)  # valid JSON: NaN and inf are not
    assert json.loads(line)["loss"] is None and json.loads(line)["loss_batch"] is None


def test_make_event_refuses_unknown_kinds_and_incomplete_steps():
    with pytest.raises(ValueError, match="event kind must be one of"):
        make_event("stp", 1)
    fields_ = {k: 0 for k in STEP_FIELDS if k != "lr"}
    with pytest.raises(ValueError, match=r"missing fields \['lr'\]"):
        make_event("step", 1, **fields_)
    assert set(KINDS) >= {"start", "phase", "step", "eval", "drift", "checkpoint", "end"}


def test_the_reader_keeps_a_partial_line_and_skips_bad_ones(tmp_path):
    path = tmp_path / "events.jsonl"
    reader = EventReader(path)
    assert reader.poll() == []  # no file yet
    a, b = make_event("phase", 0, phase="warmup"), record(step=1).event()
    line_b = json.dumps(b)
    with open(path, "w") as f:
        f.write(json.dumps(a) + "\n" + line_b[:20])  # a writer half-way through line b
    assert reader.poll() == [a] and reader.bad_lines == 0
    with open(path, "a") as f:
        f.write(line_b[20:] + "\n")
        f.write('{"kind": "step", "step": 2, "loss": \n')  # a complete line cut short: not JSON
        f.write('["a list"]\n{"kind": "nonsense", "step": 3}\n{"kind": "eval"}\n\n')  # JSON, not events
        f.write(json.dumps(make_event("end", 9, status="finished")) + "\n")
    got = reader.poll()
    assert [e["kind"] for e in got] == ["step", "end"] and got[0] == b
    assert reader.bad_lines == 4
    assert reader.poll() == []  # nothing new
    assert reader.offset == path.stat().st_size


def test_a_memory_view_event_round_trips_through_a_file(tmp_path):
    from xbmcore.events import MEMORY_VIEW_ANCHOR_FIELDS, MEMORY_VIEW_FIELDS, MEMORY_VIEW_NEGATIVE_FIELDS

    neg = dict(index=41, sim=0.625, age=120, label=3, same_super=True)
    view = dict(phase="xbm", k=1, anchors=[dict(index=7, label=2, super=0, negatives=[neg])],
                age_edges=[0, 10], age_hist=[0, 1], age_quantiles={"p10": 120.0, "p50": 120.0, "p90": 120.0},
                active_negatives=1, super_share=1.0, topk_super_share=1.0, memory_size=48)
    sink = JsonlSink(tmp_path / "events.jsonl")
    sink.emit(make_event("memory_view", 500, **view))
    sink.close()
    (ev,) = read_events(tmp_path / "events.jsonl")
    assert ev["kind"] == "memory_view" and ev["step"] == 500
    assert {k: ev[k] for k in MEMORY_VIEW_FIELDS} == view
    assert set(ev["anchors"][0]) == set(MEMORY_VIEW_ANCHOR_FIELDS)
    assert set(ev["anchors"][0]["negatives"][0]) == set(MEMORY_VIEW_NEGATIVE_FIELDS)
    with pytest.raises(ValueError, match=r"memory_view event is missing fields \['memory_size'\]"):
        make_event("memory_view", 1, **{k: v for k, v in view.items() if k != "memory_size"})
