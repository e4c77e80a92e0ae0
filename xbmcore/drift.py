"""Feature drift as the XBM paper measures it (Wang et al., CVPR 2020, Sec. 3.2 and Fig. 3):

    D(t; dt) = mean over the probe images x of ||f_t(x) - f_{t-dt}(x)||^2

f_t is the model after step t, and x a fixed set of `train.drift_probe` training images seen through the test
transform (one clean view each, so D is the model's change alone; the per-step drift of re-entering memory entries
also mixes two augmentations). The paper's argument for the memory is that D(t; dt) becomes small after a short
warm-up; `train.warmup_steps: auto` ends the warm-up when it has (DriftMonitor, a hook of the training loop).

Cost: D(t; dt) is reported at the probe steps t = 0, every, 2 every, ...; it needs the embeddings at t and at t - dt
for each dt, so the probe embeds its images at those steps only (t and t - 10 for every = 100 and dts 10, 100,
1000: twice per 100 steps) and keeps a snapshot only while a later probe step still needs it (about
max(dts) / every + len(dts) snapshots of probe x D floats). Embedding runs in eval mode without gradients on a
preserved RNG, so a run trains bit-identically with the probe on or off.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from torch.utils.data import Subset

from xbmcore.checkpoint import rng_state, set_rng_state
from xbmcore.evaluate import compute_embeddings
from xbmcore.events import make_event

log = logging.getLogger(__name__)


def clean_view(dataset):
    """The dataset as the test transform shows it (when it offers that): one deterministic view per image."""
    return dataset.without_augmentation() if hasattr(dataset, "without_augmentation") else dataset


class DriftProbe:
    """Embeds a fixed seeded subset of `dataset` at the steps D(t; dt) needs and computes D in float64.

    observe(step, model) is called after every optimiser step (and at the first step of a run); it returns the
    `{dt: D(step; dt)}` of a probe step (the dts whose earlier snapshot exists), else None. `history` holds every
    probe step's values; state_dict / load_state_dict carry snapshots and history through checkpoints.
    """

    def __init__(self, dataset, size: int, every: int, dts: Sequence[int], seed: int, batch_size: int = 256,
                 device: str | torch.device = "cpu", num_workers: int = 0, autocast=None):
        if size < 1 or every < 1 or not dts or min(dts) < 1:
            raise ValueError(f"DriftProbe: expected size >= 1, every >= 1 and dts >= 1, got {size}, {every}, "
                             f"{list(dts)}")
        n = min(size, len(dataset))
        g = torch.Generator().manual_seed(seed)
        self.items = torch.randperm(len(dataset), generator=g)[:n].sort().values  # n dataset indices
        self.every, self.dts = int(every), tuple(sorted({int(d) for d in dts}))
        self._subset = Subset(clean_view(dataset), self.items.tolist())
        self._batch_size, self._device, self._num_workers = batch_size, device, num_workers
        self._autocast = autocast
        self.snapshots: dict[int, torch.Tensor] = {}  # step -> n x D float32 (CPU)
        self.history: list[dict[str, Any]] = []  # {"step": t, "D": {dt: value}}
        self.last = -1  # the last step observed: a phase that starts where the previous one ended skips it

    # ---- which steps ----

    def is_probe_step(self, step: int) -> bool:
        return step % self.every == 0

    def wanted(self, step: int) -> bool:
        """A probe step, or t - dt of a later probe step t."""
        return self.is_probe_step(step) or any(self.is_probe_step(step + dt) for dt in self.dts)

    def _needed_after(self, s: int, now: int) -> bool:
        return any(s + dt > now and self.is_probe_step(s + dt) for dt in self.dts)

    # ---- measuring ----

    def embed(self, model: torch.nn.Module) -> torch.Tensor:
        """f(x) of the probe images: n x D float32 on the CPU; the model's mode and the RNG streams unchanged."""
        state = rng_state()
        try:
            ctx = self._autocast() if self._autocast is not None else torch.autocast("cpu", enabled=False)
            with ctx:
                feats, _ = compute_embeddings(model, self._subset, self._batch_size, self._device,
                                              num_workers=self._num_workers)
        finally:
            set_rng_state(state)
        return torch.from_numpy(feats)

    def observe(self, step: int, model: torch.nn.Module) -> dict[int, float] | None:
        if step <= self.last or not self.wanted(step):
            return None
        self.last = step
        self.snapshots[step] = self.embed(model)
        out = None
        if self.is_probe_step(step):
            now = self.snapshots[step].double()
            out = {dt: float(((now - self.snapshots[step - dt].double()) ** 2).sum(1).mean())
                   for dt in self.dts if step - dt in self.snapshots}
            self.history.append({"step": step, "D": out})
        for s in [s for s in self.snapshots if s != step and not self._needed_after(s, step)]:
            del self.snapshots[s]
        if not self._needed_after(step, step):
            del self.snapshots[step]
        return out

    def value(self, step: int, dt: int) -> float | None:
        """D(step; dt) when it was measured."""
        for h in reversed(self.history):
            if h["step"] == step:
                return h["D"].get(dt)
            if h["step"] < step:
                break
        return None

    # ---- state ----

    def _config(self) -> dict[str, Any]:
        return {"items": self.items.clone(), "every": self.every, "dts": list(self.dts)}

    def state_dict(self) -> dict[str, Any]:
        return {**self._config(), "last": self.last, "snapshots": dict(self.snapshots),
                "history": [{"step": h["step"], "D": {str(k): v for k, v in h["D"].items()}} for h in self.history]}

    def load_state_dict(self, state: dict[str, Any] | None) -> bool:
        """Restore snapshots and history; a state of another probe (images, interval, dts) or none is ignored
        (the probe starts afresh, with a warning). Returns whether it was restored."""
        mine = self._config()
        if state is None or state["every"] != mine["every"] or list(state["dts"]) != mine["dts"] \
                or not torch.equal(state["items"], mine["items"]):
            if state is not None:
                log.warning("the checkpoint's drift probe has other images, interval or dts: its history is "
                            "dropped and D(t; dt) is measured afresh from here")
            self.snapshots, self.history, self.last = {}, [], -1
            return False
        self.last = int(state["last"])
        self.snapshots = {int(k): v for k, v in state["snapshots"].items()}
        self.history = [{"step": int(h["step"]), "D": {int(k): float(v) for k, v in h["D"].items()}}
                        for h in state["history"]]
        return True


