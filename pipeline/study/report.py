"""The study's outputs: best params as `dvc exp run -S` arguments, the best trial's test metrics, plots.

Everything lands in artifacts/tune/<study>/ (written atomically) and on the study's parent MLflow run.
"""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any, Callable

import optuna
import yaml

from xbmcore.atomic import atomic_path, write_bytes
from xbmcore.config import Params
from pipeline.study import space
from pipeline.study.mlflow_runs import RUN_ATTR
from pipeline.study.runner import Worker, env
from pipeline.tracking import redact

log = logging.getLogger(__name__)

# evaluate_test(trial params, trial artifacts dir) -> test-split metrics of that trial's model
EvaluateTest = Callable[[Params, Path], dict[str, float]]


def dvc_command(best_params: dict[str, float]) -> str:
    return "dvc exp run " + " ".join(f"-S {k}={v!r}" for k, v in sorted(best_params.items()))


def dashboard_command(storage_url: str) -> str:
    return f"optuna-dashboard {storage_url}"


def _save_plot(path: Path, plot: Callable[[], Any]) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            ax = plot()
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
        fig.set_size_inches(9, 5)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        return True
    except (ValueError, RuntimeError, ZeroDivisionError) as err:  # e.g. too few trials for this plot
        log.warning("%s not drawn: %s", path.name, err)
        plt.close("all")
        return False


def plots(study: optuna.Study, out_dir: Path, target: str) -> tuple[list[Path], dict[str, float]]:
    """History, importances (+ JSON) and parallel coordinates; skips what the trials so far cannot support."""
    from optuna.visualization import matplotlib as vis

    out = []
    for name, fn in (("history.png", lambda: vis.plot_optimization_history(study, target_name=target)),
                     ("parallel_coordinate.png", lambda: vis.plot_parallel_coordinate(study, target_name=target)),
                     ("importances.png", lambda: vis.plot_param_importances(study, target_name=target))):
        if _save_plot(out_dir / name, fn):
            out.append(out_dir / name)
    importances: dict[str, float] = {}
    try:
        importances = {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except (ValueError, RuntimeError) as err:
        log.warning("parameter importances not computed: %s", err)
    write_bytes(out_dir / "importances.json", (json.dumps(importances, indent=2) + "\n").encode())
    out.append(out_dir / "importances.json")
    return out, importances


def finalize(worker: Worker, evaluate_test: EvaluateTest | None) -> dict[str, Any] | None:
    """Write the report when no trial is running; None (and nothing written) while others still run.

    The best trial's test metrics are computed once and kept in summary.json: a later call with the same best
    trial (another worker finishing, `--report`) reuses them.
    """
    study, out_dir, tune = worker.study, worker.out_dir, worker.params.tune
    with worker.storage.lock():
        counts = worker.counts()
        if counts.get("RUNNING", 0):
            print(f"{counts['RUNNING']} trial(s) still running in other workers: the last one writes the report")
            return None
        best = worker.best_trial()
        summary_path = out_dir / "summary.json"
        old = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        summary: dict[str, Any] = {
            "study": study.study_name, "storage": redact(worker.storage.url), "metric": tune.metric,
            "split": "val", "n_trials": tune.n_trials,
            "trials": {"complete": counts.get("COMPLETE", 0), "pruned": counts.get("PRUNED", 0),
                       "failed": counts.get("FAIL", 0)},
            "dashboard": dashboard_command(redact(worker.storage.url)),
        }
        test = None
        if best is not None:
            summary.update(best_trial=best.number, best_value=best.value, best_params=best.params,
                           command=dvc_command(best.params),
                           warmup_kept=space.warmup_keys(worker.params, best.params))
            write_bytes(out_dir / "best_params.yaml", yaml.safe_dump(dict(sorted(best.params.items())),
                                                                     sort_keys=False).encode())
            if old.get("test") and (old.get("best_trial"), old.get("best_params")) == (best.number, best.params):
                test = old["test"]
            elif evaluate_test is not None:
                trial_dir = worker.trial_dir(best.number)
                if trial_dir.exists():  # logged into the best trial's own run
                    with env(XBM_MLFLOW_RUN_ID=best.user_attrs.get(RUN_ATTR)):
                        test = evaluate_test(space.trial_params(worker.params, best.params), trial_dir)
                else:
                    log.warning("best trial %d has no artifacts left in %s: no test metrics", best.number,
                                trial_dir)
            summary["test"] = test
        files, summary["importances"] = plots(study, out_dir, f"val {tune.metric}")
        write_bytes(summary_path, (json.dumps(summary, indent=2) + "\n").encode())
        if worker.tracker is not None:
            paths = files + [summary_path] + ([out_dir / "best_params.yaml"] if best is not None else [])
            worker.tracker.update_best(best, worker.n_finished())
            worker.tracker.log_report(paths, test)
            worker.tracker.finish()
        return summary
