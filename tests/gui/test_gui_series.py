"""The event parser and the plot buffers alone (no window)."""
import json

import numpy as np
import pytest

from gui.series import EventBatch, RunData, Series, moving_average
from xbmcore.events import EventReader, JsonlSink, make_event

from gui_fake_run import step_fields


def _step(step, phase="warmup", **over):
    f = step_fields(step, phase, warmup=10, k=64)
    f.update(over)
    return make_event("step", step, **f)


def test_partial_line_waits_for_its_end(tmp_path):
    path = tmp_path / "events.jsonl"
    line = json.dumps(_step(0))
    path.write_text(line[:25])
    reader = EventReader(path)
    assert reader.poll() == [] and reader.bad_lines == 0
    with open(path, "a") as f:
        f.write(line[25:] + "\n")
    events = reader.poll()
    assert [e["step"] for e in events] == [0] and reader.bad_lines == 0


def test_malformed_lines_are_skipped_and_counted(tmp_path):
    path = tmp_path / "events.jsonl"
    sink = JsonlSink(path)
    sink.emit(_step(0))
    sink._f.write('{"kind": "step", "step": \n')       # torn JSON
    sink._f.write('{"kind": "banana", "step": 1}\n')    # valid JSON, not an event
    sink._f.write("[1, 2]\n")                           # not an object
    sink.emit(_step(1))
    sink.close()
    reader = EventReader(path)
    batch = EventBatch.from_events(reader.poll())
    assert reader.bad_lines == 3
    run = RunData()
    run.add(batch)
    assert run.curves["loss"].x.tolist() == [0.0, 1.0]


def test_batch_columns_nulls_and_phases():
    events = [make_event("phase", 0, phase="warmup", total_steps=2), _step(0), _step(1),
              make_event("phase", 2, phase="memory_init", total_steps=None),
              make_event("phase", 2, phase="xbm", total_steps=3),
              _step(2, "xbm", drift=None), _step(3, "xbm", drift=0.25),
              make_event("eval", 3, phase="xbm", split="val", metrics={"recall@1": 0.5, "map@r": None})]
    b = EventBatch.from_events(events)
    assert b.steps.tolist() == [0, 1, 2, 3]
    assert np.isnan(b.columns["drift"][2]) and b.columns["drift"][3] == 0.25
    assert b.phase_changes == [(0, "warmup"), (2, "memory_init"), (2, "xbm")]
    run = RunData()
    run.add(b)
    assert run.phase == "xbm"
    assert run.evals["val/recall@1"].y.tolist() == [0.5]
    assert np.isnan(run.evals["val/map@r"].y[0])
    # the next batch continues the phase: no new change is reported
    assert EventBatch.from_events([_step(4, "xbm")], b.last_phase).phase_changes == []


def test_series_grows_by_doubling_and_keeps_values():
    s = Series(capacity=4)
    caps = set()
    for i in range(0, 1000, 7):
        x = np.arange(i, min(i + 7, 1000), dtype=float)
        s.extend(x, -x)
        caps.add(len(s._x))
    assert s.x.tolist() == list(range(1000)) and s.y.tolist() == [-v for v in range(1000)]
    assert caps <= {4 * 2 ** k for k in range(12)}  # capacities are doublings of the first
    s.rewind(500)
    assert len(s) == 500 and s.last() == -499


def test_100k_points_appended_as_whole_columns(monkeypatch):
    """Columnising is per-event Python (the worker thread); the GUI thread's append is one extend per curve per
    batch, whatever its length: counted, not timed."""
    n = 100_000
    events = [_step(i, "warmup" if i < 10 else "xbm") for i in range(n)]
    batches = [EventBatch.from_events(events[i:i + 20_000]) for i in range(0, n, 20_000)]
    calls = []
    real = Series.extend
    monkeypatch.setattr(Series, "extend", lambda self, x, y: (calls.append(len(x)), real(self, x, y)))
    run = RunData()
    for b in batches:
        run.add(b)
    per_batch = len(run.curves) + 1  # the curves and the step times
    assert len(calls) == per_batch * len(batches) and set(calls) == {20_000}
    assert len(run.curves["loss"]) == n and run.last_step == n - 1
    assert run.curves["loss"].y[12345] == pytest.approx(events[12345]["loss"])


def test_resume_rewinds_to_the_restart_step():
    run = RunData()
    run.add(EventBatch.from_events([_step(i) for i in range(10)]))
    # killed after step 9, resumed from the checkpoint at step 6: steps 6.. come again
    run.add(EventBatch.from_events([_step(i) for i in range(6, 12)]))
    assert run.curves["loss"].x.tolist() == list(range(12))
    run.add(EventBatch.from_events([_step(3), _step(4)]))
    assert run.curves["loss"].x.tolist() == [0, 1, 2, 3, 4]


def test_moving_average_matches_a_loop():
    rng = np.random.default_rng(0)
    y = rng.normal(size=200)
    y[[5, 6, 50, 120]] = np.nan
    w = 7
    got = moving_average(y, w)
    for i in range(len(y)):
        if np.isnan(y[i]):
            assert np.isnan(got[i])
            continue
        window = [v for v in y[max(0, i - w + 1): i + 1] if not np.isnan(v)]
        assert got[i] == pytest.approx(sum(window) / len(window), abs=1e-12)
    assert moving_average(y, 1) is y


