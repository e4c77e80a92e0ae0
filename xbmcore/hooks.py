"""The training loop's extension points: `Hook`, and the built-in hooks every phase runs (evaluation,
checkpoints, stop signals) or that a setting adds (the drift probe).

A hook ends a phase early in one of two ways, both through the trainer: `trainer.end_phase()` (the phase is done:
the auto warm-up) or `trainer.stop(error)` (a checkpoint of this step, then `error` raised out of train_phase:
a stop signal, an exception of the caller's on_eval).
"""
from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from xbmcore.events import make_event

if TYPE_CHECKING:
    from xbmcore.trainer import Trainer

log = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """SIGTERM or SIGINT: the run stopped cleanly after `step`, with a checkpoint (its path, once written).

    Args:
        signum: the signal received (``signal.SIGTERM`` or ``signal.SIGINT``).
        step: the last step trained.
        phase: the phase it stopped in.
        checkpoint: the checkpoint written at `step` (set by ``Trainer.stop``); None without a checkpoint folder.
    """

    def __init__(self, signum: int, step: int, phase: str | None, checkpoint: Path | None = None):
        super().__init__(signum, step, phase)
        self.signum, self.step, self.phase, self.checkpoint = signum, step, phase, checkpoint

    def __str__(self) -> str:
        where = f"checkpoint {self.checkpoint}" if self.checkpoint else "no checkpoint folder"
        return f"stopped by {signal.Signals(self.signum).name} after step {self.step} ({self.phase} phase); {where}"


class CallerError(Exception):
    """Carries an exception raised by the caller's on_eval through the loop's failure handling; train_phase
    re-raises the caller's own exception."""


class Hook:
    """An extension point of the training loop: subclass and override what you need, then pass it in
    `train_phase(hooks=[...])` or append it to `Trainer.hooks` (every phase). Hooks run in order after the
    built-in ones (evaluation, checkpoints, stop signals).

    on_phase_start(trainer)       after the phase event; trainer.step is where the phase (re)starts
    on_step(trainer)              after each optimiser step; trainer.step counts it. The step's scalars may still
                                  be on the device: call trainer.flush() before reading trainer.history.
                                  Time spent here is not counted in images_per_s.
    on_phase_end(trainer, error)  always, last; error is the exception that ends the phase, or None

    A hook ends a phase early through ``trainer.end_phase()`` or ``trainer.stop(error)``; it reads the training
    state through the trainer (``trainer.step``, ``trainer.phase``, ``trainer.state``, ``trainer.model``).
    """

    def on_phase_start(self, trainer: Trainer) -> None:
        """After the phase event; ``trainer.step`` is where the phase (re)starts. Does nothing by default.

        Args:
            trainer: the trainer running the phase.
        """
        pass

    def on_step(self, trainer: Trainer) -> None:
        """After each optimiser step; ``trainer.step`` counts it. Does nothing by default.

        The step's scalars may still be on the device: call ``trainer.flush()`` before reading
        ``trainer.history``. Time spent here is not counted in images_per_s.

        Args:
            trainer: the trainer running the phase.
        """
        pass

    def on_phase_end(self, trainer: Trainer, error: BaseException | None) -> None:
        """Always, last, also when the phase fails or stops. Does nothing by default.

        Args:
            trainer: the trainer running the phase.
            error: the exception that ends the phase, or None when it completed.
        """
        pass


class Evaluation(Hook):
    """Val Recall@K etc. every `every` steps (0: never): an `eval` event, the curves, then `on_eval(step,
    metrics)`; an exception from on_eval propagates after a checkpoint of that step.

    Args:
        every: steps between evaluations of the val split (``train.eval_every``; 0: never).
        on_eval: called as ``on_eval(step, metrics)`` after each evaluation, or None.
    """

    def __init__(self, every: int, on_eval: Callable[[int, dict], None] | None = None):
        self.every, self.on_eval = every, on_eval

    def on_step(self, trainer: Trainer) -> None:
        """At every `every`-th step: evaluate, record, emit, then call on_eval.

        Args:
            trainer: the trainer running the phase.
        """
        if not self.every or trainer.step % self.every:
            return
        trainer.flush()
        metrics = trainer.evaluate("val")
        trainer.state.evals.append({"step": trainer.step, "phase": trainer.phase, "split": "val", **metrics})
        trainer.emit(make_event("eval", trainer.step, phase=trainer.phase, split="val", metrics=metrics))
        if self.on_eval is not None:
            try:
                self.on_eval(trainer.step, metrics)
            except BaseException as err:
                trainer.stop(CallerError(err))


