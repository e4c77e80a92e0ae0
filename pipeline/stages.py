"""The pipeline's stages as plain functions: `python -m pipeline.<stage>` calls them, and so does the Optuna study
(in-process, one artifacts folder per trial, one shared warm-up).

    download -> pretrain -> warmup -> memory_init -> train_xbm -> evaluate

Files (DVC outs), with `art` = <root>/artifacts unless a stage is given `artifacts=`:
    art/pretrain/model.pt        the model pretrained as a classifier on the pretrain split (a plain state dict)
    art/warmup/state.pt          full training state after the warm-up (model, optimiser, step, RNG states, curves)
    art/warmup/checkpoints/      periodic checkpoints of the warm-up (persist: a killed stage resumes)
    art/memory_init/memory.pt    the initialised memory (or a marker that the memory is off: the baseline)
    art/train_xbm/model.pt       the trained embedding model (weights + its `model` params)
    art/train_xbm/checkpoints/   periodic checkpoints of the XBM / baseline phase
    plots/train.csv, plots/val.csv   curves against the global step (under `artifacts` when it is given)
    plots/retrieval.png          the evaluate stage's retrieval figure of the test split (idem)
    plots/drift.csv              the drift probe's D(t; dt), one column per dt (only a header when it is off)
    metrics.json                 the evaluate stage's metrics (under `artifacts` when it is given)
The study passes `artifacts=<trial folder>` to memory_init / train_xbm / evaluate; they read the warm-up from
`warmup=` (default <root>/artifacts/warmup), so every trial starts from the same warm-up.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import random
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from xbmcore.atomic import write_text
from xbmcore.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from xbmcore.config import Params
from xbmcore.data import open_splits, prepare_dataset
from xbmcore.data.index import SPLITS
from xbmcore.events import make_event
from xbmcore.evaluate import embed_split, eval_sets, retrieval_metrics
from pipeline.figures import RETRIEVAL_PNG, save_png, split_figure
from xbmcore.models import build_model
from xbmcore.pretrain import SKIPPED, pretrain
from xbmcore.events import HISTORY_FIELDS
from xbmcore.checkpoint import resumable_checkpoint
from xbmcore.device import OutOfMemory, resolve_device, set_cpu_threads
from xbmcore.hooks import TrainingStopped
from xbmcore.memory import build_memory
from xbmcore.trainer import NonFiniteLossError, Trainer
from pipeline.cli import add_params_arguments, load_cli_params
from pipeline.tracking import MODEL_TAG, StageRun, configure_logging, is_main_process, stage_run
from xbmcore.hashing import file_digest
from xbmcore.distributed import init_process_group, launched_by_torchrun

log = logging.getLogger(__name__)
STAGES = ("download", "pretrain", "warmup", "memory_init", "train_xbm", "evaluate")


def seed_everything(seed: int) -> None:
    """Model initialisation and the data augmentation's global generators start from `train.seed`."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def stage_dir(root: Path, stage: str, artifacts: Path | None = None) -> Path:
    return Path(artifacts if artifacts is not None else Path(root) / "artifacts") / stage


def _outputs_dir(root: Path, artifacts: Path | None) -> Path:
    """Where plots/ and metrics.json go: the project root for DVC, the trial folder for the study."""
    return Path(root) if artifacts is None else Path(artifacts)


def _splits(params: Params, root: Path):
    return open_splits(Path(root) / params.data.prepared / params.data.name, params.data)