def test_speed_and_eta_from_step_times():
    events = [make_event("start", 0, run_id="r", params={}, total_steps=100)]
    for i in range(20):
        ev = _step(i)
        ev["time"] = 1000.0 + 0.5 * i  # 2 steps/s
        events.append(ev)
    run = RunData()
    run.add(EventBatch.from_events(events))
    assert run.steps_per_s() == pytest.approx(2.0)
    assert run.eta_s() == pytest.approx((100 - 19) / 2.0)
    run.add(EventBatch.from_events([make_event("end", 19, status="stopped", message="")]))
    assert run.status == "stopped" and run.eta_s() is None


def _execution(first, last, resume_from, evals, tag, phase_start=10):
    """One stage execution's events: start, the phase (continuing from resume_from), steps, evals."""
    evs = [make_event("start", 0, run_id="r", params={}, total_steps=40),
           make_event("phase", resume_from, phase="xbm", total_steps=30, start_step=phase_start,
                      resumed=resume_from != phase_start, resume_from=resume_from)]
    for s in range(first, last + 1):
        evs.append(_step(s, "xbm", loss=tag + s / 1000))
        if s in evals:
            evs.append(make_event("eval", s, phase="xbm", split="val", metrics={"recall@1": tag + s / 1000}))
    return evs


@pytest.mark.parametrize("chunk", [10_000, 7, 1])
def test_a_rerun_killed_and_resumed_in_one_file_draws_one_forward_curve(chunk):
    # A full run to 40; a forced rerun of the phase (from its start, 10) killed after 25; resumed from 20.
    events = (_execution(11, 40, 10, (20, 30, 40), 1) + _execution(11, 25, 10, (20,), 2)
              + _execution(21, 40, 20, (30, 40), 3))
    run = RunData()
    for i in range(0, len(events), chunk):
        run.add(EventBatch.from_events(events[i:i + chunk]))
    x = run.curves["loss"].x
    assert x.tolist() == list(range(11, 41))  # never back, each step once
    loss = dict(zip(x.tolist(), run.curves["loss"].y.tolist()))
    assert loss[15] == pytest.approx(2.015) and loss[30] == pytest.approx(3.030)  # the newest execution's
    ev = run.evals["val/recall@1"]
    assert ev.x.tolist() == [20, 30, 40] and ev.y.tolist() == pytest.approx([2.020, 3.030, 3.040])


def test_drift_probe_events_become_one_curve_per_dt(qtbot):
    from gui.monitor import MonitorPanel

    events = [make_event("step", s, **step_fields(s, "warmup", 100, 320)) for s in range(1, 201)]
    events[99:99] = [make_event("drift", 100, phase="warmup", D={"10": 0.8, "100": 1.5})]
    events.append(make_event("drift", 200, phase="warmup", D={"10": 0.2, "100": 0.6}))
    panel = MonitorPanel()
    qtbot.addWidget(panel)
    panel.add_batch(EventBatch.from_events(events))
    panel.redraw()
    assert panel.data.evals["drift/D_10"].x.tolist() == [100, 200]
    assert panel.data.evals["drift/D_100"].y.tolist() == [1.5, 0.6]
    x, y = panel.drift.curves["drift/D_100"].getOriginalDataset()
    assert x.tolist() == [100, 200] and y.tolist() == [1.5, 0.6]
    assert len(panel.loss.curves["loss"].getOriginalDataset()[0]) == 200  # the step curves are unaffected


def test_staleness_and_backbone_drift_are_drawn_with_the_probe(qtbot):
    from gui.monitor import MonitorPanel

    events = [make_event("step", s, **step_fields(s, "xbm", 100, 320)) for s in range(1, 201)]
    events.append(make_event("drift", 100, phase="xbm", D={"10": 0.1, "100": 0.5}, D_backbone={"100": 0.2},
                             directed=0.5, staleness={"grad_share": {"0-10": 0.5, "10-100": 0.5}, "mean_age": 50.0,
                                                      "active_neg_age": 40.0}))
    events.append(make_event("drift", 200, phase="xbm", D={"10": 0.1, "100": 3.2}, D_backbone={"100": 0.4},
                             directed=3.2, cos10=0.6,
                             staleness={"grad_share": {"0-10": 0.1, "10-100": 0.15, "100-1000": 0.5, "1000+": 0.25},
                                        "active_neg_age": 700.0, "mean_age": 650.0}))
    panel = MonitorPanel()
    qtbot.addWidget(panel)
    panel.add_batch(EventBatch.from_events(events))
    panel.redraw()
    x, y = panel.drift.curves["drift/backbone_100"].getOriginalDataset()
    assert x.tolist() == [100, 200] and y.tolist() == [0.2, 0.4]
    x, y = panel.drift.curves["active_neg_age"].getOriginalDataset()
    assert x.tolist() == [100, 200] and y.tolist() == [40.0, 700.0]
    assert panel.data.evals["memory/grad_old"].y.tolist() == [0.0, 0.75]
    cos = panel.data.evals["drift/cos10"]  # a series from its first value on
    assert cos.x.tolist() == [200] and cos.y.tolist() == [0.6]
    assert "directed ×3.2" in panel.drift.title and "≥100 steps old 75%" in panel.drift.title