class Checkpointing(Hook):
    """A checkpoint every `every` steps and at the phase's last step.

    Args:
        every: steps between checkpoints (``train.checkpoint_every``).
        end: the phase's last step.
    """

    def __init__(self, every: int, end: int):
        self.every, self.end = every, end

    def on_step(self, trainer: Trainer) -> None:
        """Write a checkpoint at every `every`-th step and at `end`.

        Args:
            trainer: the trainer running the phase.
        """
        if trainer.step % self.every == 0 or trainer.step == self.end:
            trainer.checkpoint()


class StopOnSignals(Hook):
    """SIGTERM/SIGINT set a flag; the loop stops after the step with a checkpoint (TrainingStopped). A second
    SIGINT interrupts at once. With several ranks the flag travels with the step's scalars, so that every rank
    stops after the same step."""

    def __init__(self):
        self._previous: dict = {}

    def on_phase_start(self, trainer: Trainer) -> None:
        """Install the SIGTERM/SIGINT handlers (in the main thread only; elsewhere signals are left alone).

        Args:
            trainer: the trainer running the phase; its `stop_signal` is reset.
        """
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

    def on_step(self, trainer: Trainer) -> None:
        """Stop the phase (``trainer.stop(TrainingStopped(...))``) when a signal came.

        Args:
            trainer: the trainer running the phase.
        """
        signum = trainer.stop_seen if trainer.dist.active else trainer.stop_signal
        if signum is None:
            return
        trainer.stop(TrainingStopped(signum, trainer.step, trainer.phase))

    def on_phase_end(self, trainer: Trainer, error: BaseException | None) -> None:
        """Put the previous signal handlers back.

        Args:
            trainer: the trainer running the phase.
            error: the exception that ends the phase, or None.
        """
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}


class DriftMonitor(Hook):
    """The drift probe (xbmcore.drift) as a hook: it observes the model where a phase (re)starts and after every
    step, emits a `drift` event per probe step, and ends an auto warm-up (`train.warmup_steps: auto`) at the
    first probe step t >= warmup_min_steps where the mean of D(t; warmup_drift_dt) over the last
    warmup_drift_window probes is below warmup_drift; the phase's own length, warmup_max_steps, bounds it from
    above."""

    def on_phase_start(self, trainer: Trainer) -> None:
        """Observe the model where the phase (re)starts.

        Args:
            trainer: the trainer running the phase (with a drift probe).
        """
        self._observe(trainer)

    def on_step(self, trainer: Trainer) -> None:
        """Observe the model after the step; in an auto warm-up, end the phase once drift has settled.

        Args:
            trainer: the trainer running the phase (with a drift probe).
        """
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
    def _observe(trainer: Trainer) -> dict[int, float] | None:
        probe = trainer.probe
        if trainer.step <= probe.last or not probe.wanted(trainer.step):
            return None
        trainer.flush()  # the step's event before its drift event
        D = probe.observe(trainer.step)
        if D:
            h = probe.history[-1]
            extra: dict = {}
            if "D_backbone" in h:
                extra["D_backbone"] = {str(k): v for k, v in h["D_backbone"].items()}
            if "cos10" in h:
                extra["cos10"] = h["cos10"]
            if 10 in D and 100 in D and D[10] > 0:  # 1: random drift; 10: steady (xbmcore.drift)
                extra["directed"] = h["directed"] = D[100] / (10 * D[10])
            if trainer.staleness is not None and trainer.staleness[0] == trainer.step:
                extra["staleness"] = h["staleness"] = trainer.staleness[1]
            trainer.emit(make_event("drift", trainer.step, phase=trainer.phase, D={str(k): v for k, v in D.items()},
                                    **extra))
        return D
