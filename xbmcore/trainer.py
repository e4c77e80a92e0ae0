"""The training loop of XBM's three phases (Wang et al., CVPR 2020, Alg. 1):

    warm-up      train f with L(batch, batch) only; embeddings drift fast early on, so no memory yet
    memory init  M <- f(random `memory.ratio` of the train set), with the warmed-up f
    xbm          L = L(batch, batch) + w * L(batch, M); backward, step; THEN enqueue the batch (after the loss,
                 so an anchor is never compared with its own fresh copy)
    baseline     the xbm schedule without memory (`memory.enabled: false`), for a like-for-like comparison

One `step` event per optimiser step goes to the sink (loss parts, active pairs, memory fill, drift and its age, lr,
images/s), an `eval` event every `train.eval_every` steps (val split). Checkpoints every `train.checkpoint_every`
steps hold everything that decides the continuation (model, optimiser, scheduler, scaler, memory, sampler
position, RNG states, step, curves), so a phase killed at any point and started again continues bit-identically
on the CPU. SIGTERM/SIGINT stop after the current step with a checkpoint.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Subset
from torch.utils.data._utils.collate import default_collate

from xbmcore.checkpoint import (
    checkpoint_path, list_checkpoints, load_checkpoint, prune_checkpoints, rng_state, save_checkpoint,
    set_rng_state,
)
from xbmcore.config import Params
from xbmcore.drift import DriftMonitor, DriftProbe, clean_view
from xbmcore.evaluate import compute_embeddings, evaluate_model
from xbmcore.events import make_event
from xbmcore.losses import XBMObjective, build_loss
from xbmcore.memory import CrossBatchMemory
from xbmcore.sampler import PKSampler

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 2  # 2: the warm-up's end step and the drift probe
# Curves kept in the training state (and hence in checkpoints): the DVC plots are written from them, so a
# resumed run's curves are continuous without re-reading any log.
HISTORY_FIELDS = ("step", "phase", "loss", "loss_batch", "loss_memory", "pos_pairs", "neg_pairs",
                  "mem_pos_pairs", "mem_neg_pairs", "memory_fill", "drift", "drift_age", "lr")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Scalars of XBMObjective's output, read back once per step.
STEP_SCALARS = ("loss", "loss_batch", "loss_memory", "pos_pairs", "neg_pairs", "mem_pos_pairs", "mem_neg_pairs")
# Train params that change how a run is operated, not what it computes (evaluation runs on a forked RNG).
_OPERATIONAL = ("checkpoint_every", "eval_every", "num_threads", "device", "precision")
# The drift probe's and the auto warm-up's: they decide what is computed only when the warm-up ends on drift.
_DRIFT = ("drift_probe", "drift_every", "drift_dts", "warmup_drift", "warmup_drift_dt", "warmup_min_steps",
          "warmup_max_steps")


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
    for step, path in reversed(list_checkpoints(folder)):
        try:
            state = load_checkpoint(path)
        except ValueError as err:
            log.warning("skipping %s", err)
            stale.append(path)
            continue
        if (state.get("format"), state.get("phase"), state.get("digest"), state.get("phase_start")) == \
                (CHECKPOINT_FORMAT, phase, digest, start) and start <= step <= end:
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


def _collate(batch):
    # A dataset's __getitems__ may return the collated (images, labels, indices) already, or a list of samples.
    if isinstance(batch, (tuple, list)) and len(batch) == 3 and isinstance(batch[0], torch.Tensor) \
            and batch[0].dim() == 4:
        return batch
    return default_collate(batch)


@contextlib.contextmanager
def preserved_rng():
    """Run a block (evaluation) without moving the global RNG streams, so training does not depend on it."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


