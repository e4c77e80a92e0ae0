"""One worker of a study: claim a trial within the budget, run the objective, record the outcome.

Several workers (processes, hosts) may run this loop on one storage. The budget is `tune.n_trials` trials of
any final state, counted in the storage, so it holds across restarts and workers; on local storages the
count-then-ask happens under a file lock, so the study ends with exactly `n_trials` trials.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import optuna
from optuna.trial import TrialState

from xbmcore.config import Params
from pipeline.study import space
from pipeline.study.mlflow_runs import RUN_ATTR, StudyTracker
from pipeline.study.storage import StudyStorage, load_or_create
from pipeline.tracking import public_params, redact
from pipeline.study.workers import Heartbeat, fail_stale_trials

log = logging.getLogger(__name__)

# objective(trial params, trial artifacts dir, report(step, value)) -> the validation metric to maximise.
# report() raises optuna.TrialPruned when the pruner stops the trial.
Report = Callable[[int, float], None]
Objective = Callable[[Params, Path, Report], float]
BASE_ATTR = "xbm.base_params"
SPACE_ATTR = "xbm.space"
SURPLUS_ATTR = "xbm.surplus"


def make_sampler(tune, number: int) -> optuna.samplers.BaseSampler:
    # Seeded from (seed, trial number): reproducible with one worker, distinct draws across workers.
    seed = int(np.random.SeedSequence([tune.seed, number]).generate_state(1)[0])
    if tune.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=tune.startup_trials)


def make_pruner(params: Params) -> optuna.pruners.BasePruner:
    if params.tune.pruner == "none":
        return optuna.pruners.NopPruner()
    # Steps count on from the warm-up: never judge a trial before its memory is on plus a grace period.
    return optuna.pruners.MedianPruner(
        n_startup_trials=params.tune.prune_startup_trials,
        n_warmup_steps=space.memory_on_step(params) + params.tune.prune_grace_steps,
    )


@contextmanager
def env(**values: str | None) -> Iterator[None]:
    """Set (or, for None, unset) environment variables for a block: how the stages learn their MLflow run."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _base_flat(params: Params) -> dict[str, Any]:
    # What defines the study's trials; the tune section's budget and bookkeeping may change on a restart.
    return {k: v for k, v in params.flat().items()
            if not k.startswith("tune.") or k.startswith(("tune.space.", "tune.metric", "tune.xbm_steps"))}


