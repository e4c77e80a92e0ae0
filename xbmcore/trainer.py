"""The training loop of XBM's three phases (Wang et al., CVPR 2020, Alg. 1):

    warm-up      train f with L(batch, batch) only; embeddings drift fast early on, so no memory yet
    memory init  M <- f(random `memory.ratio` of the train set), with the warmed-up f
    xbm          enqueue the batch's detached embeddings into M; L = L(batch, batch) + w * L(batch, M), so M
                 already holds the batch (Alg. 1, as the official code) and each anchor meets the other images of
                 its batch there too, its own stored copies excluded by dataset index; backward; optimiser step.
                 `memory.enqueue: after` enqueues after the loss instead, for the comparison
    baseline     the xbm schedule without memory (`memory.enabled: false`), for a like-for-like comparison

The pieces: `TrainState` holds everything that decides the continuation (model, optimiser, scheduler, scaler,
memory, step, phase, curves, RNG states; the sampler's position follows from the step) with one `state_dict` /
`load_state_dict`. `Trainer.train_phase` is the loop; evaluation, checkpoints and stop signals are `Hook`s on it,
and so is anything a caller adds (`Trainer.hooks`, `train_phase(hooks=...)`). One `StepRecord` per optimiser
step goes to the sink as a `step` event and into the curves; an `eval` event every `train.eval_every` steps.

The step's scalars stay on the device and are read every `train.log_every` steps, one host-device sync for all
of them (with the NaN check); checkpoints, evaluations and stops read what is pending first. A non-finite loss
stops the run at the read that sees it, before the optimiser step of that read's step: with log_every 1 the
weights never take a non-finite step; with log_every n up to n - 1 steps run past it (their weights and memory
entries are discarded: no checkpoint is written after an unread step). The last good checkpoint is kept, at
most `train.checkpoint_every` steps back. Checkpoints written every `train.checkpoint_every` steps let a phase
killed at any point continue bit-identically on the CPU. SIGTERM/SIGINT stop after the current step with a
checkpoint.

Several processes (torchrun, `train.nproc`; see xbmcore/distributed.py): each rank trains on its part of one
global P x M batch, the batch term pairs its anchors with the whole global batch (gathered in rank order,
differentiably) and the memory term with the memory; the global batch is enqueued in rank order on every rank, so
every rank's memory is bit-identical. Rank 0 alone writes checkpoints and events.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import logging
import math
import signal
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import DataLoader, Subset

from xbmcore.checkpoint import (
    checkpoint_path, list_checkpoints, load_checkpoint, prune_checkpoints, rng_state, save_checkpoint,
    set_rng_state,
)
from xbmcore.config import Params
from xbmcore.data.batch import collate_for, to_device
from xbmcore.distributed import Dist, world_size
from xbmcore.drift import DriftProbe, clean_view
from xbmcore.evaluate import compute_embeddings, evaluate_model, retrieval_metrics
from xbmcore.events import HISTORY_FIELDS, StepRecord, make_event
from xbmcore.losses import XBMObjective, build_loss
from xbmcore.memory import CrossBatchMemory
from xbmcore.models import pretrained_sha256
from xbmcore.sampler import PKSampler

log = logging.getLogger(__name__)

# 2: the sampler position is no longer stored (it follows from the step); RNG states are one per rank.
# 3: the warm-up's end step and the drift probe's snapshots and history.
CHECKPOINT_FORMAT = 3
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# XBMObjective's scalars, in the order of the step's device vector.
_OBJECTIVE = ("loss", "loss_batch", "loss_memory", "pos_pairs", "neg_pairs", "mem_pos_pairs", "mem_neg_pairs")
# Train params that change how a run is operated, not what it computes (evaluation runs on a forked RNG). nproc
# does change it (the global batch) and is checked on its own, so that a resume with another nproc is refused
# with a message rather than silently started over.
_OPERATIONAL = ("checkpoint_every", "eval_every", "num_threads", "device", "precision", "log_every", "nproc")
# The drift probe's and the auto warm-up's: they decide what is computed only when the warm-up ends on drift.
_DRIFT = ("drift_probe", "drift_every", "drift_dts", "warmup_drift", "warmup_drift_dt", "warmup_drift_window",
          "warmup_min_steps", "warmup_max_steps")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped and its last good checkpoint is kept."""


class _CallerError(Exception):
    """Carries an exception raised by the caller's on_eval through the loop's failure handling."""


class OutOfMemory(RuntimeError):
    """The GPU ran out of memory; the message says which params to lower."""