class Trainer:
    """Trains `model` on `splits.train` with P x M batches; emits events to `sink`.

    `run_dir`: folder for this run's files; a phase checkpoints to `run_dir/<phase>/checkpoints` unless
    `train_phase` is given a `checkpoint_dir` (None for both: no checkpoints).
    """

    def __init__(self, params: Params, model: torch.nn.Module, splits, sink, run_dir: str | Path | None = None):
        t = params.train
        self.params = params
        self.sink = sink
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.splits = splits
        if splits.train is None or len(splits.train) == 0:
            raise ValueError("Trainer: the dataset has no training images (splits.train is empty)")
        self.device = resolve_device(t.device)
        self.cuda = self.device.type == "cuda"
        self.amp_dtype = resolve_precision(t.precision, self.device)
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        if self.cuda:
            torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest kernels once
        # channels_last lets cuDNN use its NHWC tensor-core kernels; a no-op choice on the CPU.
        self._mem_format = torch.channels_last if self.cuda else torch.contiguous_format
        self.model = model.to(self.device, memory_format=self._mem_format)
        # The step the warm-up ended at (None until it has): the XBM phase's cosine schedule counts from it.
        self.warmup_end: int | None = None
        self.objective = XBMObjective(build_loss(params.loss), params.memory.weight).to(self.device)
        self.optimizer = self._build_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        # Loss scaling only for float16; bfloat16 has float32's range and needs none.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.sampler = PKSampler(splits.train.labels, t.batch_size, t.images_per_class, seed=t.seed)
        self.step = 0  # global optimiser step, counted across phases
        self.history: dict[str, list] = {k: [] for k in HISTORY_FIELDS}
        self.evals: list[dict[str, Any]] = []  # {"step", "phase", "split", metric: value, ...}
        self._stop_signal: int | None = None
        self._last_checkpoint: Path | None = None
        self.phase: str | None = None
        self._end_now = False
        self.probe = None if not t.drift_probe else DriftProbe(
            splits.train, t.drift_probe, t.drift_every, t.drift_dts, seed=t.seed, batch_size=params.eval.batch_size,
            device=self.device, num_workers=params.data.num_workers, autocast=self._autocast)
        # Hooks of the loop: on_phase_start(trainer) once the phase (re)starts, on_step(trainer) after each step.
        self.hooks = [] if self.probe is None else [DriftMonitor(self.probe, t)]

    def emit(self, event: dict[str, Any]) -> None:
        self.sink.emit(event)

    def end_phase(self) -> None:
        """Called by a hook: the phase ends after this step (with a checkpoint), before its planned length."""
        self._end_now = True

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
        start = self.warmup_end if self.warmup_end is not None else t.warmup_budget
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

    # ---- state ----

    def state_dict(self, phase: str, phase_start: int, memory: CrossBatchMemory | None) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "phase": phase,
            "phase_start": phase_start,
            "digest": training_digest(self.params, phase),
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            # Position in the sampler's stream = batches consumed = steps taken (one batch per step); exact even
            # when DataLoader workers have prefetched batches ahead.
            "sampler": self.sampler.state_after(self.step),
            "rng": rng_state(),
            "memory": None if memory is None else memory.state_dict(),
            "history": self.history,
            "evals": self.evals,
            "warmup_end": self.warmup_end,
            "drift_probe": None if self.probe is None else self.probe.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any], memory: CrossBatchMemory | None = None) -> None:
        """Restore a state saved by `state_dict` (a checkpoint or a stage's final state)."""
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"checkpoint format {state.get('format')!r}, expected {CHECKPOINT_FORMAT}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.history = {k: list(state["history"][k]) for k in HISTORY_FIELDS}
        self.evals = list(state["evals"])
        self.warmup_end = state["warmup_end"]
        if self.probe is not None:
            self.probe.load_state_dict(state["drift_probe"])
        if memory is not None:
            if state["memory"] is None:
                raise ValueError("the checkpoint holds no memory, but a memory was given to restore")
            memory.load_state_dict(state["memory"])

    def save(self, path: str | Path, phase: str, phase_start: int,
             memory: CrossBatchMemory | None = None) -> Path:
        path = save_checkpoint(self.state_dict(phase, phase_start, memory), path)
        self.sink.emit(make_event("checkpoint", self.step, path=str(path)))
        return path

    def _resume(self, folder: Path, phase: str, start: int, end: int, memory: CrossBatchMemory | None) -> bool:
        """Continue from the newest valid checkpoint of this phase in `folder`; stale ones are deleted."""
        found = resumable_checkpoint(folder, self.params, phase, start, end, delete_stale=True)
        if found is None:
            return False
        path, state = found
        self.load_state_dict(state, memory)
        self._last_checkpoint = path
        log.info("%s phase resumed from %s at step %d of %d", phase, path, self.step, end)
        return True

    # ---- the loop ----

    def _batches(self):
        t, nw = self.params.train, self.params.data.num_workers
        # Restart the stream exactly after the last consumed batch (workers may have prefetched past it).
        self.sampler.load_state_dict(self.sampler.state_after(self.step))
        # Own generator for the workers' base seed: creating the iterator must not draw from the global RNG,
        # whose state a checkpoint restores.
        gen = torch.Generator().manual_seed(t.seed * 1_000_003 + self.step)
        loader = DataLoader(self.splits.train, batch_sampler=self.sampler, num_workers=nw, collate_fn=_collate,
                            pin_memory=self.cuda, persistent_workers=False, generator=gen)
        return iter(loader)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    def _train_step(self, batch, memory: CrossBatchMemory | None, phase: str) -> dict[str, float]:
        """One optimiser step; returns the loss parts, pair counts, lr and drift (None when no stored embedding was
        replaced) as Python numbers."""
        imgs, labels, idx = batch
        imgs = imgs.to(self.device, non_blocking=True, memory_format=self._mem_format)  # B x 3 x H x W
        labels = torch.as_tensor(labels).to(self.device, non_blocking=True)  # B
        idx = torch.as_tensor(idx).to(self.device, non_blocking=True)  # B, dataset indices
        with self._autocast():
            emb = self.model(imgs)  # B x D, unit norm
            out = self.objective(emb, labels, idx, memory)
        loss = out["loss"]
        learn = loss.requires_grad  # False when no pair is active: nothing to learn from this batch
        if learn:
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
        parts = [out[k].detach().double() for k in STEP_SCALARS]
        if memory is not None:
            # After the loss: the batch joins the memory for the NEXT steps (Alg. 1 of the paper). `emb` is the
            # forward's output, so enqueueing before the optimiser step stores the same values, and the drift
            # it measures joins the one sync below. (A non-finite loss ends the run; the memory in checkpoints
            # is the last good one.)
            memory.enqueue(emb.detach().float(), labels, idx, step=self.step + 1)
            parts += list(memory.drift_last)  # sum ||new - old||^2, sum of ages, count
        # The step's one host-device sync, after the backward is queued: all scalars at once.
        numbers = torch.stack(parts).tolist()
        values: dict[str, float | None] = dict(zip(STEP_SCALARS, numbers))
        if not math.isfinite(values["loss"]):  # before the optimiser step: the weights stay the last good ones
            raise NonFiniteLossError(self._nonfinite_message(values["loss"], phase, memory))
        values["lr"] = self.optimizer.param_groups[0]["lr"]  # the lr of this step
        drift_sum, age_sum, count = numbers[len(STEP_SCALARS):] or (0.0, 0.0, 0.0)
        values["drift"] = drift_sum / count if count else None
        values["drift_age"] = age_sum / count if count else None
        if learn:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.scheduler.step()
        return values

    def _nonfinite_message(self, value: float, phase: str, memory: CrossBatchMemory | None) -> str:
        p = self.params
        kept = f"the last good checkpoint {self._last_checkpoint} is kept" if self._last_checkpoint \
            else "no checkpoint had been written yet"
        name = "warmup_lr" if phase == "warmup" else "lr"
        hint = f"lower train.{name} (now {getattr(p.train, name):g})"
        if memory is not None and p.loss.reduction == "sum_over_batch":
            hint += (f", or use loss.reduction: mean_active (sum_over_batch grows with the memory size, "
                     f"now {len(memory)} entries)")
        elif memory is not None:
            hint += f", or lower memory.weight (now {p.memory.weight:g})"
        return f"loss is {value} at step {self.step + 1} ({phase} phase): training stopped; {kept}. Try: {hint}."

    def _oom_message(self, err: BaseException, phase: str, memory: CrossBatchMemory | None) -> str:
        p = self.params
        total = torch.cuda.get_device_properties(self.device).total_memory / 2**30
        mem = ""
        if memory is not None:
            gb = memory.K * memory.dim * memory.get()[0].element_size() / 2**30
            mem = (f", the memory size (memory.ratio / memory.size; now K = {memory.K} x D = {memory.dim}, "
                   f"{gb:.2f} GiB) or use memory.dtype: bfloat16")
        return (f"CUDA out of memory at step {self.step + 1} ({phase} phase) on {torch.cuda.get_device_name()} "
                f"({total:.0f} GiB): lower train.batch_size (now {p.train.batch_size}) or eval.batch_size (now "
                f"{p.eval.batch_size}){mem}, use train.precision: bfloat16, or a smaller model.backbone "
                f"(now {p.model.backbone}). ({err})")

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """SIGTERM/SIGINT set a flag the loop checks after each step; a second SIGINT interrupts at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        sigs = (signal.SIGTERM, signal.SIGINT)
        previous = {s: signal.getsignal(s) for s in sigs}

        def handler(signum, frame):
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._stop_signal = signum

        self._stop_signal = None
        for s in sigs:
            signal.signal(s, handler)
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def evaluate(self, split: str = "val") -> dict[str, float]:
        """Recall@K, MAP@R, R-precision of `split` (no NMI: its k-means would dominate a periodic evaluation).
        Runs on a forked RNG, so evaluating more or less often never changes the training."""
        e = self.params.eval
        with preserved_rng(), self._autocast():
            return evaluate_model(self.model, self.splits, split, e.recall_at, e.batch_size, self.device,
                                  nmi=False, num_workers=self.params.data.num_workers)

    def train_phase(self, phase: str, steps: int, memory: CrossBatchMemory | None = None,
                    checkpoint_dir: str | Path | None = None,
                    on_eval: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
        """Train `steps` optimiser steps from the current state: phase "warmup" | "xbm" | "baseline".

        When `checkpoint_dir` holds a checkpoint of the same phase, parameters and starting step, the phase
        continues from it. `on_eval(step, metrics)` is called after each periodic evaluation; an exception it
        raises propagates after a checkpoint of that step is written. Returns the last step event.
        """
        if phase not in ("warmup", "xbm", "baseline"):
            raise ValueError(f"phase: expected warmup, xbm or baseline, got {phase!r}")
        if (phase == "xbm") != (memory is not None):
            raise ValueError(f"phase {phase!r}: " + ("needs a memory" if phase == "xbm" else "takes no memory"))
        if steps < 0:
            raise ValueError(f"steps: expected >= 0, got {steps}")
        if checkpoint_dir is None and self.run_dir is not None:
            checkpoint_dir = self.run_dir / phase / "checkpoints"
        folder = None if checkpoint_dir is None else Path(checkpoint_dir)
        t = self.params.train
        start = self.step
        end = start + steps
        self.set_lr(t.warmup_lr if phase == "warmup" else t.lr, t.weight_decay)
        resumed = folder is not None and self._resume(folder, phase, start, end, memory)
        if phase == "warmup" and self.warmup_end is not None:
            end = self.step  # resumed after the auto warm-up had ended: nothing left to train
        if memory is not None and self.params.loss.reduction == "sum_over_batch":
            # Not an error (it is the official code's reduction), but the usual cause of a silent collapse.
            log.warning("loss.reduction sum_over_batch: the memory term sums ~K/B = %.0f times as many pairs as "
                        "the batch term; if Recall@1 falls and drift rises when the memory switches on, use "
                        "loss.reduction: mean_active or a lower memory.weight", memory.K / t.batch_size)
        self.model.train()
        self.sink.emit(make_event("phase", self.step, phase=phase, total_steps=steps, start_step=start,
                                  resumed=resumed))
        self.phase, self._end_now = phase, False
        for h in self.hooks:
            h.on_phase_start(self)

        def checkpoint() -> None:
            if folder is not None:
                self._last_checkpoint = self.save(checkpoint_path(folder, self.step), phase, start, memory)
                prune_checkpoints(folder, keep=2)

        last: dict[str, Any] = {}
        batches = self._batches() if self.step < end else None
        B = t.batch_size
        tick = time.perf_counter()
        with self._stop_on_signals():
            try:
                while self.step < end:
                    try:
                        out = self._train_step(next(batches), memory, phase)
                    except torch.OutOfMemoryError as err:
                        raise OutOfMemory(self._oom_message(err, phase, memory)) from err
                    self.step += 1
                    now = time.perf_counter()
                    last = self._record(phase, out, memory, B / max(now - tick, 1e-9))
                    for h in self.hooks:
                        h.on_step(self)
                    tick = time.perf_counter()  # images/s measures training, not the hooks
                    if t.eval_every and self.step % t.eval_every == 0:
                        metrics = self.evaluate("val")
                        self.evals.append({"step": self.step, "phase": phase, "split": "val", **metrics})
                        self.sink.emit(make_event("eval", self.step, phase=phase, split="val", metrics=metrics))
                        if on_eval is not None:
                            try:
                                on_eval(self.step, metrics)
                            except BaseException as err:
                                checkpoint()
                                raise _CallerError(err) from err
                        tick = time.perf_counter()  # images/s measures training, not evaluation
                    stop = self._stop_signal is not None
                    if self._end_now:
                        end = self.step
                        if phase == "warmup":  # before the checkpoint: a resumed run must not train on
                            self.warmup_end = self.step
                    if stop or self.step % t.checkpoint_every == 0 or self.step == end:
                        checkpoint()
                        tick = time.perf_counter()
                    if stop:
                        name = signal.Signals(self._stop_signal).name
                        msg = (f"stopped by {name} after step {self.step} ({phase} phase); "
                               f"checkpoint {self._last_checkpoint}" if folder else
                               f"stopped by {name} after step {self.step} ({phase} phase); no checkpoint folder")
                        self.sink.emit(make_event("end", self.step, status="stopped", message=msg))
                        raise TrainingStopped(self._stop_signal, msg)
                if phase == "warmup":
                    self.warmup_end = self.step
            except _CallerError as wrapped:
                raise wrapped.__cause__  # the caller's own exception (e.g. a pruned trial): not a failure here
            except Exception as err:
                if not isinstance(err, TrainingStopped):
                    self.sink.emit(make_event("end", self.step, status="failed",
                                              message=f"{type(err).__name__}: {err}"))
                raise
        return last

    def _record(self, phase: str, values: dict[str, float | None], memory: CrossBatchMemory | None,
                images_per_s: float) -> dict[str, Any]:
        """Emit the step event and append it to the curves."""
        rec: dict[str, Any] = {k: int(v) if k.endswith("_pairs") else v for k, v in values.items()}
        rec.update(
            phase=phase,
            memory_fill=0.0 if memory is None else float(memory.fill_level),
            memory_size=0 if memory is None else len(memory),
            images_per_s=images_per_s,
        )
        self.sink.emit(make_event("step", self.step, **rec))
        for k in HISTORY_FIELDS:
            self.history[k].append(self.step if k == "step" else rec[k])
        return rec

    # ---- memory initialisation ----

    def init_memory(self) -> CrossBatchMemory:
        """A memory of K = memory.size or round(memory.ratio * N) entries, filled with the current model's
        embeddings of a random (seeded by train.seed) min(K, N) images of the train set, in random order."""
        train = self.splits.train
        N = len(train)
        memory = build_memory(self.params, N, self.model.embedding_dim, self.device)
        n = min(memory.K, N)
        self.sink.emit(make_event("phase", self.step, phase="memory_init", total_steps=0, items=n))
        g = torch.Generator().manual_seed(self.params.train.seed)
        pick = torch.randperm(N, generator=g)[:n]  # n dataset indices
        # The images as the test transform shows them (when the dataset offers it): one clean view per image.
        clean = clean_view(train)
        with preserved_rng(), self._autocast():
            feats, labels = compute_embeddings(self.model, Subset(clean, pick.tolist()),
                                               self.params.eval.batch_size, self.device,
                                               num_workers=self.params.data.num_workers)
        # Written at the current step, so the ages of the drift measurement count from the end of the warm-up.
        memory.enqueue(torch.from_numpy(feats).to(self.device), torch.from_numpy(labels).to(self.device),
                       pick.to(self.device), step=self.step)
        return memory
