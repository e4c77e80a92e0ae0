"""The training loop of XBM's three phases (Wang et al., CVPR 2020, Alg. 1):

    warm-up      train f with L(batch, batch) only; embeddings drift fast early on, so no memory yet
    memory init  M <- f(random `memory.ratio` of the train set), with the warmed-up f
    xbm          enqueue the batch's detached embeddings into M; L = L(batch, batch) + w * L(batch, M), so M
                 already holds the batch (Alg. 1, as the official code) and each anchor meets the other images of
                 its batch there too, its own stored copies excluded by dataset index; backward; optimiser step.
                 `memory.enqueue: after` enqueues after the loss instead, for the comparison
    baseline     the xbm schedule without memory (`memory.enabled: false`), for a like-for-like comparison

Keeping the memory consistent with the model (the `memory` section; docs/results.md measures each): `store:
features` keeps the backbone's pooled features and embeds them with the current head at every step (the entries
follow the head, where this benchmark's drift is); `momentum` writes the entries with a moving average of the model
(MoCo); `refresh` re-embeds the oldest entries each step; `sdc_sigma` moves the entries by the drift that
re-entering images measure (SDC, in CrossBatchMemory).

The pieces: `Trainer.train_phase` is the loop and `_train_step` one optimiser step. What a checkpoint holds is
one object, `TrainState` (xbmcore/state.py); the checkpoint files and which one continues a phase are in
xbmcore/checkpoint.py. Evaluation, checkpoints, stop signals, the drift probe and the memory view
(xbmcore/memory_view.py) are `Hook`s (xbmcore/hooks.py),
and so is anything a caller adds (`Trainer.hooks`, `train_phase(hooks=...)`). A hook ends a phase early through
`end_phase` (done: the auto warm-up) or `stop` (a checkpoint, then the exception). One `StepRecord` per
optimiser step goes to the sink as a `step` event and into the curves.

The step's scalars (the `_SCALARS` vector) stay on the device and are read every `train.log_every` steps, one
host-device sync for all of them, with the NaN check; checkpoints, evaluations and stops read what is pending
first. Other syncs per step: the index-mode memory's enqueue (how many slots to allocate) and float16's loss
scaler. A non-finite loss stops the run at the read that sees it, before the optimiser step of that read's step:
with log_every 1 the weights never take a non-finite step; with log_every n up to n - 1 steps run past it (their
weights and memory entries are discarded: no checkpoint is written after an unread step), and the last good
checkpoint, at most `train.checkpoint_every` steps back, is kept. Those checkpoints let a phase killed at any
point continue bit-identically on the CPU. SIGTERM/SIGINT stop after the current step with a checkpoint.

Several processes (torchrun, `train.nproc`; see xbmcore/distributed.py): each rank trains on its part of one
global P x M batch, the batch term pairs its anchors with the whole global batch (gathered in rank order,
differentiably) and the memory term with the memory; the global batch is enqueued in rank order on every rank, so
every rank's memory is bit-identical. Rank 0 alone writes checkpoints and events.
"""
from __future__ import annotations

import copy
import logging
import math
import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, NoReturn, Sequence

import torch
from torch.utils.data import DataLoader, Subset

from xbmcore.checkpoint import (
    checkpoint_path, load_checkpoint, preserved_rng, prune_checkpoints, resumable_checkpoint, save_checkpoint,
    training_digest,
)
from xbmcore.config import Params
from xbmcore.data.batch import collate_for, to_device
from xbmcore.distributed import Dist
from xbmcore.device import OutOfMemory, oom_message, resolve_device, resolve_precision
from xbmcore.drift import DriftProbe, Features, WithBackbone, clean_view, staleness
from xbmcore.evaluate import compute_embeddings, evaluate_model, retrieval_metrics
from xbmcore.events import HISTORY_FIELDS, StepRecord, make_event
from xbmcore.hooks import CallerError, Checkpointing, DriftMonitor, Evaluation, Hook, StopOnSignals, TrainingStopped
from xbmcore.losses import XBMObjective, build_loss
from xbmcore.memory import CrossBatchMemory, build_memory
from xbmcore.memory_view import MemoryView
from xbmcore.optim import build_optimizer, lr_factor
from xbmcore.sampler import PKSampler
from xbmcore.state import TrainState

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from xbmcore.data.batch import ImageBatch
    from xbmcore.data.prepare import Splits
    from xbmcore.events import Sink