def write_plots(history: dict[str, list], evals: list[dict[str, Any]], folder: Path,
                drift: list[dict[str, Any]] = (), dts: list[int] = ()) -> None:
    """plots/train.csv (one row per step), plots/val.csv (one row per evaluation) and plots/drift.csv (one row
    per drift probe step), for `dvc plots`."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(HISTORY_FIELDS)
    for row in zip(*(history[k] for k in HISTORY_FIELDS)):
        w.writerow("" if v is None else (f"{v:.6g}" if isinstance(v, float) else v) for v in row)
    write_text(folder / "train.csv", buf.getvalue())
    metric_keys = sorted({k for e in evals for k in e} - {"step", "phase", "split"})
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["step", "phase", *metric_keys])
    for e in evals:
        w.writerow([e["step"], e["phase"], *(f"{e[k]:.6g}" if e.get(k) is not None else "" for k in metric_keys)])
    write_text(folder / "val.csv", buf.getvalue())
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["step", *(f"D_{dt}" for dt in dts)])
    for h in drift:
        w.writerow([h["step"], *(f"{h['D'][dt]:.6g}" if dt in h["D"] else "" for dt in dts)])
    write_text(folder / "drift.csv", buf.getvalue())


# ---- stages ----

def run_download(params: Params, root: Path) -> Path:
    """Generate / download / parse the dataset into data.prepared/data.name; returns that folder."""
    with StageRun(params, root, "download") as run:
        prepared = prepare_dataset(params.data, Path(root), progress=sys.stderr.isatty())
        splits = open_splits(prepared, params.data)
        sizes = {name: len(ds) for name in SPLITS
                 if (ds := getattr(splits, name, None)) is not None}
        log.info("dataset %s in %s: %s", params.data.name, prepared, sizes)
        run.set_tags({f"data.{k}_images": v for k, v in sizes.items()})
    return prepared


def run_pretrain(params: Params, root: Path) -> Path:
    """The model trained as a normalised-softmax classifier on the dataset's pretrain split (xbmcore.pretrain);
    writes art/pretrain/model.pt, the state dict that `model.pretrained` points the warm-up at."""
    pp = params.pretrain
    path = stage_dir(root, "pretrain") / "model.pt"
    splits = _splits(params, root)
    if splits.pretrain is None:  # a real dataset, or own images: the warm-up starts from none, imagenet or a file
        why = (f"the {params.data.name} dataset has no pretrain split (data.synthetic.pretrain_classes makes one "
               f"for the embedded set), so the pretrain stage trained nothing")
        log.info("pretrain: skipped: %s", why)
        save_checkpoint({SKIPPED: why}, path)  # DVC needs the out; model.pretrained pointing here names the reason
        return path
    set_cpu_threads(pp.num_threads)
    seed_everything(pp.seed)
    # From scratch, every BatchNorm learning its statistics whatever the warm-up will do with them.
    model = build_model(params.model.model_copy(update={"pretrained": "none", "freeze_bn": False}))
    with StageRun(params, root, "pretrain") as run:
        def on_log(step: int, metrics: dict[str, float]) -> None:
            log.info("pretrain step %d/%d: loss %.4f, accuracy %.3f", step, pp.steps, metrics["loss"],
                     metrics["accuracy"])
            if run.mlflow is not None:
                run.safe("logging the pretraining curve", run.mlflow.log_metrics,
                         {f"pretrain_{k}": v for k, v in metrics.items()}, step)

        pretrain(model, splits.pretrain, pp, resolve_device(params.train.device), on_log, log_every=100)
        save_checkpoint({k: v.cpu() for k, v in model.state_dict().items()}, path)
    return path


def resolve_pretrained(params: Params, root: Path) -> Params:
    """`params` with a relative model.pretrained file made absolute from the project root, like every path in
    params.yaml (the stages may run elsewhere, e.g. DVC's temporary copies)."""
    m = params.model
    if m.pretrained in ("none", "imagenet"):
        return params
    path = Path(root) / m.pretrained  # an absolute path stays as it is
    if not path.is_file():
        raise ValueError(f"model.pretrained: {path} is not a file; the pretrain stage writes "
                         f"artifacts/pretrain/model.pt (dvc repro pretrain, or python -m pipeline.pretrain)")
    return params.model_copy(update={"model": m.model_copy(update={"pretrained": str(path)})})


def run_warmup(params: Params, root: Path, artifacts: Path | None = None) -> Path:
    """Warm-up phase (no memory) from model.pretrained, or from its last checkpoint; writes art/warmup/state.pt."""
    out = stage_dir(root, "warmup", artifacts)
    folder = out / "checkpoints"
    t = params.train
    seed_everything(t.seed)
    splits = _splits(params, root)
    resolved = resolve_pretrained(params, root)
    model = build_model(resolved.model)
    found = resumable_checkpoint(folder, resolved, "warmup", 0, t.warmup_budget)
    path = out / "state.pt"
    # The run of the params as written, like every other stage's: the same run key, so a later stage ends it.
    with stage_run(params, root, "warmup", total_steps=t.warmup_budget + t.xbm_steps,
                   fresh_start=None if found else 1) as run:
        if found:  # points computed before a kill but not yet sent to MLflow
            run.backfill(found[1]["history"], found[1]["evals"], _drift_of(found[1]))
        trainer = Trainer(resolved, model, splits, run.sink)
        trainer.train_phase("warmup", t.warmup_budget, checkpoint_dir=folder)
        if t.warmup_steps == "auto":
            log.info("auto warm-up: %d steps (bounds %d..%d)", trainer.step, t.warmup_min_steps, t.warmup_max_steps)
            run.set_tags({"warmup_end": trainer.step})
        state = trainer.state_dict()  # every rank: their RNG states are gathered into it
        if trainer.dist.is_main:
            save_checkpoint(state, path)
    return path


def _drift_of(state: dict[str, Any]) -> list[dict[str, Any]]:
    probe = state.get("drift_probe")
    return [] if probe is None else [{"step": h["step"], "D": h["D"]} for h in probe["history"]]


def _warmup_state(root: Path, warmup: Path | None) -> dict[str, Any]:
    path = Path(warmup or stage_dir(root, "warmup")) / "state.pt"
    state = load_checkpoint(path)
    if state.get("phase") != "warmup":
        raise ValueError(f"{path}: expected the warm-up's final state, got phase {state.get('phase')!r}")
    return state


def _trainer_after_warmup(params: Params, root: Path, warmup: Path | None, sink,
                          state: dict[str, Any] | None = None) -> Trainer:
    state = state or _warmup_state(root, warmup)
    trainer = Trainer(params, build_model(params.model, load_weights=False), _splits(params, root), sink)
    trainer.load_state_dict(state)  # the XBM phase then sets its own lr (train.lr), whatever the warm-up's was
    return trainer


def run_memory_init(params: Params, root: Path, artifacts: Path | None = None,
                    warmup: Path | None = None) -> Path:
    """Fill the memory with the warmed-up model's embeddings of a random memory.ratio of the train set."""
    path = stage_dir(root, "memory_init", artifacts) / "memory.pt"
    with stage_run(params, root, "memory_init") as run:
        trainer = _trainer_after_warmup(params, root, warmup, run.sink)
        state: dict[str, Any] = {"enabled": params.memory.enabled, "step": trainer.step, "memory": None}
        if params.memory.enabled:
            memory = trainer.init_memory()
            state["memory"] = memory.state_dict()
            log.info("memory: %d of K = %d entries (%s mode) at step %d", len(memory), memory.K, memory.mode,
                     trainer.step)
            if run.mlflow:
                run.safe("logging the memory size", run.mlflow.log_metrics,
                         {"memory_fill": memory.fill_level}, trainer.step)
        if trainer.dist.is_main:
            save_checkpoint(state, path)
    return path


def run_train_xbm(params: Params, root: Path, on_eval: Callable[[int, dict], None] | None = None,
                  artifacts: Path | None = None, warmup: Path | None = None) -> Path:
    """XBM phase (memory.enabled) or the baseline (same schedule, no memory); writes the model and the curves.

    on_eval(step, val_metrics) is called after each periodic validation (the study prunes through it).
    """
    out = stage_dir(root, "train_xbm", artifacts)
    folder = out / "checkpoints"
    t, enabled = params.train, params.memory.enabled
    phase = "xbm" if enabled else "baseline"
    mem_state = load_checkpoint(stage_dir(root, "memory_init", artifacts) / "memory.pt")
    if mem_state["enabled"] != enabled:
        raise ValueError(f"memory.enabled is {enabled}, but memory_init ran with {mem_state['enabled']}: "
                         f"run the memory_init stage again")
    warm = _warmup_state(root, warmup)
    start = int(warm["step"])  # train.warmup_steps, or where the auto warm-up ended
    if t.warmup_steps != "auto" and start != t.warmup_steps:
        raise ValueError(f"the warm-up state is at step {start}, expected train.warmup_steps = {t.warmup_steps}: "
                         f"run the pipeline again")
    found = resumable_checkpoint(folder, params, phase, start, start + t.xbm_steps)
    # The run ends here (FINISHED) unless the study owns it (XBM_MLFLOW_RUN_ID): DVC skips the evaluate stage when
    # a resumed training wrote the same model bytes, and the run must not stay RUNNING then.
    with stage_run(params, root, "train_xbm", total_steps=start + t.xbm_steps,
                   fresh_start=None if found else start + 1, finish=not os.environ.get("XBM_MLFLOW_RUN_ID")) as run:
        trainer = _trainer_after_warmup(params, root, warmup, run.sink, warm)
        if mem_state["step"] != start:
            raise ValueError(f"the warm-up state is at step {start} and the memory at step {mem_state['step']}: "
                             f"run the pipeline again")
        # Curves this MLflow run may lack: a cached warm-up's, and those computed before a kill up to the
        # checkpoint (the sink had not sent them yet).
        done = found[1] if found else trainer.state_dict()
        run.backfill(done["history"], done["evals"], _drift_of(done))
        memory = None
        if enabled:
            memory = build_memory(params, len(trainer.splits.train), trainer.memory_dim, trainer.device)
            memory.load_state_dict(mem_state["memory"])
        trainer.train_phase(phase, t.xbm_steps, memory, checkpoint_dir=folder, on_eval=on_eval)
        path = out / "model.pt"
        if not trainer.dist.is_main:
            return path
        save_checkpoint({"model": trainer.model.state_dict(), "model_params": _model_params(params),
                         "step": trainer.step, "phase": phase}, path)
        write_plots(trainer.history, trainer.evals, _outputs_dir(root, artifacts) / "plots",
                    trainer.probe.history if trainer.probe else [], t.drift_dts if trainer.probe else [])
        run.set_tags({MODEL_TAG: file_digest(path)})  # the evaluate stage finds this run by its model
    return path


def _model_params(params: Params) -> dict[str, Any]:
    """The `model` params that describe the saved model (sync_bn is how it was trained: it holds plain BN); an
    input_size left to the weights' config is left out, as it was before the key existed."""
    return params.model.model_dump(exclude={"sync_bn"} | ({"input_size"} if params.model.input_size is None else set()))


def load_model(params: Params, root: Path, artifacts: Path | None = None) -> tuple[torch.nn.Module, int]:
    """The trained model of train_xbm and its global step."""
    state = load_checkpoint(stage_dir(root, "train_xbm", artifacts) / "model.pt")
    if state["model_params"] != _model_params(params):
        raise ValueError(f"the trained model was built with model = {state['model_params']}, the params say "
                         f"{_model_params(params)}: run the train_xbm stage again")
    model = build_model(params.model, load_weights=False)
    model.load_state_dict(state["model"])
    return model, int(state["step"])


def run_evaluate(params: Params, root: Path, split: str = "test", artifacts: Path | None = None,
                 log_model: bool | None = None) -> dict[str, float]:
    """Recall@K, MAP@R, R-precision and NMI of the trained model on `split`; writes metrics.json.

    On the test split it also logs the model to MLflow (an mlflow.pyfunc image embedder, see _log_model) and
    marks the run FINISHED.
    """
    device = resolve_device(params.train.device)
    set_cpu_threads(params.eval.num_threads)
    model, step = load_model(params, root, artifacts)
    model.to(device)
    final = split == "test"
    sha = file_digest(stage_dir(root, "train_xbm", artifacts) / "model.pt", missing_ok=True)
    with StageRun(params, root, "evaluate", finish=final, model_sha256=sha) as run:
        run.sink.emit(make_event("phase", step, phase="evaluate", total_steps=0, split=split))
        e = params.eval
        splits = _splits(params, root)
        embedded = embed_split(model, splits, split, e.batch_size, device, params.data.num_workers)
        metrics = retrieval_metrics(*embedded, recall_at=e.recall_at, nmi=True, device=device)
        evaluation = make_event("eval", step, phase="evaluate", split=split, metrics=metrics)
        run.sink.emit(evaluation)
        path = _outputs_dir(root, artifacts) / "metrics.json"
        write_text(path, json.dumps({split: metrics, "step": step}, indent=2) + "\n")
        if final:  # what the model retrieves for a fixed sample of test queries: a DVC image plot and in MLflow
            figure = split_figure(*eval_sets(splits, split), *embedded)
            png = save_png(figure.image, _outputs_dir(root, artifacts) / "plots" / RETRIEVAL_PNG)
            if run.mlflow is not None:
                run.safe("logging the retrieval figure", run.mlflow.client.log_artifact, run.mlflow.run_id, str(png))
        if run.mlflow is not None and (final if log_model is None else log_model):
            run.safe("logging the model", _log_model, run, model, params, root, evaluation)
    return metrics


def _log_model(run: StageRun, model: torch.nn.Module, params: Params, root: Path,
               evaluation: dict[str, Any] | None = None) -> None:
    """An mlflow.pyfunc model that embeds encoded images (pipeline/pyfunc_model.py): the weights, the test
    transform and the code they need, so `mlflow models serve` answers an image with its embedding, and its
    limits (data.max_pixels, serve.max_images).

    `evaluation` (the stage's eval event) becomes the LoggedModel's own metrics, linked to the run and to the
    split it was measured on (a dataset named <data.name>/<split>, digest of the prepared dataset's meta file), so
    the model's page in `mlflow ui` shows its test recall. They are the run's metrics: the same names, values,
    step and timestamp as MLflowSink logs them, so the run's history keeps one point (MLflow drops the exact
    duplicate) and the model gets the link."""
    import mlflow
    import torchvision
    from mlflow.entities import Dataset

    from pipeline.pyfunc_model import log_embedding_model
    from pipeline.tracking import MLflowSink, tracking_uri
    from pipeline.embedding_store import Embedder
    from xbmcore.data.index import META_FILE
    from xbmcore.data.transforms import interpolation, normalisation

    d = params.data
    embedder = Embedder(model.cpu().eval(), params.model.model_dump(), d.test_resize, d.test_size,
                        source=str(stage_dir(root, "train_xbm") / "model.pt"), max_pixels=d.max_pixels,
                        interpolation=interpolation(d), mean=normalisation(d)[0], std=normalisation(d)[1])
    mlflow.set_tracking_uri(tracking_uri(params, root))
    # Explicit requirements: MLflow's inference would import-scan the environment (slow, and noisy).
    reqs = [f"torch=={torch.__version__.split('+')[0]}", f"torchvision=={torchvision.__version__.split('+')[0]}",
            "pillow", "pydantic", "pandas"]
    if params.model.backbone.startswith("timm:"):  # the served model builds the timm architecture again
        import timm

        reqs.append(f"timm=={timm.__version__}")
    with mlflow.start_run(run_id=run.mlflow.run_id, nested=mlflow.active_run() is not None):
        info = log_embedding_model(embedder, name="model", pip_requirements=reqs,
                                   max_images=params.serve.max_images)
        # The URI `pipeline.embed --model` and `mlflow models serve -m` take: said here, and kept on the run.
        mlflow.set_tag("xbm.model_uri", f"models:/{info.model_id}")
        log.info("evaluate: the model is logged as models:/%s (MLflow run %s)", info.model_id, run.mlflow.run_id)
        if evaluation is not None:
            prepared = (Path(root) / params.data.prepared / params.data.name).resolve()
            data = Dataset(name=f"{params.data.name}/{evaluation['split']}", source_type="local",
                           digest=(file_digest(prepared / META_FILE, missing_ok=True) or params.digest(("data",)))[:12],
                           source=json.dumps({"uri": str(prepared)}))
            mlflow.log_metrics(MLflowSink.metrics_of(evaluation), step=evaluation["step"], run_id=run.mlflow.run_id,
                               timestamp=int(evaluation["time"] * 1000), model_id=info.model_id, dataset=data,
                               synchronous=True)


# ---- entry point ----

TRAINING_STAGES = ("warmup", "memory_init", "train_xbm")


def _torchrun(stage: str, argv: list[str], nproc: int) -> int:
    """Run the stage as `nproc` processes on this node (torchrun --standalone); SIGTERM/SIGINT are passed on, so
    every rank stops after the same step with a checkpoint. On several nodes, start torchrun yourself (docs/distributed.md)."""
    import signal
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", f"pipeline.{stage}", *argv]
    child = subprocess.Popen(cmd)
    previous = {s: signal.signal(s, lambda signum, frame: child.send_signal(signum))
                for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return child.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


_THREADS_KEY = {"pretrain": "pretrain.num_threads", "evaluate": "eval.num_threads"}


def _warn_unpinned_threads(params: Params, stage: str) -> None:
    """Portable mode pins the kernels; a stage whose thread count follows the cores still differs elsewhere."""
    key = _THREADS_KEY.get(stage, "train.num_threads")
    section, name = key.split(".")
    if params.train.portable and getattr(getattr(params, section), name) is None:
        log.warning("%s is null: the %s stage runs one thread per core (%s here), and its sums differ on a "
                    "machine with another number of cores; set it to reproduce across machines", key, stage,
                    os.cpu_count())


def main(stage: str, argv: list[str] | None = None) -> int:
    """`python -m pipeline.<stage> [--params params.yaml] [-S key=value ...]`: run one stage, exit non-zero on
    failure (2: bad params, 1: an error, 128 + signal number: stopped by SIGTERM/SIGINT with a checkpoint).

    A training stage with train.nproc > 1 starts itself again under torchrun, one process per rank; started by
    torchrun, it is one rank of the job."""
    ap = argparse.ArgumentParser(prog=f"python -m pipeline.{stage}")
    add_params_arguments(ap)
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    configure_logging()
    if (loaded := load_cli_params(args)) is None:
        return 2
    params, root = loaded
    if stage != "download":
        _warn_unpinned_threads(params, stage)
    if stage in TRAINING_STAGES:
        if params.train.nproc > 1 and not launched_by_torchrun():
            return _torchrun(stage, argv, params.train.nproc)
        if launched_by_torchrun():
            per_node = int(os.environ.get("LOCAL_WORLD_SIZE", params.train.nproc))
            if per_node != params.train.nproc:
                print(f"{stage} failed: train.nproc is {params.train.nproc}, but torchrun started {per_node} "
                      f"processes per node: make them agree (--nproc-per-node or -S train.nproc)", file=sys.stderr)
                return 2
            init_process_group(resolve_device(params.train.device))
    if not is_main_process():
        logging.getLogger("pipeline").setLevel(logging.WARNING)  # one rank speaks
        logging.getLogger("xbmcore").setLevel(logging.WARNING)
    fn = {"download": run_download, "pretrain": run_pretrain, "warmup": run_warmup, "memory_init": run_memory_init,
          "train_xbm": run_train_xbm, "evaluate": run_evaluate}[stage]
    try:
        fn(params, root)
    except TrainingStopped as err:
        print(f"{stage}: {err}", file=sys.stderr)
        return 128 + err.signum
    except (ValueError, NonFiniteLossError, OutOfMemory) as err:
        print(f"{stage} failed: {err}", file=sys.stderr)
        return 1
    return 0