class DriftMonitor:
    """The probe as a hook of the training loop: observes the model at the phase's first step and after every
    step, emits a `drift` event per probe step, and ends an auto warm-up (`train.warmup_steps: auto`) at the
    first probe step t >= warmup_min_steps with D(t; warmup_drift_dt) < warmup_drift (the phase's own length,
    warmup_max_steps, bounds it from above)."""

    def __init__(self, probe: DriftProbe, train_params):
        self.probe, self.t = probe, train_params

    def on_phase_start(self, trainer) -> None:
        self._observe(trainer)

    def on_step(self, trainer) -> None:
        D = self._observe(trainer)
        t = self.t
        if D is not None and trainer.phase == "warmup" and t.warmup_steps == "auto" \
                and trainer.step >= t.warmup_min_steps and D.get(t.warmup_drift_dt, float("inf")) < t.warmup_drift:
            log.info("warm-up ends at step %d: D(t; %d) = %.4g < train.warmup_drift = %g", trainer.step,
                     t.warmup_drift_dt, D[t.warmup_drift_dt], t.warmup_drift)
            trainer.end_phase()

    def _observe(self, trainer) -> dict[int, float] | None:
        D = self.probe.observe(trainer.step, trainer.model)
        if D:
            trainer.emit(make_event("drift", trainer.step, phase=trainer.phase, D={str(k): v for k, v in D.items()}))
        return D