log = logging.getLogger(__name__)

# The layout of a step's scalars on the device: one float64 vector per step, all read with one sync by `flush`.
# XBMObjective's outputs and the stop flag are summed over the ranks; the memory's drift sums (sum ||new - old||^2,
# sum of ages, count; zeros without a memory) are the same on every rank and are not.
_SUMMED = ("loss", "loss_batch", "loss_memory", "pos_pairs", "neg_pairs", "mem_pos_pairs", "mem_neg_pairs", "stop")
_SCALARS = _SUMMED + ("drift_sum", "age_sum", "drift_count")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped and its last good checkpoint is kept."""


class Trainer:
    """Trains `model` on `splits.train` with P x M batches; emits events to `sink` (rank 0 only).

    `run_dir`: folder for this run's files; a phase checkpoints to `run_dir/<phase>/checkpoints` unless
    `train_phase` is given a `checkpoint_dir` (None for both: no checkpoints). Inside a torchrun job (the
    process group initialised, see xbmcore.distributed) it is one rank of a data-parallel run.

    The constructor resolves the device and precision (``train.device``, ``train.precision``), moves the model
    there, and builds the objective, optimiser, lr schedule, loss scaler, sampler and (with ``train.drift_probe``)
    the drift probe. A run is then ``train_phase("warmup", ...)``, ``memory = init_memory()``,
    ``train_phase("xbm", ..., memory=memory)``, with `evaluate` wherever it is wanted.

    Args:
        params: the run's params (xbmcore.config): the `train`, `loss`, `memory`, `model`, `eval` and `data`
            sections decide the training.
        model: the embedding network, mapping B x 3 x H x W images to B x D unit-norm embeddings (an
            EmbeddingNet of xbmcore.models; ``memory.store: features`` and the drift probe's backbone
            measurement need its backbone, pool and head). Moved to the device; trained in place.
        splits: the prepared dataset's splits (``xbmcore.data.open_splits``): `splits.train` is trained on (its
            labels feed the sampler; it must not be empty), `splits.val` is what `evaluate` scores by default, and
            `splits.test` (or `splits.query` and `splits.gallery`) what ``evaluate("test")`` scores.
        sink: where the run's events go (xbmcore.events): anything with ``emit(event: dict)``, such as a
            `JsonlSink` (the events file), a `ProgressSink`, a `MultiSink` of several, or a `NullSink`. One
            ``phase`` event per phase, one ``step`` event per optimiser step, and ``eval``, ``drift``,
            ``memory_view``, ``checkpoint`` and ``end`` events; only rank 0 emits. The trainer never closes it.
        run_dir: folder for this run's files: phase `p` checkpoints to ``run_dir/<p>/checkpoints`` unless
            `train_phase` is given a `checkpoint_dir`. None: no checkpoints unless `train_phase` names a folder.

    Raises:
        ValueError: an empty training split; ``model.sync_bn`` with several processes on the CPU;
            ``memory.store: features`` with a model that has no backbone, pool and head.

    Attributes:
        params (Params): the run's params.
        model (torch.nn.Module): the model being trained, on `device`.
        net (torch.nn.Module): what the training forward runs through: `model`, or its DistributedDataParallel
            wrapper with several ranks.
        device (torch.device): where training runs.
        amp_dtype (torch.dtype | None): the autocast dtype (bfloat16, float16), None for float32.
        dist (Dist): this process's view of the job's ranks (inactive in a single process).
        objective (XBMObjective): L(batch, batch) + weight * L(batch, memory).
        state (TrainState): everything a checkpoint holds: model, optimiser, scheduler, scaler, memory, step,
            phase, curves, evaluations, RNG states.
        sampler (PKSampler): the P x M batch sampler of this rank.
        hooks (list[Hook]): the caller's hooks, run in every phase after the built-in ones.
        splits (Splits): the dataset's splits.
        sink (Sink): where events go.
        run_dir (Path | None): the run's folder.
        folder (Path | None): the current phase's checkpoint folder (None: no checkpoints).
        last_checkpoint (Path | None): the newest checkpoint written or resumed from in this phase.
        stop_signal (int | None): a SIGTERM/SIGINT received during the phase (set by StopOnSignals).
        staleness (tuple[int, dict] | None): ``(step, xbmcore.drift.staleness(...))`` of the last probe step of
            the XBM phase.
        optimizer: ``state.optimizer``, the torch optimiser (read only).
        scheduler: ``state.scheduler``, the LambdaLR of the phases' lr schedule.
        scaler: ``state.scaler``, float16's GradScaler (disabled otherwise).
        history: ``state.history``, the training curves: one list per `HISTORY_FIELDS` column, one entry per
            step read so far.
        evals: ``state.evals``, the periodic evaluations: dicts of step, phase, split and the metrics.
        step: ``state.step``, the global optimiser step, counted across phases.
        phase: ``state.phase``, the current phase's name.
        probe: ``state.probe``, the drift probe, or None.
        warmup_end: ``state.warmup_end``, the step the warm-up ended at, None until it has.
    """

    def __init__(self, params: Params, model: torch.nn.Module, splits: Splits, sink: Sink,
                 run_dir: str | Path | None = None):
        t = params.train
        self.params, self.sink, self.splits = params, sink, splits
        self.run_dir = None if run_dir is None else Path(run_dir)
        if splits.train is None or len(splits.train) == 0:
            raise ValueError("Trainer: the dataset has no training images (splits.train is empty)")
        if ":" in params.model.backbone and (auto := params.data.unresolved()):
            # Unresolved, the filter and the normalisation would be the built-in backbones' (bilinear, ImageNet).
            raise ValueError(f"Trainer: {', '.join(auto)} say auto, unresolved: {params.model.backbone}'s weights "
                             f"settle them; load the params with xbmcore.backbones.resolve_input(params) first")
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
        # memory.store: features: the memory keeps the backbone's pooled features and the head embeds them each step
        self.store_features = params.memory.enabled and params.memory.store == "features"
        if self.store_features and not WithBackbone.wraps(model):
            raise ValueError("memory.store: features needs a model with a backbone, a pool and a head (EmbeddingNet); "
                             f"{type(model).__name__} has not: use memory.store: embedding")
        self.model = model.to(self.device, memory_format=self._mem_format)
        # train.freeze_backbone_warmup: the backbone's trainable parameters, which the warm-up holds fixed.
        self._frozen_in_warmup: list[torch.nn.Parameter] = []
        if t.freeze_backbone_warmup:
            if not isinstance(getattr(self.model, "backbone", None), torch.nn.Module):
                raise ValueError(f"train.freeze_backbone_warmup: {type(self.model).__name__} has no backbone to "
                                 f"freeze (an EmbeddingNet has)")
            self._frozen_in_warmup = [p for p in self.model.backbone.parameters() if p.requires_grad]
        self._wrap()
        self.objective = XBMObjective(build_loss(params.loss), params.memory.weight).to(self.device)
        optimizer = build_optimizer(params.train, self.model)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        # Loss scaling only for float16; bfloat16 has float32's range and needs none.
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.state = TrainState(self.model, optimizer, scheduler, scaler, self.dist)
        # Each rank draws its part of one global batch of nproc x batch_size.
        self.sampler = PKSampler(splits.train.labels, t.batch_size * self.dist.world, t.images_per_class,
                                 seed=t.seed, rank=self.dist.rank, world=self.dist.world)
        self.hooks: list[Hook] = []  # the caller's, run in every phase
        if t.drift_probe:  # D(t; dt) of fixed training images, a hook of every phase
            # The probe also measures the backbone's pooled features (normalised), where the model exposes them.
            both = WithBackbone(self.model) if WithBackbone.wraps(self.model) else None
            self.state.probe = DriftProbe(splits.train, t.drift_probe, t.drift_every, t.drift_dts, seed=t.seed,
                                          embed=lambda ds: self._embed(ds, both)[0],
                                          split=self.model.embedding_dim if both else None)
            self.hooks.append(DriftMonitor())
        if t.memory_view_every:  # each probe anchor's hardest memory negatives, with their age (observation only)
            self.hooks.append(MemoryView(t.memory_view_every, t.memory_view_k, t.memory_view_anchors))
        self._end_now = False
        self.folder: Path | None = None  # the current phase's checkpoint folder
        self.last_checkpoint: Path | None = None
        self.stop_signal: int | None = None  # set by StopOnSignals' handler
        self.stop_seen: int | None = None  # with several ranks: a stop signal any rank had, as of the last read
        self._pending: list[tuple[dict[str, Any], torch.Tensor]] = []  # records whose scalars are on the device
        self.staleness: tuple[int, dict[str, Any]] | None = None  # (step, xbmcore.drift.staleness) of a probe step
        self._clean_train = clean_view(splits.train)  # the images a memory refresh re-embeds
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
        """Called by a hook: the phase is done after this step, before its planned length (the auto warm-up)."""
        self._end_now = True

    def stop(self, error: BaseException) -> NoReturn:
        """Called by a hook, the one way to stop a phase early: a checkpoint of this step, then `error` raised out
        of train_phase (a TrainingStopped gets the checkpoint's path; a CallerError is unwrapped).

        Args:
            error: the exception `train_phase` raises: a TrainingStopped (a stop signal), or a CallerError that
                wraps an exception of the caller's, which train_phase re-raises unwrapped.

        Raises:
            BaseException: `error`, always.
        """
        self.checkpoint()
        if isinstance(error, TrainingStopped):
            error.checkpoint = self.last_checkpoint
        raise error

    def state_dict(self) -> dict[str, Any]:
        """The training state as a checkpoint holds it (`TrainState.state_dict`); collective with several ranks.

        Returns:
            A plain dict of tensors, numbers, strings, lists and dicts that `torch.load(weights_only=True)` reads.
        """
        return self.state.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from `state_dict` (a checkpoint, or a stage's final state): see TrainState.

        Args:
            state: what `state_dict` returned (e.g. ``xbmcore.checkpoint.load_checkpoint(path)``).
        """
        self.state.load_state_dict(state)

    def emit(self, event: dict[str, Any]) -> None:
        """Send an event to the sink (rank 0 only; other ranks drop it).

        Args:
            event: an event made by ``xbmcore.events.make_event``.
        """
        if self.dist.is_main:
            self.sink.emit(event)

    # ---- construction helpers ----

    def _wrap(self) -> None:
        # The module the training forward runs through: DDP averages the ranks' gradients during backward. DDP
        # takes the parameters that require a gradient when it is built, so it is built again when they change.
        self.net = self.model if not self.dist.active else torch.nn.parallel.DistributedDataParallel(
            self.model, device_ids=[torch.cuda.current_device()] if self.cuda else None)

    def _freeze_backbone(self, frozen: bool) -> None:
        """train.freeze_backbone_warmup: the backbone's weights fixed (the warm-up) or trained (the other phases).
        The optimiser keeps them: a parameter without a gradient is skipped by its step and keeps its state."""
        params = self._frozen_in_warmup
        if not params or all(p.requires_grad != frozen for p in params):
            return
        for p in params:
            p.requires_grad_(not frozen)
        self._wrap()

    def _lr_factor(self, step: int) -> float:
        warmup_end = self.state.warmup_end if getattr(self, "state", None) else None  # None while building it
        return lr_factor(self.params.train, step, warmup_end)

    def set_lr(self, lr: float, weight_decay: float | None = None) -> None:
        """Make `lr` (and the weight decay) rule from here on: each phase starts with its own lr, also after
        loading a state whose optimiser carries another (a shared warm-up in a study trial).

        Args:
            lr: the base learning rate; the schedule (``train.lr_schedule``) multiplies it from the current step.
            weight_decay: the optimiser's new weight decay; None keeps the current one.
        """
        # A group's lr_scale (train.backbone_lr_scale: the backbone's group) scales the phase's lr.
        self.scheduler.base_lrs = [lr * g.get("lr_scale", 1.0) for g in self.optimizer.param_groups]
        for g, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            g["initial_lr"] = base
            g["lr"] = base * self._lr_factor(self.step)
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

    def _batches(self) -> Iterator:
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

    def to_device(self, batch: ImageBatch | Sequence[torch.Tensor]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The one place a training batch moves to the device: images B x 3 x H x W (channels_last on a GPU),
        labels B, dataset indices B. A cached batch of raw images is cropped, resized, flipped and normalised
        there (xbmcore.data.batch).

        Args:
            batch: what the training DataLoader yields: ``(images, labels, indices)`` tensors, or an ImageBatch
                of raw cached images.

        Returns:
            ``(images, labels, indices)`` on the training device.
        """
        return to_device(batch, self.device, self._mem_format)

    def autocast(self) -> torch.autocast:
        """The training precision's autocast context (float32: a no-op), for hooks that run the model.

        Returns:
            A ``torch.autocast`` context manager: ``with trainer.autocast(): model(images)``.
        """
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    def train_phase(self, phase: str, steps: int, memory: CrossBatchMemory | None = None,
                    checkpoint_dir: str | Path | None = None, on_eval: Callable[[int, dict], None] | None = None,
                    hooks: Sequence[Hook] = ()) -> None:
        """Train `steps` optimiser steps from the current state: phase "warmup" | "xbm" | "baseline".

        When `checkpoint_dir` holds a checkpoint of the same phase, parameters and starting step, the phase
        continues from it. `on_eval(step, metrics)` is called after each periodic evaluation; an exception it
        raises propagates after a checkpoint of that step is written.

        Every phase runs the built-in hooks (evaluation every ``train.eval_every`` steps, a checkpoint every
        ``train.checkpoint_every`` steps and at the end, stop signals), then `Trainer.hooks`, then `hooks`. The
        phase emits a ``phase`` event first, and an ``end`` event when it stops or fails.

        Args:
            phase: ``"warmup"`` (L(batch, batch) only, at ``train.warmup_lr``), ``"xbm"`` (with the memory, at
                ``train.lr``) or ``"baseline"`` (the xbm schedule without a memory).
            steps: optimiser steps to train (>= 0); the phase ends at global step ``step + steps``, or earlier
                when a hook ends it (the auto warm-up).
            memory: the cross-batch memory (`init_memory`): required for ``"xbm"``, refused for the others.
            checkpoint_dir: the phase's checkpoint folder; None: ``run_dir/<phase>/checkpoints``, or no
                checkpoints without a run_dir.
            on_eval: called as ``on_eval(step, metrics)`` after each periodic evaluation (``train.eval_every``);
                metrics as `evaluate` returns them. An exception it raises (e.g. a pruned study trial) ends the
                phase after a checkpoint and propagates unchanged.
            hooks: extra hooks for this phase only, run after `Trainer.hooks`.

        Raises:
            ValueError: an unknown phase, a memory missing for "xbm" or given to another phase, steps < 0, or a
                checkpoint of another process count.
            NonFiniteLossError: the loss became NaN or infinite; the last good checkpoint is kept.
            TrainingStopped: SIGTERM or SIGINT; the phase stopped after a step, with a checkpoint.
            OutOfMemory: the GPU ran out of memory; the message names the params to lower.
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
                    raise OutOfMemory(oom_message(err, self.params, self.device, self.state.memory, self.step + 1,
                                                      self.phase)) from err
                t0 = time.perf_counter()
                for h in hooks:
                    h.on_step(self)
                self._clock += time.perf_counter() - t0  # images/s measures training, not the hooks
            self.flush()
            if phase == "warmup":
                s.warmup_end = s.step
        except CallerError as wrapped:  # the caller's own exception (e.g. a pruned trial): not a failure here
            error = wrapped.args[0]
            raise error from None
        except BaseException as err:
            error = err
            if isinstance(err, TrainingStopped):
                self.emit(make_event("end", self.step, status="stopped", message=str(err)))
            elif isinstance(err, Exception):
                self.emit(make_event("end", self.step, status="failed", message=f"{type(err).__name__}: {err}"))
            raise
        finally:
            self._pending = []
            for h in hooks:
                h.on_phase_end(self, error)

    def _begin(self, phase: str, steps: int, memory: CrossBatchMemory | None,
               checkpoint_dir: str | Path | None) -> int:
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
        # memory.momentum: the entries are written by a moving average of the model (MoCo's key encoder), which
        # starts as the model where the XBM phase starts; a resume restores it.
        s.ema = None
        if memory is not None and self.params.memory.momentum > 0:
            s.ema = copy.deepcopy(self.model).requires_grad_(False)
        start, end = s.step, s.step + steps
        self._freeze_backbone(phase == "warmup")
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

    def _train_step(self, batch: ImageBatch | Sequence[torch.Tensor]) -> None:
        """One optimiser step. Its scalars join the pending records (read by `flush`, every log_every steps)."""
        s, memory, d = self.state, self.state.memory, self.dist
        imgs, labels, idx = self.to_device(batch)  # this rank's b = batch_size images
        before = memory is not None and self.params.memory.enqueue == "before"
        with self.autocast():
            if memory is not None and self.params.memory.refresh:
                self._refresh(memory)
            if self.store_features:
                emb, feats = self.net(imgs, with_features=True)  # b x D unit norm, b x C pooled features
            else:
                emb = self.net(imgs)  # b x D, unit norm
            # The global batch, B = nproc x b, in rank order; the embeddings keep their gradient.
            batch = (emb, labels, idx) if not d.active else \
                (d.gather(emb, differentiable=True), d.gather(labels), d.gather(idx))
            stored = batch  # what the memory stores of the batch
            if self.store_features:
                stored = (feats if not d.active else d.gather(feats.detach()), batch[1], batch[2])
            elif s.ema is not None:  # the moving average's embeddings
                with torch.no_grad():
                    keys = s.ema(imgs)
                stored = (keys if not d.active else d.gather(keys), batch[1], batch[2])
            if before:  # Alg. 1: M holds this batch (detached) when the anchors meet it
                self._enqueue(memory, stored)
            entries = None
            if self.store_features and memory is not None and len(memory):
                with torch.no_grad():  # the stored features as the current head embeds them
                    entries = self.model.embed_features(memory.get()[0])
            extra = {} if entries is None else {"entries": entries}
            if not d.active:
                out = self.objective(emb, labels, idx, memory, **extra)
            else:
                out = self.objective(emb, labels, idx, memory, batch=batch, count=d.sum, **extra)
            if memory is not None and self.probe is not None and (s.step + 1) % self.params.train.drift_every == 0:
                # where the memory term's gradient comes from, by the age of the entries (a probe step's extra)
                self.staleness = (s.step + 1, staleness(self.objective.loss, emb, labels, idx, memory, s.step + 1,
                                                        entries))
        loss = out["loss"] if not d.active else out["loss"] * d.world  # DDP averages: undo its 1/world
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        # The stop flag travels with the ranks' partial sums, so every rank stops after the same step.
        flag = out["loss"].detach().new_full((), float(self.stop_signal is not None), dtype=torch.float64)
        summed = torch.stack([*(out[k].detach().double() for k in _SUMMED[:-1]), flag])
        if d.active:
            summed = d.sum(summed)
        if memory is not None and not before:  # memory.enqueue: after: the batch joins M for the next steps only
            self._enqueue(memory, stored)
        drift = memory.drift_last if memory is not None else summed.new_zeros(len(_SCALARS) - len(_SUMMED))
        now = time.perf_counter()
        images_per_s = self.params.train.batch_size * d.world / max(now - self._clock, 1e-9)
        self._clock = now
        host = dict(step=s.step + 1, phase=s.phase, lr=self.optimizer.param_groups[0]["lr"],
                    memory_fill=0.0 if memory is None else memory.fill_level,
                    memory_size=0 if memory is None else len(memory), images_per_s=images_per_s)
        self._pending.append((host, torch.cat([summed, drift])))
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
            if s.ema is not None:
                self._update_ema(s.ema, self.params.memory.momentum)
        self.scheduler.step()
        s.step += 1

    @torch.no_grad()
    def _update_ema(self, ema: torch.nn.Module, momentum: float) -> None:
        """ema <- momentum * ema + (1 - momentum) * model for the parameters; the buffers (BatchNorm's running
        statistics) are the model's."""
        mine, theirs = list(ema.parameters()), list(self.model.parameters())
        torch._foreach_lerp_(mine, theirs, 1.0 - momentum)
        for a, b in zip(ema.buffers(), self.model.buffers()):
            a.copy_(b)

    @torch.no_grad()
    def _refresh(self, memory: CrossBatchMemory) -> None:
        """memory.refresh: the oldest entries re-embedded with the current weights (the moving average's with
        memory.momentum), their images seen as memory initialisation sees them (the test view, eval mode); the
        same on every rank."""
        # not the slots this step's batch overwrites: in queue mode those are the oldest, refreshed for nothing
        slots = memory.oldest(self.params.memory.refresh, skip_next=self.params.train.batch_size * self.dist.world)
        items = memory.indices[slots].tolist()
        if not items:
            return
        ds = self._clean_train
        raw = ds.__getitems__(items) if hasattr(ds, "__getitems__") else [ds[i] for i in items]
        imgs, _, _ = self.to_device(collate_for(self.device)(raw))
        encoder = self.state.ema if self.state.ema is not None else self.model
        if self.store_features:
            encoder = Features(encoder)
        was = encoder.training
        encoder.eval()
        try:
            feats = encoder(imgs).float()
        finally:
            encoder.train(was)
        memory.rewrite(slots, feats, step=self.state.step + 1)

    def _enqueue(self, memory: CrossBatchMemory, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        """Write the global batch (the same on every rank, in rank order) into the memory at this step: the
        embeddings the loss uses, detached, from the weights before the optimiser step."""
        feats, labels, idx = batch
        memory.enqueue(feats.detach().float(), labels, idx, step=self.state.step + 1, check_range=False)

    def flush(self) -> StepRecord | None:
        """Read the pending steps' scalars from the device (one sync), check the losses, emit their `step` events
        and append them to the curves; returns the last record. A non-finite loss raises NonFiniteLossError.

        Hooks call it before they read `history` or the model's losses (the step's scalars stay on the device
        until ``train.log_every`` steps have passed).

        Returns:
            The last pending step's record, or None when nothing was pending.

        Raises:
            NonFiniteLossError: a pending step's loss is NaN or infinite.
        """
        if not self._pending:
            return None
        hosts, vectors = zip(*self._pending)
        self._pending = []
        rec = None
        for host, numbers in zip(hosts, torch.stack(vectors).tolist()):
            v = dict(zip(_SCALARS, numbers))
            if v.pop("stop"):  # some rank had a stop signal
                self.stop_seen = self.stop_seen or self.stop_signal or signal.SIGTERM
            if not math.isfinite(v["loss"]):
                raise NonFiniteLossError(self._nonfinite_message(v["loss"], host["step"]))
            drift_sum, age_sum, count = v.pop("drift_sum"), v.pop("age_sum"), v.pop("drift_count")
            rec = StepRecord.of(**v, **host, drift=drift_sum / count if count else None,
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

    # ---- embeddings of a split: evaluation and memory initialisation ----

    def _embed(self, dataset: Dataset, model: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The current model's (or `model`'s) embeddings (N x D float32) and labels (N) of `dataset`, in its
        order; each rank embeds a contiguous shard and the shards are gathered in rank order. Leaves the global
        RNGs as they were."""
        part = self.dist.shard(len(dataset))
        shard = dataset if not self.dist.active else Subset(dataset, range(part.start, part.stop))
        with preserved_rng(), self.autocast():
            feats, labels = compute_embeddings(model or self.model, shard, self.params.eval.batch_size, self.device,
                                               num_workers=self.params.data.num_workers)
        feats, labels = torch.from_numpy(feats).to(self.device), torch.from_numpy(labels).to(self.device)
        return self.dist.gather_rows(feats), self.dist.gather_rows(labels)

    def evaluate(self, split: str = "val") -> dict[str, float]:
        """Recall@K, MAP@R, R-precision of `split` (no NMI: its k-means would dominate a periodic evaluation).
        Runs on a forked RNG, so evaluating more or less often never changes the training. With several ranks
        each embeds a shard and rank 0 searches once.

        Args:
            split: ``"val"`` (the val split searched in itself) or ``"test"`` (the test split in itself, or the
                query set in the gallery set); see ``xbmcore.evaluate.eval_sets``.

        Returns:
            ``{"recall@K": ..., "map@r": ..., "r_precision": ...}`` with one recall per ``eval.recall_at``, the
                same on every rank.

        Raises:
            ValueError: the dataset has no such split.
        """
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

    @property
    def memory_dim(self) -> int:
        """The width of a memory entry: the embedding's D, or the backbone's C with memory.store: features."""
        return self.model.feat_dim if self.store_features else self.model.embedding_dim

    def init_memory(self) -> CrossBatchMemory:
        """A memory of K = memory.size or round(memory.ratio * N) entries, filled with the current model's
        embeddings of a random (seeded by train.seed) min(K, N) images of the train set, in random order. The
        same on every rank (each embeds a shard of them).

        The images are seen through the test transform, one clean view each, and written at the current step
        (the end of the warm-up). Emits a ``phase`` event of the ``memory_init`` phase.

        Returns:
            The filled CrossBatchMemory, for ``train_phase("xbm", ..., memory=...)``.
        """
        train = self.splits.train
        N = len(train)
        memory = build_memory(self.params, N, self.memory_dim, self.device)
        n = min(memory.K, N)
        self.emit(make_event("phase", self.step, phase="memory_init", total_steps=0, items=n))
        g = torch.Generator().manual_seed(self.params.train.seed)
        pick = torch.randperm(N, generator=g)[:n]  # n dataset indices
        # The images as the test transform shows them (when the dataset offers it): one clean view per image.
        clean = clean_view(train)
        feats, labels = self._embed(Subset(clean, pick.tolist()), Features(self.model) if self.store_features else None)
        # Written at the current step, so the ages of the drift measurement count from the end of the warm-up.
        memory.enqueue(feats, labels, pick.to(self.device), step=self.step)
        return memory