class TrainingStopped(RuntimeError):
    """SIGTERM or SIGINT: the run stopped cleanly after a step, with a checkpoint."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


def resolve_device(name: str) -> torch.device:
    """`train.device`: auto (CUDA when torch sees a GPU, else CPU), cpu, or cuda (an error without a GPU)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"train.device: 'cuda' was asked for, but torch sees no CUDA GPU (torch {torch.__version__}, "
            f"built for CUDA {torch.version.cuda}, torch.cuda.is_available() is False). Set train.device to "
            f"auto (the GPU when there is one) or cpu, e.g. `dvc exp run -S train.device=cpu`, or make the GPU "
            f"visible (driver, CUDA_VISIBLE_DEVICES)."
        )
    if name not in ("cpu", "cuda"):
        raise ValueError(f"train.device: expected auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype of `train.precision`, None for float32. auto: bfloat16 on a GPU that has it, else float32."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    if name == "float32":
        return None
    if name == "float16" and device.type != "cuda":
        raise ValueError("train.precision: float16 needs a CUDA device (the CPU autocasts to bfloat16); "
                         "set train.precision to auto, float32 or bfloat16")
    return _DTYPES[name]


@functools.cache
def code_fingerprint() -> str:
    """Hash of this library's sources. A phase killed and run again by the same code resumes; after a code
    change (DVC reruns the stage because its code deps changed) it starts over instead of finishing a run begun
    by other code."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def training_digest(params: Params, phase: str) -> str:
    """Hash of what a phase's result depends on (parameters and code); a checkpoint resumes only a run with the
    same digest.

    The warm-up depends neither on the memory nor on the XBM phase's length, lr and schedule, so changing those
    keeps a warm-up checkpoint valid.
    """
    d = params.model_dump(mode="json")
    if sha := pretrained_sha256(d["model"]["pretrained"]):
        # The file's bytes, not its name: a warm-up begun from other pretrained weights must not be resumed.
        d["model"]["pretrained"] = "sha256:" + sha
    skip = _OPERATIONAL + (() if d["train"]["warmup_steps"] == "auto" else _DRIFT)
    train = {k: v for k, v in d["train"].items() if k not in skip}
    keep = {"data": d["data"], "model": d["model"], "loss": d["loss"], "train": train, "code": code_fingerprint()}
    if phase == "warmup":
        for k in ("xbm_steps", "lr", "lr_schedule"):  # the XBM phase's
            train.pop(k)
    else:
        keep["memory"] = d["memory"]
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:12]


def build_memory(params: Params, num_items: int, dim: int, device: torch.device) -> CrossBatchMemory:
    """The (empty) memory the `memory` section describes, for a train set of `num_items` images."""
    m = params.memory
    if m.size is not None:
        return CrossBatchMemory(m.size, dim, mode=m.mode, num_items=num_items, dtype=_DTYPES[m.dtype],
                                device=device)
    return CrossBatchMemory.from_ratio(m.ratio, num_items, dim, mode=m.mode, dtype=_DTYPES[m.dtype],
                                       device=device)


def resumable_checkpoint(folder: str | Path, params: Params, phase: str, start: int, end: int,
                         delete_stale: bool = False) -> tuple[Path, dict[str, Any]] | None:
    """(path, state) of the newest checkpoint in `folder` that continues this phase: same phase, same digest
    (training_digest), same starting step, step within [start, end]. Others are stale (other parameters or code,
    or a phase that started elsewhere); `delete_stale` removes them, with a warning, so they cannot pile up."""
    folder = Path(folder)
    digest = training_digest(params, phase)
    stale, found = [], None
    nproc = world_size()
    for step, path in reversed(list_checkpoints(folder)):
        try:
            state = load_checkpoint(path)
        except ValueError as err:
            log.warning("skipping %s", err)
            stale.append(path)
            continue
        if (state.get("format"), state.get("phase"), state.get("digest"), state.get("phase_start")) == \
                (CHECKPOINT_FORMAT, phase, digest, start) and start <= step <= end:
            if state.get("nproc") != nproc:
                raise ValueError(
                    f"{path}: written by a run of {state.get('nproc')} process(es), this run has {nproc}; the "
                    f"global batch (processes x train.batch_size) and the data each rank sees would change "
                    f"mid-phase. Run again with -S train.nproc={state.get('nproc')} (on one node) to resume, or "
                    f"delete {folder} to start the {phase} phase over")
            found = (path, state)
            break
        stale.append(path)
    if delete_stale and stale:
        if found is None:
            log.warning("%s: %d checkpoint(s) of other parameters, other code or another starting step; deleted, "
                        "the %s phase starts over", folder, len(stale), phase)
        for p in stale:
            p.unlink(missing_ok=True)
    return found


@contextlib.contextmanager
def preserved_rng():
    """Run a block (evaluation) without moving the global RNG streams, so training does not depend on it."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


class TrainState:
    """Everything that decides how training continues, saved and restored whole (DINO's
    `restart_from_checkpoint` as one object): model, optimiser, scheduler, scaler, memory (None without one),
    global step, phase and its starting step, curves, evaluations and every rank's RNG states. The sampler's
    position is not stored: it is the number of steps taken."""

    def __init__(self, model: torch.nn.Module, optimizer, scheduler, scaler, dist: Dist):
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

    def state_dict(self) -> dict[str, Any]:
        """A plain dict (tensors, numbers, lists) for the safe unpickler. Collective: every rank calls it."""
        return {
            "format": CHECKPOINT_FORMAT, "phase": self.phase, "phase_start": self.phase_start,
            "digest": self.digest, "nproc": self.dist.world, "step": self.step,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "memory": None if self.memory is None else self.memory.state_dict(),
            "rng": self.dist.objects(rng_state()),  # one per rank: each rank's augmentation stream goes on
            "history": self.history, "evals": self.evals, "warmup_end": self.warmup_end,
            "drift_probe": None if self.probe is None else self.probe.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state saved by `state_dict` (a checkpoint or a stage's final state). The memory is restored
        when this state has one (the XBM phase); a warm-up state has none."""
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
        if self.memory is not None:
            if state["memory"] is None:
                raise ValueError("the checkpoint holds no memory, but this phase trains with one")
            self.memory.load_state_dict(state["memory"])


class Hook:
    """An extension point of the training loop: subclass and override what you need, then pass it in
    `train_phase(hooks=[...])` or append it to `Trainer.hooks` (every phase). Hooks run in order after the
    built-in ones (evaluation, checkpoints, stop signals).

    on_phase_start(trainer)       after the phase event; trainer.step is where the phase (re)starts
    on_step(trainer)              after each optimiser step; trainer.step counts it. The step's scalars may still
                                  be on the device: call trainer.flush() before reading trainer.history.
                                  Time spent here is not counted in images_per_s.
    on_phase_end(trainer, error)  always, last; error is the exception that ends the phase, or None
    """

    def on_phase_start(self, trainer: "Trainer") -> None:
        pass

    def on_step(self, trainer: "Trainer") -> None:
        pass

    def on_phase_end(self, trainer: "Trainer", error: BaseException | None) -> None:
        pass


class Evaluation(Hook):
    """Val Recall@K etc. every `every` steps (0: never): an `eval` event, the curves, then `on_eval(step,
    metrics)`; an exception from on_eval propagates after a checkpoint of that step."""

    def __init__(self, every: int, on_eval: Callable[[int, dict], None] | None = None):
        self.every, self.on_eval = every, on_eval

    def on_step(self, trainer: "Trainer") -> None:
        if not self.every or trainer.step % self.every:
            return
        trainer.flush()
        metrics = trainer.evaluate("val")
        trainer.state.evals.append({"step": trainer.step, "phase": trainer.state.phase, "split": "val", **metrics})
        trainer.emit(make_event("eval", trainer.step, phase=trainer.state.phase, split="val", metrics=metrics))
        if self.on_eval is not None:
            try:
                self.on_eval(trainer.step, metrics)
            except BaseException as err:
                trainer.checkpoint()
                raise _CallerError(err) from err


class Checkpointing(Hook):
    """A checkpoint every `every` steps and at the phase's last step."""

    def __init__(self, every: int, end: int):
        self.every, self.end = every, end

    def on_step(self, trainer: "Trainer") -> None:
        if trainer.step % self.every == 0 or trainer.step == self.end:
            trainer.checkpoint()


class StopOnSignals(Hook):
    """SIGTERM/SIGINT set a flag; the loop stops after the step with a checkpoint (TrainingStopped). A second
    SIGINT interrupts at once. With several ranks the flag travels with the step's scalars, so that every rank
    stops after the same step."""

    def __init__(self):
        self._previous: dict = {}

    def on_phase_start(self, trainer: "Trainer") -> None:
        trainer.stop_signal = None
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            if trainer.stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            trainer.stop_signal = signum

        for s in (signal.SIGTERM, signal.SIGINT):
            self._previous[s] = signal.getsignal(s)
            signal.signal(s, handler)

    def on_step(self, trainer: "Trainer") -> None:
        signum = trainer.stop_seen if trainer.dist.active else trainer.stop_signal
        if signum is None:
            return
        trainer.checkpoint()
        name = signal.Signals(signum).name
        where = f"checkpoint {trainer.last_checkpoint}" if trainer.folder else "no checkpoint folder"
        msg = f"stopped by {name} after step {trainer.step} ({trainer.state.phase} phase); {where}"
        trainer.emit(make_event("end", trainer.step, status="stopped", message=msg))
        raise TrainingStopped(signum, msg)

    def on_phase_end(self, trainer: "Trainer", error: BaseException | None) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}


class DriftMonitor(Hook):
    """The drift probe (xbmcore.drift) as a hook: it observes the model where a phase (re)starts and after every
    step, emits a `drift` event per probe step, and ends an auto warm-up (`train.warmup_steps: auto`) at the
    first probe step t >= warmup_min_steps where the mean of D(t; warmup_drift_dt) over the last
    warmup_drift_window probes is below warmup_drift; the phase's own length, warmup_max_steps, bounds it from
    above."""

    def on_phase_start(self, trainer: "Trainer") -> None:
        self._observe(trainer)

    def on_step(self, trainer: "Trainer") -> None:
        D, t = self._observe(trainer), trainer.params.train
        if D is None or trainer.phase != "warmup" or t.warmup_steps != "auto" or trainer.step < t.warmup_min_steps:
            return
        # The mean over the last warmup_drift_window probes: one probe's D of a few images is noisy, and a single
        # low value would end the warm-up at a dip rather than where drift has settled.
        last = [h["D"][t.warmup_drift_dt] for h in trainer.probe.history
                if t.warmup_drift_dt in h["D"]][-t.warmup_drift_window:]
        if len(last) < t.warmup_drift_window or not sum(last) / len(last) < t.warmup_drift:
            return
        log.info("warm-up ends at step %d: D(t; %d) = %.4g over the last %d probes < train.warmup_drift = %g",
                 trainer.step, t.warmup_drift_dt, sum(last) / len(last), len(last), t.warmup_drift)
        trainer.state.warmup_end = trainer.step
        trainer.last_checkpoint = None  # rewrite this step's checkpoint with the end in it: a resume stops here
        trainer.checkpoint()
        trainer.end_phase()

    @staticmethod
    def _observe(trainer: "Trainer") -> dict[int, float] | None:
        probe = trainer.probe
        if trainer.step <= probe.last or not probe.wanted(trainer.step):
            return None
        trainer.flush()  # the step's event before its drift event
        D = probe.observe(trainer.step)
        if D:
            trainer.emit(make_event("drift", trainer.step, phase=trainer.phase, D={str(k): v for k, v in D.items()}))
        return D


class Trainer:
    """Trains `model` on `splits.train` with P x M batches; emits events to `sink` (rank 0 only).

    `run_dir`: folder for this run's files; a phase checkpoints to `run_dir/<phase>/checkpoints` unless
    `train_phase` is given a `checkpoint_dir` (None for both: no checkpoints). Inside a torchrun job (the
    process group initialised, see xbmcore.distributed) it is one rank of a data-parallel run.
    """

    def __init__(self, params: Params, model: torch.nn.Module, splits, sink, run_dir: str | Path | None = None):
        t = params.train
        self.params, self.sink, self.splits = params, sink, splits
        self.run_dir = None if run_dir is None else Path(run_dir)
        if splits.train is None or len(splits.train) == 0:
            raise ValueError("Trainer: the dataset has no training images (splits.train is empty)")
        self.dist = Dist()
        self.device = resolve_device(t.device)
        self.cuda = self.device.type == "cuda"
        self.amp_dtype = resolve_precision(t.precision, self.device)
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        if self.cuda:
            torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest kernels once
        # channels_last lets cuDNN use its NHWC tensor-core kernels; a no-op choice on the CPU.
        self._mem_format = torch.channels_last if self.cuda else torch.contiguous_format
        if self.dist.active and params.model.sync_bn:
            if not self.cuda:
                raise ValueError("model.sync_bn: torch's SyncBatchNorm runs on GPUs only; set model.sync_bn: false "
                                 "on the CPU (each rank then normalises over its own part of the batch)")
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model.to(self.device, memory_format=self._mem_format)
        # The module the training forward runs through: DDP averages the ranks' gradients during backward.
        self.net = self.model if not self.dist.active else torch.nn.parallel.DistributedDataParallel(
            self.model, device_ids=[torch.cuda.current_device()] if self.cuda else None)
        self.objective = XBMObjective(build_loss(params.loss), params.memory.weight).to(self.device)
        optimizer = self._build_optimizer()
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        # Loss scaling only for float16; bfloat16 has float32's range and needs none.
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.state = TrainState(self.model, optimizer, scheduler, scaler, self.dist)
        # Each rank draws its part of one global batch of nproc x batch_size.
        self.sampler = PKSampler(splits.train.labels, t.batch_size * self.dist.world, t.images_per_class,
                                 seed=t.seed, rank=self.dist.rank, world=self.dist.world)
        self.hooks: list[Hook] = []  # the caller's, run in every phase
        if t.drift_probe:  # D(t; dt) of fixed training images, a hook of every phase
            self.state.probe = DriftProbe(splits.train, t.drift_probe, t.drift_every, t.drift_dts, seed=t.seed,
                                          embed=lambda ds: self._embed(ds)[0])
            self.hooks.append(DriftMonitor())
        self._end_now = False
        self.folder: Path | None = None  # the current phase's checkpoint folder
        self.last_checkpoint: Path | None = None
        self.stop_signal: int | None = None  # set by StopOnSignals' handler
        self.stop_seen: int | None = None  # with several ranks: a stop signal any rank had, as of the last read
        self._pending: list[tuple[dict[str, Any], torch.Tensor]] = []  # records whose scalars are on the device
        self._clock = time.perf_counter()

    # The state's parts, under the names callers use.
    optimizer = property(lambda self: self.state.optimizer)
    scheduler = property(lambda self: self.state.scheduler)
    scaler = property(lambda self: self.state.scaler)
    history = property(lambda self: self.state.history)
    evals = property(lambda self: self.state.evals)
    step = property(lambda self: self.state.step)
    phase = property(lambda self: self.state.phase)
    probe = property(lambda self: self.state.probe)
    warmup_end = property(lambda self: self.state.warmup_end)

    def end_phase(self) -> None:
        """Called by a hook: the phase ends after this step, before its planned length."""
        self._end_now = True

    def state_dict(self) -> dict[str, Any]:
        return self.state.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state.load_state_dict(state)

    def emit(self, event: dict[str, Any]) -> None:
        if self.dist.is_main:
            self.sink.emit(event)

    # ---- construction helpers ----

    def _build_optimizer(self) -> torch.optim.Optimizer:
        t = self.params.train
        params = [p for p in self.model.parameters() if p.requires_grad]
        lr = t.warmup_lr  # train_phase sets each phase's own
        if t.optimizer == "adam":
            return torch.optim.Adam(params, lr=lr, weight_decay=t.weight_decay)
        if t.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=lr, weight_decay=t.weight_decay)
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=t.weight_decay, nesterov=True)

    def _lr_factor(self, step: int) -> float:
        # Constant through the warm-up; `cosine` decays to 0 over the XBM phase only, so the warm-up (and its
        # cached output) does not depend on how long the XBM phase is. Multiplies the phase's lr (set_lr).
        t = self.params.train
        start = self.state.warmup_end if getattr(self, "state", None) and self.state.warmup_end is not None \
            else t.warmup_budget
        if t.lr_schedule == "constant" or step < start:
            return 1.0
        progress = min(1.0, (step - start) / t.xbm_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def set_lr(self, lr: float, weight_decay: float | None = None) -> None:
        """Make `lr` (and the weight decay) rule from here on: each phase starts with its own lr, also after
        loading a state whose optimiser carries another (a shared warm-up in a study trial)."""
        self.scheduler.base_lrs = [lr for _ in self.optimizer.param_groups]
        for g in self.optimizer.param_groups:
            g["initial_lr"] = lr
            g["lr"] = lr * self._lr_factor(self.step)
            if weight_decay is not None:
                g["weight_decay"] = weight_decay

    # ---- checkpoints ----

    def checkpoint(self) -> None:
        """Write a checkpoint of the current step to the phase's folder (rank 0), keeping the newest two. Reads
        the pending scalars first: a checkpoint never holds a step whose loss was not checked."""
        if self.folder is None or (self.last_checkpoint is not None and
                                   self.last_checkpoint == checkpoint_path(self.folder, self.step)):
            return
        self.flush()
        state = self.state_dict()  # every rank: the RNG states are gathered
        path = checkpoint_path(self.folder, self.step)
        if self.dist.is_main:
            save_checkpoint(state, path)
            prune_checkpoints(self.folder, keep=2)
            self.emit(make_event("checkpoint", self.step, path=str(path)))
        self.last_checkpoint = path

    def _resume(self, end: int) -> bool:
        """Continue from the newest valid checkpoint of this phase in its folder; stale ones are deleted."""
        s = self.state
        found = None
        if self.dist.is_main:  # one rank decides (and deletes the stale ones); all load the same file
            found = resumable_checkpoint(self.folder, self.params, s.phase, s.phase_start, end, delete_stale=True)
        path = self.dist.broadcast(None if found is None else str(found[0]))
        if path is None:
            return False
        self.load_state_dict(found[1] if found else load_checkpoint(path))
        self.last_checkpoint = Path(path)
        log.info("%s phase resumed from %s at step %d of %d", s.phase, path, self.step, end)
        return True

    # ---- the loop ----

    def _batches(self):
        t, nw = self.params.train, self.params.data.num_workers
        # Restart the stream exactly after the last consumed batch (workers may have prefetched past it).
        self.sampler.load_state_dict(self.sampler.state_after(self.step))
        # Own generator for the workers' base seed: creating the iterator must not draw from the global RNG,
        # whose state a checkpoint restores.
        gen = torch.Generator().manual_seed(t.seed * 1_000_003 + self.step)
        loader = DataLoader(self.splits.train, batch_sampler=self.sampler, num_workers=nw,
                            collate_fn=collate_for(self.device), pin_memory=self.cuda, persistent_workers=False,
                            generator=gen)
        return iter(loader)

    def to_device(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The one place a training batch moves to the device: images B x 3 x H x W (channels_last on a GPU),
        labels B, dataset indices B. A cached batch of raw images is cropped, resized, flipped and normalised
        there (xbmcore.data.batch)."""
        return to_device(batch, self.device, self._mem_format)

    def autocast(self):
        """The training precision's autocast context (float32: a no-op), for hooks that run the model."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    def train_phase(self, phase: str, steps: int, memory: CrossBatchMemory | None = None,
                    checkpoint_dir: str | Path | None = None, on_eval: Callable[[int, dict], None] | None = None,
                    hooks: Sequence[Hook] = ()) -> None:
        """Train `steps` optimiser steps from the current state: phase "warmup" | "xbm" | "baseline".

        When `checkpoint_dir` holds a checkpoint of the same phase, parameters and starting step, the phase
        continues from it. `on_eval(step, metrics)` is called after each periodic evaluation; an exception it
        raises propagates after a checkpoint of that step is written.
        """
        end = self._begin(phase, steps, memory, checkpoint_dir)
        t, s = self.params.train, self.state
        hooks = [Evaluation(t.eval_every, on_eval), Checkpointing(t.checkpoint_every, end), StopOnSignals(),
                 *self.hooks, *hooks]
        error = None
        try:
            for h in hooks:
                h.on_phase_start(self)
            batches = self._batches() if s.step < end else None
            self._clock = time.perf_counter()
            self._end_now = False
            while s.step < end and not self._end_now:
                try:
                    self._train_step(next(batches))
                except torch.OutOfMemoryError as err:
                    raise OutOfMemory(self._oom_message(err)) from err
                t0 = time.perf_counter()
                for h in hooks:
                    h.on_step(self)
                self._clock += time.perf_counter() - t0  # images/s measures training, not the hooks
            self.flush()
            if phase == "warmup":
                s.warmup_end = s.step
        except _CallerError as wrapped:  # the caller's own exception (e.g. a pruned trial): not a failure here
            error = wrapped.__cause__
            raise error from None
        except BaseException as err:
            error = err
            if isinstance(err, Exception) and not isinstance(err, TrainingStopped):
                self.emit(make_event("end", self.step, status="failed", message=f"{type(err).__name__}: {err}"))
            raise
        finally:
            self._pending = []
            for h in hooks:
                h.on_phase_end(self, error)

    def _begin(self, phase: str, steps: int, memory: CrossBatchMemory | None, checkpoint_dir) -> int:
        """Check the arguments, set the phase's lr, resume from a checkpoint if there is one, announce the phase;
        returns the phase's last step."""
        if phase not in ("warmup", "xbm", "baseline"):
            raise ValueError(f"phase: expected warmup, xbm or baseline, got {phase!r}")
        if (phase == "xbm") != (memory is not None):
            raise ValueError(f"phase {phase!r}: " + ("needs a memory" if phase == "xbm" else "takes no memory"))
        if steps < 0:
            raise ValueError(f"steps: expected >= 0, got {steps}")
        if checkpoint_dir is None and self.run_dir is not None:
            checkpoint_dir = self.run_dir / phase / "checkpoints"
        self.folder = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.last_checkpoint, self.stop_seen = None, None
        t, s = self.params.train, self.state
        s.memory, s.phase, s.phase_start, s.digest = memory, phase, s.step, training_digest(self.params, phase)
        start, end = s.step, s.step + steps
        self.set_lr(t.warmup_lr if phase == "warmup" else t.lr, t.weight_decay)
        if phase == "warmup":
            s.warmup_end = None  # set when this warm-up ends (a checkpoint written after an auto end holds it)
        resumed = self.folder is not None and self._resume(end)
        if phase == "warmup" and s.warmup_end is not None:
            end = s.step  # resumed after the auto warm-up had ended: nothing left to train
        if memory is not None and self.params.loss.reduction == "sum_over_batch":
            # Not an error (it is the official code's reduction), but the usual cause of a silent collapse.
            log.warning("loss.reduction sum_over_batch: the memory term sums ~K/B = %.0f times as many pairs as "
                        "the batch term; if Recall@1 falls and drift rises when the memory switches on, use "
                        "loss.reduction: mean_active or a lower memory.weight",
                        memory.K / (t.batch_size * self.dist.world))
        self.model.train()
        # resume_from: readers drop what an earlier execution wrote to the same events file after this step.
        self.emit(make_event("phase", s.step, phase=phase, total_steps=steps, start_step=start, resumed=resumed,
                             resume_from=s.step))
        return end

    def _train_step(self, batch) -> None:
        """One optimiser step. Its scalars join the pending records (read by `flush`, every log_every steps)."""
        s, memory, d = self.state, self.state.memory, self.dist
        imgs, labels, idx = self.to_device(batch)  # this rank's b = batch_size images
        before = memory is not None and self.params.memory.enqueue == "before"
        with self.autocast():
            emb = self.net(imgs)  # b x D, unit norm
            # The global batch, B = nproc x b, in rank order; the embeddings keep their gradient.
            batch = (emb, labels, idx) if not d.active else \
                (d.gather(emb, differentiable=True), d.gather(labels), d.gather(idx))
            if before:  # Alg. 1: M holds this batch (detached) when the anchors meet it
                self._enqueue(memory, batch)
            if not d.active:
                out = self.objective(emb, labels, idx, memory)
            else:
                out = self.objective(emb, labels, idx, memory, batch=batch, count=d.sum)
        loss = out["loss"] if not d.active else out["loss"] * d.world  # DDP averages: undo its 1/world
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        parts = [out[k].detach().double() for k in _OBJECTIVE]
        if d.active:  # the ranks' partial sums make the global values; a stop flag travels with them
            flag = torch.tensor(float(self.stop_signal is not None), dtype=torch.float64, device=loss.device)
            parts = list(d.sum(torch.stack([*parts, flag])))
        if memory is not None:
            if not before:  # memory.enqueue: after, for comparison: the batch joins M for the next steps only
                self._enqueue(memory, batch)
            parts += list(memory.drift_last)  # sum ||new - old||^2, sum of ages, count: the same on every rank
        now = time.perf_counter()
        images_per_s = self.params.train.batch_size * d.world / max(now - self._clock, 1e-9)
        self._clock = now
        host = dict(step=s.step + 1, phase=s.phase, lr=self.optimizer.param_groups[0]["lr"],
                    memory_fill=0.0 if memory is None else memory.fill_level,
                    memory_size=0 if memory is None else len(memory), images_per_s=images_per_s)
        self._pending.append((host, torch.stack(parts)))
        learn = True
        if (s.step + 1) % self.params.train.log_every == 0:
            # Before the optimiser step: a non-finite loss of this step leaves the weights as they were.
            last = self.flush()
            # Nothing active, nothing to learn: no optimiser step (Adam's weight decay and momentum would still
            # move the weights). Known only at a read: with log_every > 1 the other steps always take theirs.
            learn = last.pos_pairs + last.neg_pairs + last.mem_pos_pairs + last.mem_neg_pairs > 0
        if learn:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.scheduler.step()
        s.step += 1

    def _enqueue(self, memory: CrossBatchMemory, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        """Write the global batch (the same on every rank, in rank order) into the memory at this step: the
        embeddings the loss uses, detached, from the weights before the optimiser step."""
        feats, labels, idx = batch
        memory.enqueue(feats.detach().float(), labels, idx, step=self.state.step + 1, check_range=False)

    def flush(self) -> StepRecord | None:
        """Read the pending steps' scalars from the device (one sync), check the losses, emit their `step` events
        and append them to the curves; returns the last record. A non-finite loss raises NonFiniteLossError."""
        if not self._pending:
            return None
        hosts, vectors = zip(*self._pending)
        self._pending = []
        rec = None
        for host, numbers in zip(hosts, torch.stack(vectors).tolist()):
            values = dict(zip(_OBJECTIVE, numbers))
            if self.dist.active and numbers[len(_OBJECTIVE)]:
                self.stop_seen = self.stop_seen or self.stop_signal or signal.SIGTERM
            if not math.isfinite(values["loss"]):
                raise NonFiniteLossError(self._nonfinite_message(values["loss"], host["step"]))
            drift_sum, age_sum, count = numbers[len(numbers) - 3:] if self.state.memory is not None else (0, 0, 0)
            rec = StepRecord.of(**values, **host, drift=drift_sum / count if count else None,
                                drift_age=age_sum / count if count else None)
            self.emit(rec.event())
            row = asdict(rec)
            for k in HISTORY_FIELDS:
                self.state.history[k].append(row[k])
        return rec

    def _nonfinite_message(self, value: float, step: int) -> str:
        p, memory, phase = self.params, self.state.memory, self.state.phase
        kept = f"the last good checkpoint {self.last_checkpoint} is kept" if self.last_checkpoint \
            else "no checkpoint had been written yet"
        name = "warmup_lr" if phase == "warmup" else "lr"
        hint = f"lower train.{name} (now {getattr(p.train, name):g})"
        if memory is not None and p.loss.reduction == "sum_over_batch":
            hint += (f", or use loss.reduction: mean_active (sum_over_batch grows with the memory size, "
                     f"now {len(memory)} entries)")
        elif memory is not None:
            hint += f", or lower memory.weight (now {p.memory.weight:g})"
        return f"loss is {value} at step {step} ({phase} phase): training stopped; {kept}. Try: {hint}."

    def _oom_message(self, err: BaseException) -> str:
        p, memory = self.params, self.state.memory
        total = torch.cuda.get_device_properties(self.device).total_memory / 2**30
        mem = ""
        if memory is not None:
            gb = memory.K * memory.dim * memory.get()[0].element_size() / 2**30
            mem = (f", the memory size (memory.ratio / memory.size; now K = {memory.K} x D = {memory.dim}, "
                   f"{gb:.2f} GiB) or use memory.dtype: bfloat16")
        return (f"CUDA out of memory at step {self.step + 1} ({self.state.phase} phase) on "
                f"{torch.cuda.get_device_name()} ({total:.0f} GiB): lower train.batch_size (now "
                f"{p.train.batch_size}) or eval.batch_size (now {p.eval.batch_size}){mem}, use train.precision: "
                f"bfloat16, or a smaller model.backbone (now {p.model.backbone}). ({err})")

    # ---- embeddings of a split: evaluation and memory initialisation ----

    def _embed(self, dataset) -> tuple[torch.Tensor, torch.Tensor]:
        """The current model's embeddings (N x D float32) and labels (N) of `dataset`, in its order; each rank
        embeds a contiguous shard and the shards are gathered in rank order. Leaves the global RNGs as they were."""
        part = self.dist.shard(len(dataset))
        shard = dataset if not self.dist.active else Subset(dataset, range(part.start, part.stop))
        with preserved_rng(), self.autocast():
            feats, labels = compute_embeddings(self.model, shard, self.params.eval.batch_size, self.device,
                                               num_workers=self.params.data.num_workers)
        feats, labels = torch.from_numpy(feats).to(self.device), torch.from_numpy(labels).to(self.device)
        return self.dist.gather_rows(feats), self.dist.gather_rows(labels)

    def evaluate(self, split: str = "val") -> dict[str, float]:
        """Recall@K, MAP@R, R-precision of `split` (no NMI: its k-means would dominate a periodic evaluation).
        Runs on a forked RNG, so evaluating more or less often never changes the training. With several ranks
        each embeds a shard and rank 0 searches once."""
        e = self.params.eval
        if not self.dist.active:
            with preserved_rng(), self.autocast():
                return evaluate_model(self.model, self.splits, split, e.recall_at, e.batch_size, self.device,
                                      nmi=False, num_workers=self.params.data.num_workers)
        feats, labels = self._embed(getattr(self.splits, split))
        metrics = retrieval_metrics(feats.cpu().numpy(), labels.cpu().numpy(), recall_at=e.recall_at, nmi=False,
                                     device=self.device) \
            if self.dist.is_main else None
        return self.dist.broadcast(metrics)

    def init_memory(self) -> CrossBatchMemory:
        """A memory of K = memory.size or round(memory.ratio * N) entries, filled with the current model's
        embeddings of a random (seeded by train.seed) min(K, N) images of the train set, in random order. The
        same on every rank (each embeds a shard of them)."""
        train = self.splits.train
        N = len(train)
        memory = build_memory(self.params, N, self.model.embedding_dim, self.device)
        n = min(memory.K, N)
        self.emit(make_event("phase", self.step, phase="memory_init", total_steps=0, items=n))
        g = torch.Generator().manual_seed(self.params.train.seed)
        pick = torch.randperm(N, generator=g)[:n]  # n dataset indices
        # The images as the test transform shows them (when the dataset offers it): one clean view per image.
        clean = clean_view(train)
        feats, labels = self._embed(Subset(clean, pick.tolist()))
        # Written at the current step, so the ages of the drift measurement count from the end of the warm-up.
        memory.enqueue(feats, labels, pick.to(self.device), step=self.step)
        return memory
