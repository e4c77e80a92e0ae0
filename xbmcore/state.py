"""`TrainState`: everything that decides how training continues, as one object with one `state_dict` (what a
checkpoint holds) and one `load_state_dict` (what a resume restores)."""
from __future__ import annotations

import copy
from typing import Any

import torch

from xbmcore.checkpoint import CHECKPOINT_FORMAT, rng_state, set_rng_state
from xbmcore.distributed import Dist
from xbmcore.drift import DriftProbe
from xbmcore.events import HISTORY_FIELDS
from xbmcore.memory import CrossBatchMemory


class TrainState:
    """Everything that decides how training continues, saved and restored whole (DINO's
    `restart_from_checkpoint` as one object): model, optimiser, scheduler, scaler, memory (None without one),
    global step, phase and its starting step, curves, evaluations and every rank's RNG states. The sampler's
    position is not stored: it is the number of steps taken.

    Args:
        model: the model being trained.
        optimizer: its optimiser.
        scheduler: the lr scheduler of the phases (a LambdaLR over `optimizer`).
        scaler: the loss scaler (float16's GradScaler; disabled for other precisions).
        dist: the job's ranks (every rank's RNG states are saved; a state restores only into as many ranks).

    Attributes:
        memory (CrossBatchMemory | None): the cross-batch memory of the XBM phase; None in the others.
        step (int): the global optimiser step, counted across phases.
        phase (str | None): the current phase's name.
        phase_start (int): the step the current phase started at.
        digest (str): the phase's `training_digest`: a checkpoint resumes only a run with the same one.
        history (dict[str, list]): the training curves, one list per `HISTORY_FIELDS` column.
        evals (list[dict]): the periodic evaluations: ``{"step", "phase", "split", metric: value, ...}``.
        warmup_end (int | None): the step the warm-up ended at (None until it has).
        probe (DriftProbe | None): the drift probe, with its snapshots and D(t; dt) history.
        ema (torch.nn.Module | None): ``memory.momentum``'s moving average of the model (XBM phase).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler, dist: Dist):
        self.model, self.optimizer, self.scheduler, self.scaler, self.dist = model, optimizer, scheduler, scaler, dist
        self.memory: CrossBatchMemory | None = None
        self.step = 0  # global optimiser step, counted across phases
        self.phase: str | None = None
        self.phase_start = 0
        self.digest = ""  # training_digest of the phase: a checkpoint resumes only a run with the same one
        self.history: dict[str, list] = {k: [] for k in HISTORY_FIELDS}
        self.evals: list[dict[str, Any]] = []  # {"step", "phase", "split", metric: value, ...}
        # The step the warm-up ended at (None until it has): the XBM phase's cosine schedule counts from it.
        self.warmup_end: int | None = None
        self.probe: DriftProbe | None = None  # its snapshots and D(t; dt) history
        self.ema: torch.nn.Module | None = None  # memory.momentum's moving average of the model (XBM phase)

    def state_dict(self) -> dict[str, Any]:
        """A plain dict (tensors, numbers, lists) for the safe unpickler. Collective: every rank calls it.

        Returns:
            The checkpoint's content: format, phase, phase_start, digest, nproc, step, the model's, optimiser's,
                scheduler's, scaler's, memory's, probe's and moving average's state dicts, every rank's RNG
                states, history, evals and warmup_end.
        """
        return {
            "format": CHECKPOINT_FORMAT, "phase": self.phase, "phase_start": self.phase_start,
            "digest": self.digest, "nproc": self.dist.world, "step": self.step,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "memory": None if self.memory is None else self.memory.state_dict(),
            "rng": self.dist.objects(rng_state()),  # one per rank: each rank's augmentation stream goes on
            "history": self.history, "evals": self.evals, "warmup_end": self.warmup_end,
            "drift_probe": None if self.probe is None else self.probe.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state saved by `state_dict` (a checkpoint or a stage's final state). The memory is restored
        when this state has one (the XBM phase); a warm-up state has none.

        `state` itself is left unchanged (the optimiser's moments are copied), so one state can start several
        runs.

        Args:
            state: what `state_dict` returned (read back with ``xbmcore.checkpoint.load_checkpoint``).

        Raises:
            ValueError: another checkpoint format, a state saved by another number of processes, or a state
                without a memory for a phase that has one.
        """
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"checkpoint format {state.get('format')!r}, expected {CHECKPOINT_FORMAT}")
        if len(state["rng"]) != self.dist.world:
            raise ValueError(f"the state was saved by {len(state['rng'])} process(es), this run has "
                             f"{self.dist.world}: set train.nproc to {len(state['rng'])}, or run its stage again")
        self.model.load_state_dict(state["model"])
        # torch keeps the given moment tensors (no copy when dtype and device match) and then updates them in
        # place: a copy leaves `state` as it was, so one state can start several runs.
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"][self.dist.rank])
        self.step, self.phase_start = int(state["step"]), int(state["phase_start"])
        self.history = {k: list(state["history"][k]) for k in HISTORY_FIELDS}
        self.evals = list(state["evals"])
        self.warmup_end = state["warmup_end"]
        if self.probe is not None:
            self.probe.load_state_dict(state["drift_probe"])
        if self.ema is not None and state.get("ema") is not None:  # else (a warm-up state) it starts as the model
            self.ema.load_state_dict(state["ema"])
        if self.memory is not None:
            if state["memory"] is None:
                raise ValueError("the checkpoint holds no memory, but this phase trains with one")
            self.memory.load_state_dict(state["memory"])
