"""The drift probe: D(t; dt) against a float64 recomputation, training unchanged by it, the auto warm-up's stop
rule and bounds, and exact resume in the middle of an auto warm-up."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from test_trainer import make, params
from xbmcore.checkpoint import list_checkpoints
from xbmcore.config import Params
from xbmcore.drift import DriftProbe
from xbmcore.events import make_event
from xbmcore.hooks import Hook

PROBE = dict(drift_probe=20, drift_every=2, drift_dts=[2, 4])


class Recorder(Hook):
    """A hook that embeds the probe images itself after every step (float64 forward of a model copy)."""

    def __init__(self, probe: DriftProbe, dataset):
        self.x = torch.stack([dataset[int(i)][0] for i in probe.items])
        self.emb: dict[int, np.ndarray] = {}

    def on_phase_start(self, trainer):
        self.on_step(trainer)

    def on_step(self, trainer):
        model = __import__("copy").deepcopy(trainer.model).double().eval()
        with torch.no_grad():
            self.emb[trainer.step] = model(self.x.double()).numpy()


def test_drift_equals_a_float64_recomputation_from_saved_embeddings():
    trainer, sink = make(params(warmup_steps=12, **PROBE))
    trainer.splits.train.train = False  # the recorder's view must be the probe's (no augmentation noise)
    rec = Recorder(trainer.probe, trainer.splits.train)
    trainer.hooks.append(rec)
    held = []
    trainer.hooks.append(type("Count", (Hook,), {"on_step": lambda s, t: held.append(len(t.probe.snapshots))})())
    trainer.train_phase("warmup", 12)
    want = {}
    for t in range(0, 13, 2):
        want[t] = {dt: float(((rec.emb[t] - rec.emb[t - dt]) ** 2).sum(1).mean()) for dt in (2, 4) if t - dt >= 0}
    got = {h["step"]: h["D"] for h in trainer.probe.history}
    assert got.keys() == want.keys()
    for t in want:
        assert got[t].keys() == want[t].keys(), t
        for dt in want[t]:
            assert got[t][dt] == pytest.approx(want[t][dt], rel=1e-5, abs=1e-9), (t, dt)
    assert min(v for d in want.values() for v in d.values()) > 1e-4  # the model moved: the test can fail
    # Every probe step's values went out as one `drift` event; snapshots held: those a later step still needs.
    events = sink.of("drift")
    assert [e["step"] for e in events] == [t for t in want if want[t]]
    assert events[-1]["D"] == {"2": got[12][2], "4": got[12][4]}
    assert max(held) <= 3  # t - 4, t - 2, t for dts (2, 4) every 2


def test_training_is_bit_identical_with_and_without_the_probe():
    runs = []
    for extra in ({}, PROBE):
        trainer, _ = make(params(**extra))
        trainer.train_phase("warmup", 6)
        trainer.train_phase("xbm", 6, trainer.init_memory())
        runs.append([p.detach().clone() for p in trainer.model.state_dict().values()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_sparse_probe_embeds_only_the_steps_it_needs():
    trainer, _ = make(params(warmup_steps=30, drift_probe=10, drift_every=10, drift_dts=[3, 20]))
    calls = []
    embed = trainer.probe.embed
    trainer.probe.embed = lambda: (calls.append(trainer.step), embed())[1]
    trainer.train_phase("warmup", 30)
    # Probe steps 0, 10, 20, 30 and t - 3 of each later one; never more.
    assert calls == [0, 7, 10, 17, 20, 27, 30]
    assert [(h["step"], sorted(h["D"])) for h in trainer.probe.history] == [
        (0, []), (10, [3]), (20, [3, 20]), (30, [3, 20])]
    assert sorted(trainer.probe.snapshots) == [20, 30]  # what steps 40 (dt 20) and 50 will need


def _auto(**kw) -> Params:
    return params(warmup_steps="auto", warmup_drift_dt=2, **{**PROBE, **kw})


def _reference_drift(steps: int) -> dict[int, float]:
    trainer, _ = make(params(warmup_steps=steps, **PROBE))
    trainer.train_phase("warmup", steps)
    return {h["step"]: h["D"][2] for h in trainer.probe.history if 2 in h["D"]}


def _smoothed(D: dict[int, float], window: int) -> dict[int, float]:
    """Per probe step, the mean of D over it and the window - 1 probes before it (where there are that many)."""
    steps = sorted(D)
    return {t: float(np.mean([D[u] for u in steps[i + 1 - window:i + 1]]))
            for i, t in enumerate(steps) if i + 1 >= window}


@pytest.mark.parametrize("window", [1, 3])
def test_auto_warmup_stops_at_the_first_probe_under_the_threshold_within_its_bounds(window):
    D = _smoothed(_reference_drift(40), window)
    steps = sorted(D)
    # A threshold that the (smoothed) series first crosses after step 10: the warm-up must stop exactly there.
    lo = 12
    thr = float(np.nextafter(min(D[t] for t in steps if t >= lo), np.inf))
    first = next(t for t in steps if t >= 6 and D[t] < thr)
    assert first >= lo
    trainer, sink = make(_auto(warmup_drift=thr, warmup_min_steps=6, warmup_max_steps=40,
                               warmup_drift_window=window))
    trainer.train_phase("warmup", trainer.params.train.warmup_budget)
    assert trainer.step == trainer.warmup_end == first
    assert [e["step"] for e in sink.of("step")][-1] == first
    # The lower bound: under the threshold early on, but not before warmup_min_steps.
    trainer, _ = make(_auto(warmup_drift=1e9, warmup_min_steps=7, warmup_max_steps=40,
                            warmup_drift_window=window))
    trainer.train_phase("warmup", 40)
    assert trainer.step == 8  # the first probe step >= 7
    # The upper bound: never under it, so the phase's length (warmup_max_steps) ends it.
    trainer, _ = make(_auto(warmup_drift=1e-12, warmup_min_steps=0, warmup_max_steps=14,
                            warmup_drift_window=window))
    trainer.train_phase("warmup", 14)
    assert trainer.step == trainer.warmup_end == 14


def test_auto_warmup_resumes_exactly_in_the_middle_and_not_past_its_end(tmp_path):
    D = _reference_drift(40)
    thr = float(np.nextafter(min(D[t] for t in D if t >= 16), np.inf))
    p = _auto(warmup_drift=thr, warmup_min_steps=6, warmup_max_steps=40, checkpoint_every=3, eval_every=5)
    ref, _ = make(p)
    ref.train_phase("warmup", 40, checkpoint_dir=tmp_path / "ref")
    assert ref.step >= 16

    def stop(step, metrics):
        if step == 10:
            raise KeyError("interrupted")

    cut, _ = make(p)
    with pytest.raises(KeyError):
        cut.train_phase("warmup", 40, checkpoint_dir=tmp_path / "cut", on_eval=stop)
    assert [s for s, _ in list_checkpoints(tmp_path / "cut")] == [9, 10]
    again, sink = make(p, seed=7)  # another initialisation: everything must come from the checkpoint
    again.train_phase("warmup", 40, checkpoint_dir=tmp_path / "cut")
    assert sink.of("phase")[-1]["resumed"] is True
    assert again.step == again.warmup_end == ref.step
    for a, b in zip(ref.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)
    assert again.probe.history == ref.probe.history
    assert again.history == ref.history
    # Run again after the end (the stage killed before writing its output): nothing more is trained.
    final, sink = make(p, seed=8)
    final.train_phase("warmup", 40, checkpoint_dir=tmp_path / "ref")
    assert final.step == ref.step and not sink.of("step")


def test_auto_warmup_params_are_checked():
    with pytest.raises(ValueError, match="set drift_probe > 0"):
        params(warmup_steps="auto")
    with pytest.raises(ValueError, match="must be one of drift_dts"):
        params(warmup_steps="auto", drift_probe=8, warmup_drift_dt=50)
    with pytest.raises(ValueError, match="warmup_min_steps .* must be <= warmup_max_steps"):
        params(warmup_steps="auto", drift_probe=8, warmup_min_steps=50, warmup_max_steps=10)
    with pytest.raises(ValueError, match="warmup_steps: expected a number of steps >= 0 or auto"):
        params(warmup_steps=-1)


def test_drift_events_become_mlflow_metrics():
    from pipeline.tracking import MLflowSink
    ev = make_event("drift", 30, phase="warmup", D={"10": 0.5, "100": 0.25})
    assert MLflowSink.metrics_of(ev) == {"drift_probe/dt_10": 0.5, "drift_probe/dt_100": 0.25}
    ev = make_event("drift", 30, phase="xbm", D={"10": 0.5}, D_backbone={"10": 0.125}, directed=2.5, cos10=0.75,
                    staleness={"grad_share": {"0-10": 0.25, "1000+": 0.75}, "active_neg_age": 900.0,
                               "mean_age": None})
    assert MLflowSink.metrics_of(ev) == {
        "drift_probe/dt_10": 0.5, "drift_probe/backbone_dt_10": 0.125, "drift_probe/directed": 2.5,
        "drift_probe/cos10": 0.75, "memory/active_neg_age": 900.0, "memory/grad_share_0_10": 0.25,
        "memory/grad_share_1000_plus": 0.75}