@dataclass
class Worker:
    params: Params
    root: Path
    storage: StudyStorage
    objective: Objective
    tracker: StudyTracker | None = None
    # Exceptions that stop the worker instead of failing one trial (the trainer's SIGTERM stop).
    interrupts: tuple[type[BaseException], ...] = ()
    out_dir: Path = field(init=False)
    study: optuna.Study = field(init=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        tune = self.params.tune
        space.active_dims(self.params)  # a senseless space fails before any trial starts
        self.out_dir = self.root / "artifacts" / "tune" / tune.study_name
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with self.storage.lock():
            self.study = load_or_create(self.storage, tune.study_name, tune.metric,
                                        pruner=make_pruner(self.params))
            self._check_base()
            if self.tracker is not None:
                self.tracker.attach_parent(self.study, public_params(self.params), redact(self.storage.url))

    def _check_base(self) -> None:
        """A study is one search space: a reused name with another space is refused (its trials would not be
        comparable and TPE would model two problems as one); other changed params are a warning."""
        space_now, space_then = space.describe(self.params), self.study.user_attrs.get(SPACE_ATTR)
        if space_then is None:
            self.study.set_user_attr(SPACE_ATTR, space_now)
        elif diff := space.differences(space_then, space_now):
            raise ValueError(f"tune.study_name: study {self.study.study_name!r} in {redact(self.storage.url)} was "
                             f"created with another search space ({'; '.join(diff)}); choose another "
                             "tune.study_name or restore its tune.space and loss.name")
        base, seen = _base_flat(self.params), self.study.user_attrs.get(BASE_ATTR)
        if seen is None:
            self.study.set_user_attr(BASE_ATTR, base)
            return
        changed = sorted(k for k in base.keys() | seen.keys() if base.get(k) != seen.get(k))
        if changed:
            log.warning("study %r resumed with changed params (%s); its earlier trials ran with the old ones",
                        self.study.study_name, ", ".join(f"{k}: {seen.get(k)!r} -> {base.get(k)!r}"
                                                         for k in changed))

    # -- the loop -----------------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.study.get_trials(deepcopy=False):
            out[t.state.name] = out.get(t.state.name, 0) + 1
        return out

    def _claim(self) -> optuna.Trial | None:
        tune = self.params.tune
        with self.storage.lock():
            for stale in fail_stale_trials(self.study, tune.stale_after_s):
                if self.tracker is not None:
                    self.tracker.end_stale(stale)
            n = len(self.study.get_trials(deepcopy=False))
            if n >= tune.n_trials:
                return None
            self.study.sampler = make_sampler(tune, n)
            trial = self.study.ask()
        if trial.number >= tune.n_trials:  # raced past the budget (server database without a lock)
            trial.set_user_attr(SURPLUS_ATTR, True)
            self.study.tell(trial, state=TrialState.FAIL)
            return None
        return trial

    def run(self) -> int:
        """Run trials until the budget is spent; returns how many ran in this process."""
        ran = 0
        while (trial := self._claim()) is not None:
            self.run_trial(trial)
            ran += 1
        return ran

    def trial_dir(self, number: int) -> Path:
        return self.out_dir / "trials" / f"{number:04d}"

    def run_trial(self, trial: optuna.Trial) -> optuna.trial.FrozenTrial:
        tune = self.params.tune
        sampled = space.suggest(trial, self.params)
        params = space.trial_params(self.params, sampled)
        trial_dir = self.trial_dir(trial.number)
        trial_dir.mkdir(parents=True, exist_ok=True)
        run_id = None
        if self.tracker is not None:
            run_id = self.tracker.start_trial(self.study, trial.number, public_params(params), sampled)
            trial.set_user_attr(RUN_ATTR, run_id)
        print(f"trial {trial.number}: " + ", ".join(f"{k}={v:.4g}" for k, v in sampled.items()), flush=True)

        def report(step: int, value: float) -> None:
            if not math.isfinite(value):
                raise FloatingPointError(f"validation {tune.metric} is {value} at step {step}")
            trial.report(float(value), step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"{tune.metric}={value:.4f} at step {step} is below the median")

        value, state, error = None, TrialState.FAIL, None
        try:
            with Heartbeat(trial, tune.heartbeat_s), env(XBM_MLFLOW_RUN_ID=run_id):
                value = float(self.objective(params, trial_dir, report))
            if not math.isfinite(value):
                raise FloatingPointError(f"validation {tune.metric} is {value}")
            state = TrialState.COMPLETE
        except optuna.TrialPruned as err:
            state, value = TrialState.PRUNED, None
            print(f"trial {trial.number} pruned: {err}", flush=True)
        except self.interrupts:
            self._interrupted(trial, run_id, sys.exc_info()[1])
            raise
        except Exception as err:  # e.g. a NaN loss: this trial failed, the study goes on
            state, value, error = TrialState.FAIL, None, err
            log.exception("trial %d failed", trial.number)
        except BaseException as err:  # KeyboardInterrupt, SystemExit: stop the worker
            self._interrupted(trial, run_id, err)
            raise
        frozen = self.study.tell(trial, value, state=state)
        if state == TrialState.COMPLETE:
            print(f"trial {trial.number} complete: {tune.metric}={value:.4f}", flush=True)
        if self.tracker:
            self.tracker.end_trial(run_id, frozen, tune.metric, error)
            self.tracker.update_best(self.best_trial(), self.n_finished())
        if tune.keep_artifacts == "best":
            self._drop_artifacts()
        return frozen

    def _interrupted(self, trial: optuna.Trial, run_id: str | None, err: BaseException) -> None:
        """The worker is stopping: the trial is failed now rather than left RUNNING for the next sweep."""
        frozen = self.study.tell(trial, state=TrialState.FAIL)
        print(f"trial {trial.number} interrupted ({type(err).__name__}): marked failed", flush=True)
        if self.tracker:
            self.tracker.end_trial(run_id, frozen, self.params.tune.metric, err)

    def n_finished(self) -> int:
        return sum(t.state.is_finished() for t in self.study.get_trials(deepcopy=False))

    def best_trial(self) -> optuna.trial.FrozenTrial | None:
        complete = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        return max(complete, key=lambda t: t.value) if complete else None

    def _drop_artifacts(self) -> None:
        """Delete the folders of finished trials other than the best (running ones are left alone)."""
        best = self.best_trial()
        for t in self.study.get_trials(deepcopy=False):
            if t.state.is_finished() and (best is None or t.number != best.number):
                shutil.rmtree(self.trial_dir(t.number), ignore_errors=True)
