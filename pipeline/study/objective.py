"""The real objective: a trial = memory init + XBM training + validation, from one shared warm-up.

The warm-up depends on what `training_digest(params, "warmup")` hashes (data, model with the pretrained weights'
bytes, loss, the warm-up's train keys), and every trial uses the study's base params for it: the tuned values act
from the memory switch-on on (`stages._trainer_after_warmup` applies the trial's loss, memory and lr to the loaded
warm-up state). So the warm-up runs once per digest, in artifacts/tune/warmup/<digest>/, or is taken from the
pipeline's own artifacts/warmup when `dvc repro` already made it with the same digest (hard-linked, so a later `dvc
repro` replacing that file cannot change a running study's warm-up). Pretrained weights that model.pretrained
expects from the pretrain stage are made first when missing (pipeline.study.pretrained).
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Callable

from xbmcore.checkpoint import load_checkpoint, training_digest
from xbmcore.config import Params
from xbmcore.data import prepare_dataset
from xbmcore.hooks import TrainingStopped
from pipeline import stages
from pipeline.filelock import file_lock
from pipeline.study.mlflow_runs import StudyTracker
from pipeline.study.pretrained import ensure_pretrained
from pipeline.study.runner import env
from pipeline.tracking import public_params

log = logging.getLogger(__name__)


def _digest_of(state_path: Path) -> str | None:
    try:
        return load_checkpoint(state_path).get("digest")
    except (OSError, ValueError) as err:
        log.warning("cannot read %s (%s)", state_path, err)
        return None


def _tracked(tracker: StudyTracker | None, start: Callable[[StudyTracker], str],
             stage: Callable[[], object]) -> None:
    """Run a stage for the study, logging into the run that `start(tracker)` creates (none without a tracker)."""
    if tracker is None:
        stage()
        return
    run_id = start(tracker)
    status = "FAILED"
    try:
        with env(XBM_MLFLOW_RUN_ID=run_id):
            stage()
        status = "FINISHED"
    except (TrainingStopped, KeyboardInterrupt, SystemExit):
        status = "KILLED"  # stopped (with a checkpoint, for the warm-up): the next start resumes it
        raise
    finally:
        tracker.client.set_terminated(run_id, status=status)


class StageObjective:
    """objective(trial params, trial dir, report) and evaluate_test(trial params, trial dir) over pipeline.stages."""

    def __init__(self, params: Params, root: Path):
        self.params, self.root = params, Path(root).resolve()
        # Known once model.pretrained exists (prepare): the warm-up's digest hashes the pretrained weights' bytes.
        self.digest: str | None = None
        self.warmup_root: Path | None = None
        self.warmup: Path | None = None  # what stages call `warmup=`: the folder with state.pt

    def _locate_warmup(self) -> None:
        # The weights under the root (resolve_pretrained), not a file of the same relative path in the cwd.
        self.digest = training_digest(stages.resolve_pretrained(self.params, self.root), "warmup")
        self.warmup_root = self.root / "artifacts" / "tune" / "warmup" / self.digest
        self.warmup = self.warmup_root / "warmup"

    def prepare(self, tracker: StudyTracker | None = None) -> None:
        """Dataset, pretrained weights and warm-up, once for all workers on this host (the first one makes them,
        the others wait).

        The pretrained weights are made only when model.pretrained is the pretrain stage's missing out (see
        pipeline.study.pretrained); the pretrain stage and a warm-up that have to run log into their own runs
        nested under the study's parent run.
        """
        with file_lock(self.root / "artifacts" / "tune" / "inputs.lock"):
            prepare_dataset(self.params.data, self.root, progress=False)
            ensure_pretrained(self.params, self.root, run=lambda: _tracked(
                tracker, StudyTracker.start_pretrain, lambda: stages.run_pretrain(self.params, self.root)))
        self._locate_warmup()
        state = self.warmup / "state.pt"
        with file_lock(self.warmup_root.with_name(f"{self.digest}.lock")):
            if state.exists():
                log.info("shared warm-up %s (digest %s)", state, self.digest)
                return
            dvc_state = self.root / "artifacts" / "warmup" / "state.pt"
            if dvc_state.exists() and _digest_of(dvc_state) == self.digest:
                self.warmup.mkdir(parents=True, exist_ok=True)
                tmp = state.with_name(".state.pt.tmp")
                tmp.unlink(missing_ok=True)
                try:
                    os.link(dvc_state, tmp)
                except OSError:  # another file system
                    shutil.copy2(dvc_state, tmp)
                os.replace(tmp, state)
                log.info("reusing the pipeline's warm-up %s (same digest %s)", dvc_state, self.digest)
                return
            log.info("warm-up for the study (digest %s) into %s", self.digest, self.warmup)
            # A killed warm-up resumes from its checkpoints here on the next start.
            _tracked(tracker, lambda t: t.start_warmup(public_params(self.params), self.digest),
                     lambda: stages.run_warmup(self.params, self.root, artifacts=self.warmup_root))

    def __call__(self, params: Params, trial_dir: Path, report) -> float:
        metric = self.params.tune.metric
        if self.warmup is None or not (self.warmup / "state.pt").exists():
            self.prepare()
        stages.run_memory_init(params, self.root, artifacts=trial_dir, warmup=self.warmup)
        stages.run_train_xbm(params, self.root, on_eval=lambda step, m: report(step, m[metric]),
                             artifacts=trial_dir, warmup=self.warmup)
        return stages.run_evaluate(params, self.root, split="val", artifacts=trial_dir)[metric]

    def evaluate_test(self, params: Params, trial_dir: Path) -> dict[str, float]:
        return stages.run_evaluate(params, self.root, split="test", artifacts=trial_dir)
