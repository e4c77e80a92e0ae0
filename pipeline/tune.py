"""Optuna study over the XBM phase: memory ratio, memory weight, XBM-phase lr and the loss margins.

    python -m pipeline.tune [--params params.yaml] [-S tune.n_trials=20 -S loss.name=multi_similarity ...]
    python -m pipeline.tune --report          # rewrite the report (plots, best params) without new trials

Each trial = memory init + XBM training + validation on the val split (carved from the training classes; the test
split is never tuned on), starting from one shared warm-up checkpoint. On a fresh clone the first worker also makes
model.pretrained when it is the pretrain stage's missing out (artifacts/pretrain/model.pt: checked out of the DVC
cache when dvc.lock has it, else the pretrain stage runs, a few minutes on 2 CPU cores). Start the same command in
several shells or hosts on one storage (an RDB URL or a journal file) to spread a study; kill and restart at will:
the budget `tune.n_trials` counts every trial in the storage, and a dead worker's trial is marked failed. Outputs in
artifacts/tune/<study>/: best_params.yaml (dotted keys), summary.json (best value, test metrics of the best trial),
importances.json and PNG plots, also logged to the study's parent MLflow run.
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

import optuna

from pipeline.cli import add_params_arguments, load_cli_params
from pipeline.study import StudyTracker, Worker, finalize, resolve_storage
from pipeline.tracking import configure_logging, redact, tracking_uri


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m pipeline.tune", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_params_arguments(ap, example=", e.g. -S tune.n_trials=20")
    ap.add_argument("--report", action="store_true", help="only rewrite the report from the stored trials")
    return ap.parse_args(argv)


def _exit_on_sigterm(signum, frame):
    # Outside a training phase (whose own handler stops after the step with a checkpoint): stop at once; the
    # running trial is marked failed on the way out.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the worker prints one line per trial itself
    if (loaded := load_cli_params(args)) is None:
        return 2
    params, root = loaded
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return _run(args, params, root)
    finally:
        signal.signal(signal.SIGTERM, previous)  # main() also runs in-process (tests, notebooks)


def _run(args: argparse.Namespace, params, root: Path) -> int:
    # torch and the stages are imported only here: the study's bookkeeping does not need them.
    from xbmcore.hooks import TrainingStopped
    from pipeline.study.objective import StageObjective
    from pipeline.study.pretrained import check_pretrained

    t0 = time.time()
    stages = StageObjective(params, root)
    storage = resolve_storage(params.tune.storage, root)
    tracker = StudyTracker(tracking_uri(params, root), params.tracking.experiment)
    try:
        if not args.report:  # a missing model.pretrained that the study cannot make (prepare makes the stage's out)
            check_pretrained(params, root)
        worker = Worker(params, root, storage, stages, tracker, interrupts=(TrainingStopped,))
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    print(f"study {params.tune.study_name!r} in {redact(storage.url)}: {worker.counts() or 'no trials yet'}, "
          f"budget {params.tune.n_trials}", flush=True)
    try:
        if not args.report:
            stages.prepare(tracker)
            worker.run()
        summary = finalize(worker, stages.evaluate_test)
    except TrainingStopped as err:
        print(f"tune: {err}", file=sys.stderr)
        return 128 + err.signum
    print(f"worker done in {time.time() - t0:.0f} s")
    if summary is None:
        return 0
    if "best_value" not in summary:
        print(f"no trial completed ({summary['trials']}); see the failed trials' runs in MLflow")
        return 1
    print(f"best trial {summary['best_trial']}: val {summary['metric']} = {summary['best_value']:.4f} "
          f"({summary['trials']})")
    if summary.get("test"):
        print("its test metrics: " + ", ".join(f"{k}={v:.4f}" for k, v in summary["test"].items()))
    print(f"apply it:  {summary['command']}")
    if summary["warmup_kept"]:
        print("           (the trials' shared warm-up kept " + ", ".join(f"{k}={v}" for k, v in
              summary["warmup_kept"].items()) + "; this command trains the warm-up with the tuned values too)")
    print(f"inspect:   {summary['dashboard']}")
    print(f"report:    {worker.out_dir}")
    return 0


if __name__ == "__main__":
    from pipeline.cli import enter_portable

    enter_portable()  # train.portable: torch is loaded already, so this starts the process again with it
    sys.exit(main())
