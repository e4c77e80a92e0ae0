"""The XBM paper's figures on the embedded benchmark (Wang et al., CVPR 2020, Fig. 1 and Fig. 3).

    python -m bench.paper_figures --jobs 2                 # all figures, params.yaml as the base, seeds 0 1 2
    python -m bench.paper_figures --only fig1a --batches 16 32 --xbm-steps 3000   # a longer XBM phase, dashed
    python -m bench.paper_figures --lock /path/heavy.lock  # each training phase under an exclusive file lock
    python -m bench.paper_figures --plot --markdown        # only redraw the PNGs and print the docs' tables
    python -m bench.paper_figures --plot --out docs/paper_figures --markdown-out docs/paper_figures/tables.md
    python -m bench.paper_figures --only fig1a --batches 16 --seeds 0 --split val -S train.lr=1e-4   # choose

Figures:
  fig1a   test Recall@1 against the batch size (--batches, P x 4 images per class) with and without XBM, the
          same warm-up and XBM-phase steps at every batch size (--warmup-steps, --xbm-steps), contrastive loss;
          from scratch also the smallest batch with smallcnn's GroupNorm (model.norm: group), the
          batch-size-free alternative
  fig1b   test Recall@1 against memory.ratio (--ratios) at the smallest batch, each seed's warm-up shared with
          fig1a's (ratio 1.0 and the baseline come from fig1a)
  drift   the drift probe's D(t; dt) for dt = 10, 100, 1000 through the default schedule of params.yaml with
          the memory (--drift-baseline: also without it, sharing the warm-up)
  auto    `train.warmup_steps: auto` against the fixed warm-up of params.yaml, XBM, test Recall@1 per seed
  order   the enqueue order (`memory.enqueue`): Algorithm 1's `before` against `after`, and the baseline, at the
          --order-batches with fig1a's schedule, each seed's three runs from one warm-up

Fig. 1a/b and their tables show the runs of the base params' `memory.enqueue` (`-S memory.enqueue=after` for
the runs made before the setting existed: rows without the column ran with `after`).

Resumable: every finished run appends one row to <out>/results.csv, keyed by a digest of its parameters; a row
already there is not run again, so the study can span sessions. Warm-ups are cached in <out>/warm/. Groups of runs
that share a warm-up go to --jobs worker processes; with --lock each training phase holds the lock, released in
between. Prints one JSON summary; the PNGs go to --docs.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from bench.common import PARAMS, ROOT
from pipeline.cli import add_params_arguments
from pipeline.filelock import file_lock
from xbmcore.hooks import Hook

COLUMNS = ("key", "figure", "loss", "norm", "batch", "memory", "ratio", "seed", "warmup", "warmup_end", "xbm_steps",
           "recall@1", "recall@10", "map@r", "seconds", "commit", "enqueue", "split", "lr", "portable", "method",
           "eval_every", "best_step", "images_per_s")


def _locked(path: str | Path | None) -> contextlib.AbstractContextManager:
    """An exclusive flock on `path` for the block (nothing when None): one heavy job at a time on a shared box."""
    return contextlib.nullcontext() if path is None else file_lock(path)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


# ---- the runs ----

def _run_params(args, overrides: list[str], resolve: bool = True):
    """The params of a run; `resolve`: model.pretrained made a path relative to the params file, as the stages do
    (it must then exist). Tables and figures read other fields only and need no pretrained file."""
    from xbmcore.config import load_params
    p = load_params(args.params, [*args.overrides, "train.device=cpu", "train.eval_every=0",
                                  "train.checkpoint_every=100000", *overrides])
    if not resolve:
        return p
    from pipeline.stages import resolve_pretrained
    return resolve_pretrained(p, Path(args.params).resolve().parent)


def _key(p, split: str = "test") -> str:
    # memory.enqueue stays out of the key of `after` (the only order before the setting existed) and of a baseline,
    # which has no memory to enqueue into: one baseline run serves both orders.
    drop = ("memory.enqueue",) if p.memory.enqueue == "after" or not p.memory.enabled else ()
    key = p.digest(("data", "model", "loss", "memory", "train"), drop=drop, length=16)
    return key if split == "test" else f"{key}-{split}"  # a test run's key is the same as before the column


def groups(args) -> list[dict[str, Any]]:
    """Runs sharing one warm-up: {"name", "warm": overrides, "runs": [(figure, overrides, row)]}, in the order
    they run: the first seed of fig1a/b, then the drift runs, then the other seeds, then auto (a study cut short
    still has every figure)."""
    W, X, b0 = args.warmup_steps, args.xbm_steps, min(args.batches)
    steps = [f"train.warmup_steps={W}", f"train.xbm_steps={X}", f"train.drift_probe={args.probe}"]
    first = args.method[0][1] if args.method else []
    per_seed: list[list[dict[str, Any]]] = []
    for seed in args.seeds:
        mine = []
        # GroupNorm as extra points only from scratch: pretrained weights are BatchNorm's.
        norms = ("batch", "group") if _run_params(args, [], resolve=False).model.pretrained == "none" else ("batch",)
        for norm in norms:
            for b in (args.batches if norm == "batch" else [b0]):
                # --same-images: every batch size sees the smallest batch's number of images in the XBM phase
                xs = max(1, X * b0 // b) if args.same_images else X
                warm = [*steps, f"train.xbm_steps={xs}", f"train.batch_size={b}", f"train.seed={seed}",
                        f"model.norm={norm}"]
                runs = []
                if "fig1a" in args.only:
                    if not args.no_baseline:
                        runs.append(("fig1a", [*warm, "memory.enabled=false", "memory.ratio=1.0", *args.baseline_set],
                                     dict(batch=b, memory=False, ratio=0.0, method=args.baseline_name)))
                    for name, extra in args.method:
                        runs.append(("fig1a", [*warm, "memory.enabled=true", "memory.ratio=1.0",
                                               *_scaled(args, extra, b)],
                                     dict(batch=b, memory=True, ratio=1.0, method=name)))
                if "fig1b" in args.only and b == b0 and norm == "batch":
                    for r in args.ratios:
                        for name, extra in args.method:
                            if r != 1.0:
                                runs.append(("fig1b", [*warm, "memory.enabled=true", f"memory.ratio={r}", *extra],
                                             dict(batch=b, memory=True, ratio=r, method=name)))
                if runs:
                    mine.append({"name": f"{norm}-b{b}-seed{seed}", "warm": warm, "runs": runs,
                                 "drift": bool(args.probe)})
        if "order" in args.only:
            for b in args.order_batches:
                warm = [*steps, f"train.batch_size={b}", f"train.seed={seed}", "model.norm=batch"]
                runs = [("order", [*warm, "memory.enabled=false", "memory.ratio=1.0", *args.baseline_set],
                         dict(batch=b, memory=False, ratio=0.0))]
                # the memory of the first --method (the paper's plain memory by default), as in fig1a's rows
                runs += [("order", [*warm, "memory.enabled=true", "memory.ratio=1.0", f"memory.enqueue={e}", *first],
                          dict(batch=b, memory=True, ratio=1.0)) for e in ("before", "after")]
                mine.append({"name": f"order-b{b}-seed{seed}", "warm": warm, "runs": runs})
        per_seed.append(mine)
    drift = [] if "drift" not in args.only else [
        {"name": f"drift-seed{seed}", "warm": [f"train.seed={seed}"], "drift": True,
         "runs": [("drift", [f"train.seed={seed}", f"memory.enabled={str(e).lower()}",
                             *(extra if e else args.baseline_set)], dict(memory=e, method=name))
                  for e, name, extra in ([(False, "baseline", [])] if args.drift_baseline else []) +
                  [(True, name, extra) for name, extra in args.method]]} for seed in args.drift_seeds]
    auto = [] if "auto" not in args.only else [
        {"name": f"auto-seed{seed}", "warm": [f"train.seed={seed}", "train.warmup_steps=auto"], "drift": True,
         "runs": [("auto", [f"train.seed={seed}", "train.warmup_steps=auto", "memory.enabled=true", *first],
                   dict(memory=True))]} for seed in args.seeds_auto]
    return [*(per_seed[0] if per_seed else []), *drift, *(g for s in per_seed[1:] for g in s), *auto]


def _scaled(args, overrides: list[str], batch: int) -> list[str]:
    """--scale-momentum: a method's memory.momentum m, chosen at the smallest batch b0, becomes m ** (batch / b0), so
    that the moving average spans the same number of images at every batch size (the EMA scaling rule of
    Busbridge et al., "How to Scale Your EMA", NeurIPS 2023)."""
    b0 = min(args.batches)
    if not args.scale_momentum or batch == b0:
        return overrides
    out = []
    for o in overrides:
        key, _, value = o.partition("=")
        out.append(f"{key}={float(value) ** (batch / b0)!r}" if key == "memory.momentum" else o)
    return out


def _method(spec: str) -> tuple[str, list[str]]:
    name, _, overrides = spec.partition(":")
    return name, [o for o in overrides.split(",") if o]


def _done(csv_path: Path) -> dict[str, dict[str, str]]:
    if not csv_path.is_file():
        return {}
    with open(csv_path, newline="") as f:
        # A row from before a column existed: the memory's enqueue order was `after`, the kernels the CPU's own.
        # A row from before --method: the plain memory, or the baseline.
        return {r["key"]: {**r, "enqueue": r.get("enqueue") or "after", "split": r.get("split") or "test",
                           "portable": r.get("portable") or "False",
                           "method": r.get("method") or ("plain" if r["memory"] == "True" else "baseline")}
                for r in csv.DictReader(f)}


def _append(csv_path: Path, row: dict[str, Any]) -> None:
    from xbmcore.atomic import atomic_path

    with file_lock(csv_path.with_suffix(".lock")):  # workers append one whole row at a time
        new = not csv_path.is_file()
        if not new:
            with open(csv_path, newline="") as f:
                header = next(csv.reader(f), [])
            if tuple(header) != COLUMNS:  # written before a column existed: rewrite it whole with the column
                old = list(_done(csv_path).values())
                with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=COLUMNS)
                    w.writeheader()
                    w.writerows(old)
        with open(csv_path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            if new:
                w.writeheader()
            w.writerow(row)
            f.flush()
            os.fsync(f.fileno())


def run_group(args, group: dict[str, Any]) -> list[dict[str, Any]]:
    """The warm-up (cached) and every run of the group not yet in the CSV; returns the rows written."""
    import torch

    from pipeline.stages import seed_everything
    from xbmcore.checkpoint import load_checkpoint, save_checkpoint
    from xbmcore.data import open_splits, prepare_dataset
    from xbmcore.events import NullSink
    from xbmcore.models import build_model
    from xbmcore.checkpoint import training_digest
    from xbmcore.trainer import Trainer

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    csv_path = out / "results.csv"
    done = _done(csv_path)
    todo = [(fig, ov, row) for fig, ov, row in group["runs"] if _key(_run_params(args, ov), args.split) not in done]
    if not todo:
        return []
    base = _run_params(args, group["warm"])
    splits = open_splits(prepare_dataset(base.data, out, progress=False), base.data)
    # A fixed warm-up's digest leaves out the probe (it does not change the training), but a probed group needs
    # the warm-up's probe history in its checkpoint: it must not share a warm-up trained without the probe.
    probed = "-probed" if group.get("drift") else ""
    warm_path = out / "warm" / f"{training_digest(base, 'warmup')}{probed}.pt"
    if not warm_path.is_file():
        with _locked(args.lock):
            seed_everything(base.train.seed)
            trainer = Trainer(base, build_model(base.model), splits, NullSink())
            trainer.train_phase("warmup", base.train.warmup_budget)
            save_checkpoint(trainer.state_dict(), warm_path)
    rows = []
    for fig, ov, extra in todo:
        p = _run_params(args, ov)
        with _locked(args.lock):
            t0 = time.time()
            seed_everything(p.train.seed)
            sink = _Speed()
            trainer = Trainer(p, build_model(p.model), splits, sink)
            warm = load_checkpoint(warm_path)  # each run from the warm-up's own bytes
            trainer.load_state_dict(warm)
            memory = trainer.init_memory() if p.memory.enabled else None
            # Scored at the phase's best validation checkpoint (the phase's start included), so that a method that
            # saturates early is not penalised for running on; --eval-every 0: the last step.
            best = _Best(_eval_every(args, p), p.train.xbm_steps)
            trainer.train_phase("xbm" if memory is not None else "baseline", p.train.xbm_steps, memory,
                                hooks=[best] if best.every else [])
            if best.state is not None:
                trainer.model.load_state_dict(best.state)
            m = trainer.evaluate(args.split)
        row = {"key": _key(p, args.split), "figure": fig, "loss": p.loss.name, "norm": p.model.norm,
               "batch": p.train.batch_size, "memory": p.memory.enabled,
               "ratio": p.memory.ratio if p.memory.enabled else 0.0, "seed": p.train.seed,
               "warmup": p.train.warmup_steps, "warmup_end": int(warm["step"]), "xbm_steps": p.train.xbm_steps,
               "recall@1": round(m["recall@1"], 4), "recall@10": round(m["recall@10"], 4),
               "map@r": round(m["map@r"], 4), "seconds": round(time.time() - t0, 1), "commit": _commit(),
               "enqueue": p.memory.enqueue, "split": args.split, "lr": p.train.lr, "portable": p.train.portable,
               "eval_every": best.every, "best_step": best.step if best.state is not None else p.train.xbm_steps,
               "images_per_s": round(statistics.median(sink.speeds), 1) if sink.speeds else "", **extra}
        if best.curve:
            _write_curve(out / "curves" / f"{row['key']}.csv", best.curve)
        if group.get("drift") and trainer.probe is not None:
            _write_drift(out / "drift" / f"{row['key']}.csv", trainer.probe.history, p.train.drift_dts)
        _append(csv_path, row)
        print(json.dumps({k: row[k] for k in ("figure", "norm", "batch", "memory", "enqueue", "ratio", "seed",
                                              "warmup_end", "recall@1", "seconds")}), file=sys.stderr, flush=True)
        rows.append(row)
    return rows


class _Speed:
    """A sink that keeps the training steps' images/s (the trainer's own, hooks excluded)."""

    def __init__(self):
        self.speeds: list[float] = []

    def emit(self, event: dict[str, Any]) -> None:
        if event["kind"] == "step" and event["phase"] in ("xbm", "baseline"):
            self.speeds.append(event["images_per_s"])

    def close(self) -> None:
        pass


def _eval_every(args, p) -> int:
    """Phase steps between validations: --eval-every at the smallest batch, scaled to the same images at others."""
    if not args.eval_every:
        return 0
    return max(1, args.eval_every * min(args.batches) // p.train.batch_size) if args.same_images else args.eval_every


class _Best(Hook):
    """Validation every `every` steps of the phase (its start and last step included): the curve, and the model
    state of the best Recall@1 (the first of equal values). Evaluation runs on a forked RNG, so the training is the
    same with or without it."""

    def __init__(self, every: int, steps: int):
        self.every, self.steps = every, steps
        self.curve: list[tuple[int, float, float]] = []  # (phase step, val R@1, val MAP@R)
        self.state, self.step, self.value, self.start = None, 0, -1.0, 0

    def on_phase_start(self, trainer) -> None:
        self.start = trainer.step
        self._measure(trainer)

    def on_step(self, trainer) -> None:
        k = trainer.step - self.start
        if k % self.every == 0 or k == self.steps:
            self._measure(trainer)

    def _measure(self, trainer) -> None:
        trainer.flush()
        m = trainer.evaluate("val")
        k = trainer.step - self.start
        self.curve.append((k, round(m["recall@1"], 4), round(m["map@r"], 4)))
        if m["recall@1"] > self.value:
            self.value, self.step = m["recall@1"], k
            self.state = copy.deepcopy(trainer.model.state_dict())


def _write_curve(path: Path, curve: list[tuple[int, float, float]]) -> None:
    from xbmcore.atomic import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "val_recall@1", "val_map@r"])
        w.writerows(curve)


# The drift CSV's columns besides step and D_<dt>: the backbone's D, the directedness, the staleness of the memory
DRIFT_EXTRA = ("cos10", "directed", "active_neg_age", "mean_age", *(f"grad_{b}" for b in
                                                                       ("0-10", "10-100", "100-1000", "1000+")))


def _write_drift(path: Path, history: list[dict], dts: list[int]) -> None:
    from xbmcore.atomic import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", *(f"D_{dt}" for dt in dts), *(f"Dbackbone_{dt}" for dt in dts), *DRIFT_EXTRA])
        for h in history:
            st = h.get("staleness") or {}
            share = st.get("grad_share") or {}
            extra = [h.get("cos10"), h.get("directed"), st.get("active_neg_age"), st.get("mean_age"),
                     *(share.get(b) for b in ("0-10", "10-100", "100-1000", "1000+"))]
            w.writerow([h["step"], *(h["D"].get(dt, "") for dt in dts),
                        *(h.get("D_backbone", {}).get(dt, "") for dt in dts),
                        *("" if v is None else v for v in extra)])


# ---- summary and figures ----

def _stats(values: list[float]) -> dict[str, Any]:
    return {"mean": round(statistics.fmean(values), 4),
            "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
            "runs": [round(v, 4) for v in values]}


def summarise(rows: list[dict[str, str]]) -> dict[str, Any]:
    by: dict[tuple, list[tuple[int, float]]] = {}
    for r in rows:
        k = (r["figure"], r["norm"], int(r["batch"] or 0), r["memory"] == "True", float(r["ratio"] or 0),
             r["warmup"], int(r["xbm_steps"] or 0), r["enqueue"] if r["memory"] == "True" else "")
        by.setdefault(k, []).append((int(r["seed"]), float(r["recall@1"])))
    table = []
    for (fig, norm, b, mem, ratio, warmup, xbm, enqueue), runs in sorted(by.items()):
        runs.sort()
        table.append({"figure": fig, "norm": norm, "batch": b, "memory": mem, "ratio": ratio, "warmup": warmup,
                      "xbm_steps": xbm, "enqueue": enqueue, "seeds": [s for s, _ in runs],
                      "recall@1": _stats([v for _, v in runs])})
    return {"table": table}


def _series(rows, **match) -> dict[Any, list[float]]:
    out: dict[Any, list[float]] = {}
    for r in rows:
        if all(str(r[k]) == str(v) for k, v in match.items() if k != "x"):
            out.setdefault(float(r[match["x"]]), []).append(float(r["recall@1"]))
    return dict(sorted(out.items()))


def _of_this_order(args, rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """The figures' rows: those trained with the base params' enqueue order (a baseline has none to differ) and
    numerics (train.portable: the kernels round differently, so the two kinds of rows are not mixed)."""
    base = _run_params(args, [], resolve=False)
    return [r for r in rows if r["figure"] != "order" and r.get("portable", "False") == str(base.train.portable)
            and (r["memory"] == "False" or r["enqueue"] == base.memory.enqueue)]


def _errorbars(ax, points: dict[float, list[float]], label, **kw) -> None:
    """Mean per x with the range of the seeds as the error bar."""
    xs = sorted(points)
    means = [statistics.fmean(points[x]) for x in xs]
    lo = [m - min(points[x]) for m, x in zip(means, xs)]
    hi = [max(points[x]) - m for m, x in zip(means, xs)]
    ax.errorbar(xs, means, yerr=[lo, hi], capsize=3, marker="o", label=label, **kw)


def _save(plt, fig, ax, path: Path, xlabel: str, ylabel: str, title: str, title_size=None) -> str:
    """Label, lay out and write one figure; returns its file name."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, **({} if title_size is None else {"fontsize": title_size}))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name


def plot(args, rows: list[dict[str, str]]) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    written = []
    rows = _of_this_order(args, rows)

    def save(fig, ax, name: str, xlabel: str, title: str) -> None:
        written.append(_save(plt, fig, ax, docs / name, xlabel, "test Recall@1", title))

    errorbars = _errorbars

    # Fig. 1a/b: the schedule of these arguments; fig1a runs with a longer XBM phase are drawn dashed.
    sched = [r for r in rows if r["warmup"] == str(args.warmup_steps)]
    fig1 = [r for r in sched if r["figure"] == "fig1a" and r["xbm_steps"] == str(args.xbm_steps)]
    longer = sorted({int(r["xbm_steps"]) for r in sched if r["figure"] == "fig1a"} - {args.xbm_steps})
    if fig1:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for mem, name in (("False", "without XBM"), ("True", "with XBM (memory = train set)")):
            errorbars(ax, _series(fig1, x="batch", memory=mem, norm="batch"), name)
        for xbm in longer:
            other = [r for r in sched if r["figure"] == "fig1a" and r["xbm_steps"] == str(xbm)]
            for mem, name in (("False", "without XBM"), ("True", "with XBM")):
                s = _series(other, x="batch", memory=mem, norm="batch")
                if s:
                    errorbars(ax, s, f"{name}, {xbm} steps after warm-up", linestyle="--", alpha=0.8)
        for mem, name in (("False", "GroupNorm, without XBM"), ("True", "GroupNorm, with XBM")):
            s = _series(fig1, x="batch", memory=mem, norm="group")
            if s:
                errorbars(ax, s, name, linestyle="none", alpha=0.7)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(args.batches), [str(b) for b in sorted(args.batches)])
        save(fig, ax, "paper_fig1a_batch.png", "batch size (4 images per class)",
             f"Fig. 1a: Recall@1 vs batch size ({args.warmup_steps} + {args.xbm_steps} steps)")
    b0 = min(args.batches)
    small = [r for r in sched if r["figure"] in ("fig1a", "fig1b") and r["norm"] == "batch" and int(r["batch"]) == b0
             and r["xbm_steps"] == str(args.xbm_steps)]
    if any(r["figure"] == "fig1b" for r in small):
        fig, ax = plt.subplots(figsize=(5.5, 4))
        errorbars(ax, _series(small, x="ratio", memory="True"), f"with XBM, batch {b0}")
        base = _series(small, x="ratio", memory="False").get(0.0)
        if base:
            ax.axhline(statistics.fmean(base), color="gray", linestyle="--", label=f"without XBM, batch {b0}")
        big = _series(fig1, x="batch", memory="False", norm="batch")
        if big:
            bmax = max(big)
            ax.axhline(statistics.fmean(big[bmax]), color="black", linestyle=":",
                       label=f"without XBM, batch {int(bmax)}")
        ax.set_xscale("log")
        save(fig, ax, "paper_fig1b_ratio.png", "memory ratio (K / train-set size)",
             f"Fig. 1b: Recall@1 vs memory ratio, batch {b0}")
    drift = [r for r in rows if r["figure"] == "drift"]
    drift = [r for r in drift if r["seed"] == min(r["seed"] for r in drift)]  # one seed's curves
    if drift:
        fig, axes = plt.subplots(1, len(drift), figsize=(5 * len(drift) + 1, 4), sharey=True, squeeze=False)
        axes = axes[0]
        for ax, r in zip(axes, sorted(drift, key=lambda r: r["memory"])):
            path = Path(args.out) / "drift" / f"{r['key']}.csv"
            if not path.is_file():
                continue
            with open(path, newline="") as f:
                hist = list(csv.DictReader(f))
            for col in [c for c in hist[0] if c.startswith("D_")]:
                pts = [(int(h["step"]), float(h[col])) for h in hist if h[col]]
                ax.plot([s for s, _ in pts], [v for _, v in pts], label=f"dt = {col[2:]}")
            ax.axvline(int(r["warmup_end"]), color="gray", linestyle="--", linewidth=1)
            ax.set_yscale("log")
            ax.set_xlabel("step (dashed: memory on / warm-up end)")
            ax.set_title(("with XBM" if r["memory"] == "True" else "without XBM") + f", seed {r['seed']}")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("D(t; dt) = mean ||f_t(x) - f_{t-dt}(x)||^2")
        axes[0].legend(fontsize=8)
        probes = _run_params(args, [], resolve=False).train.drift_probe
        fig.suptitle(f"Feature drift of {probes} probe images (test view)")
        fig.tight_layout()
        fig.savefig(docs / "paper_drift.png", dpi=120)
        plt.close(fig)
        written.append("paper_drift.png")
    return written


# ---- the study of the memory's freshness: methods, each run scored at its best validation checkpoint ----

def _methods_rows(args, rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """The rows of this schedule: the warm-up, and the XBM phase's images (--same-images) or steps."""
    b0 = min(args.batches)

    def phase_ok(r) -> bool:
        b = int(r["batch"] or b0)
        want = max(1, args.xbm_steps * b0 // b) if args.same_images else args.xbm_steps
        return r["figure"] not in ("fig1a", "fig1b") or int(r["xbm_steps"]) == want

    return [r for r in rows if r["warmup"] == str(args.warmup_steps) and phase_ok(r)]


def _method_order(rows) -> list[str]:
    names = sorted({r["method"] for r in rows})
    return sorted(names, key=lambda m: (m != "baseline", m != "plain", m))


def markdown_methods(args, rows: list[dict[str, str]]) -> str:
    """Fig. 1a per method (mean ± std over seeds, and each method's paired gain over the baseline per seed), Fig.
    1b per method, and what each method costs (images/s against plain XBM)."""
    rows = _methods_rows(args, rows)
    split = rows[0]["split"] if rows else args.split
    out: list[str] = []
    fig1 = [r for r in rows if r["figure"] == "fig1a" and r["norm"] == "batch"]
    methods = _method_order(fig1)
    if fig1:
        steps = (f"{args.xbm_steps} x {min(args.batches)} / batch steps (the same images at every batch)"
                 if args.same_images else f"{args.xbm_steps} steps")
        out += [f"Fig. 1a, warm-up {args.warmup_steps} steps, then {steps}; {split} Recall@1 at each run's best "
                "validation checkpoint, mean ± std over seeds; gain: paired with the baseline of the same seed, "
                "in points", "",
                "| batch | seeds | " + " | ".join(methods) + " | " +
                " | ".join(f"gain {m}" for m in methods if m != "baseline") + " |",
                "|---" * (2 + 2 * len(methods) - ("baseline" in methods)) + "|"]
        for b in sorted({int(r["batch"]) for r in fig1}):
            by = {m: {int(r["seed"]): float(r["recall@1"]) for r in fig1 if int(r["batch"]) == b and r["method"] == m}
                  for m in methods}
            seeds = sorted({k for v in by.values() for k in v})
            cells = [_cell(list(by[m].values())) for m in methods]
            gains = []
            for m in methods:
                if m == "baseline":
                    continue
                both = [k for k in seeds if k in by[m] and k in by["baseline"]]
                g = [100 * (by[m][k] - by["baseline"][k]) for k in both]
                gains.append(f"{statistics.fmean(g):+.1f} ({' / '.join(f'{v:+.1f}' for v in g)})" if g else "")
            out.append(f"| {b} | {' '.join(map(str, seeds))} | " + " | ".join(cells) + " | " + " | ".join(gains)
                       + " |")
        out.append("")
    b0 = min(args.batches)
    small = [r for r in rows if r["figure"] in ("fig1a", "fig1b") and r["norm"] == "batch" and int(r["batch"]) == b0]
    if any(r["figure"] == "fig1b" for r in small):
        out += [f"Fig. 1b, batch {b0}: {split} Recall@1 per memory ratio, mean ± std over seeds", "",
                "| memory ratio | " + " | ".join(m for m in _method_order(small) if m != "baseline") + " |",
                "|---" * len(_method_order(small)) + "|"]
        for ratio in sorted({float(r["ratio"]) for r in small if r["method"] != "baseline"}):
            cells = [_cell([float(r["recall@1"]) for r in small if r["method"] == m and float(r["ratio"]) == ratio])
                     for m in _method_order(small) if m != "baseline"]
            out.append(f"| {ratio:.2f} | " + " | ".join(cells) + " |")
        base = [float(r["recall@1"]) for r in small if r["method"] == "baseline"]
        n = len([m for m in _method_order(small) if m != "baseline"])
        out += ["| 0 (the baseline, no memory) | " + " | ".join([_cell(base)] * n) + " |", ""]
    out += _drift_summary(args, rows)
    out += _cost_table(args, rows)
    return "\n".join(out)


def _drift_summary(args, rows) -> list[str]:
    """Per method at the smallest batch, from the probed runs: the mean over the XBM phase's probes (from its
    1,000th step on, or all when shorter) of D(t; 100) of the head and of the backbone, the directedness, the share
    of the memory gradient from entries 100 steps old or more, and the active negatives' age; per seed."""
    b0 = min(args.batches)
    probed = [(r, _read_drift(args, r)) for r in rows if r["figure"] == "fig1a" and r["norm"] == "batch"
              and int(r["batch"]) == b0]
    probed = [(r, h) for r, h in probed if h]
    if not probed:
        return []

    def mean(hist, end, col) -> float | None:
        phase = [h for h in hist if int(h["step"]) > end and h.get(col)]
        late = [h for h in phase if int(h["step"]) >= end + 1000] or phase
        return statistics.fmean(float(h[col]) for h in late) if late else None

    def old(h) -> str:
        return str(float(h["grad_100-1000"] or 0) + float(h["grad_1000+"] or 0)) if h.get("grad_0-10") else ""

    out = [f"Drift and staleness at batch {b0}: means over the phase's probes from its 1,000th step on (D: squared "
           "distance of unit vectors)", "",
           "| method | seed | D(t; 100) head | D(t; 100) backbone | directed | memory gradient from entries >= 100 "
           "steps old | active negatives' age |", "|---|---|---|---|---|---|---|"]
    order = _method_order([r for r, _ in probed])
    for r, hist in sorted(probed, key=lambda x: (order.index(x[0]["method"]), int(x[0]["seed"]))):
        end = int(r["warmup_end"])
        hist = [{**h, "old": old(h)} for h in hist]
        vals = [mean(hist, end, c) for c in ("D_100", "Dbackbone_100", "directed", "old", "active_neg_age")]
        fmt = ["{:.3f}", "{:.4f}", "{:.2f}", "{:.0%}", "{:.0f}"]
        out.append(f"| {r['method']} | {r['seed']} | " + " | ".join("" if v is None else f.format(v)
                                                                    for f, v in zip(fmt, vals)) + " |")
    return out + [""]


def _cell(vals: list[float]) -> str:
    if not vals:
        return ""
    sd = f" ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else ""
    return f"{statistics.fmean(vals):.4f}{sd}"


def _curve(args, r) -> list[tuple[int, float]]:
    path = Path(args.out) / "curves" / f"{r['key']}.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [(int(c["step"]), float(c["val_recall@1"])) for c in csv.DictReader(f)]


def _cost_table(args, rows) -> list[str]:
    """Per method at the smallest batch and first seed: the step time against plain XBM's (from --cost, the JSON of
    bench.freshness, paired in one process; else the runs' own images/s, which share the machine with whatever
    ran beside them), the best validation R@1 and its step, and the best validation R@1 within the wall time plain
    XBM takes for the phase (the method's curve up to the step its speed reaches in that time)."""
    b0 = min(args.batches)
    pick = [r for r in rows if r["figure"] == "fig1a" and int(r["batch"]) == b0 and r["norm"] == "batch"]
    if not pick:
        return []
    seed = min(int(r["seed"]) for r in pick)
    pick = {r["method"]: r for r in pick if int(r["seed"]) == seed}
    bench = json.loads(Path(args.cost).read_text())["configs"] if args.cost else None
    plain = pick.get("plain")
    if plain is None or (bench is None and not plain.get("images_per_s")):
        return []

    def time_ratio(m: str) -> float | None:  # this method's step time / plain XBM's
        if bench is not None:
            return bench[m]["time_vs_plain"] if m in bench else None
        return float(plain["images_per_s"]) / float(pick[m]["images_per_s"]) if pick[m].get("images_per_s") else None

    source = ("bench.freshness, one process, the configurations in turns" if bench is not None else
              "the runs' own images/s (runs beside each other on the same cores)")
    out = [f"Cost, batch {b0}, seed {seed}: step time against plain XBM ({source}), the best validation Recall@1 of "
           "each run's curve over the whole phase, and within the wall time plain XBM takes for the phase", "",
           "| method | images/s | step time against plain | best val R@1 (step) | best val R@1 in plain's time (step) |",
           "|---|---|---|---|---|"]
    for m in _method_order(list(pick.values())):
        r, ratio = pick[m], time_ratio(m)
        curve = _curve(args, r)
        if not curve or ratio is None:
            continue
        ips = bench[m]["images_per_s"] if bench is not None else float(r["images_per_s"])
        best = max(curve, key=lambda c: (c[1], -c[0]))
        within = [c for c in curve if c[0] <= int(r["xbm_steps"]) / ratio]
        bw = max(within, key=lambda c: (c[1], -c[0])) if within else None
        out.append(f"| {m} | {ips:.0f} | {ratio:.2f} | {best[1]:.4f} ({best[0]}) | "
                   + (f"{bw[1]:.4f} ({bw[0]})" if bw else "") + " |")
    return out + [""]


def plot_methods(args, rows: list[dict[str, str]]) -> list[str]:
    """Fig. 1a and 1b with one line per method, the validation curves of the smallest batch and first seed, and
    the staleness figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    rows = _methods_rows(args, rows)
    split = rows[0]["split"] if rows else args.split
    prefix = args.figure_prefix
    written = []

    errorbars = _errorbars

    def save(fig, ax, name, xlabel, title, ylabel=f"{split} Recall@1 (best val checkpoint)"):
        written.append(_save(plt, fig, ax, docs / name, xlabel, ylabel, title, title_size=10))

    fig1 = [r for r in rows if r["figure"] == "fig1a" and r["norm"] == "batch"]
    if fig1:
        fig, ax = plt.subplots(figsize=(6, 4.2))
        if len(_method_order(fig1)) > 10:  # the default cycle has 10 colours
            ax.set_prop_cycle(color=plt.cm.tab20.colors)
        for m in _method_order(fig1):
            pts: dict[float, list[float]] = {}
            for r in fig1:
                if r["method"] == m:
                    pts.setdefault(float(r["batch"]), []).append(float(r["recall@1"]))
            # a baseline under other settings ("baseline per-kind") is a run without XBM too
            errorbars(ax, pts, "without XBM" + m[len("baseline"):] if m.startswith("baseline") else f"XBM, {m}")
        bs = sorted({int(r["batch"]) for r in fig1})
        ax.set_xscale("log", base=2)
        ax.set_xticks(bs, [str(b) for b in bs])
        steps = f"{args.xbm_steps} x 16 / batch steps" if args.same_images else f"{args.xbm_steps} steps"
        save(fig, ax, f"{prefix}fig1a_batch.png", "batch size (4 images per class)",
             f"Fig. 1a: warm-up {args.warmup_steps}, then {steps}")
    b0 = min(args.batches)
    small = [r for r in rows if r["figure"] in ("fig1a", "fig1b") and r["norm"] == "batch" and int(r["batch"]) == b0]
    if any(r["figure"] == "fig1b" for r in small):
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for m in _method_order(small):
            if m == "baseline":
                base = [float(r["recall@1"]) for r in small if r["method"] == m]
                ax.axhline(statistics.fmean(base), color="gray", linestyle="--", label=f"without XBM, batch {b0}")
                continue
            pts = {}
            for r in small:
                if r["method"] == m:
                    pts.setdefault(float(r["ratio"]), []).append(float(r["recall@1"]))
            errorbars(ax, pts, f"XBM, {m}")
        ax.set_xscale("log")
        save(fig, ax, f"{prefix}fig1b_ratio.png", "memory ratio (K / train-set size)", f"Fig. 1b: batch {b0}")
    curves = [r for r in fig1 if int(r["batch"]) == b0 and _curve(args, r)]
    if curves:
        seed = min(int(r["seed"]) for r in curves)
        fig, ax = plt.subplots(figsize=(7, 4.2))
        order = _method_order(curves)
        for r in sorted((r for r in curves if int(r["seed"]) == seed), key=lambda r: order.index(r["method"])):
            c = _curve(args, r)
            ax.plot([x for x, _ in c], [y for _, y in c], marker=".", label=r["method"],
                    color=f"C{order.index(r['method'])}" if len(order) <= 10 else plt.cm.tab20(order.index(r["method"])))
        save(fig, ax, f"{prefix}val_curves.png", "step after the warm-up",
             f"Validation Recall@1 through the phase, batch {b0}, seed {seed}", ylabel="val Recall@1")
    written += _plot_staleness(args, rows, docs, plt, name=f"{prefix}staleness.png")
    return written


def _read_drift(args, r) -> list[dict[str, str]]:
    path = Path(args.out) / "drift" / f"{r['key']}.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _plot_staleness(args, rows, docs: Path, plt, name: str = "paper_staleness.png") -> list[str]:
    """How stale the memory is, per method, from the probed runs of the smallest batch and first seed: D(t; 100) of
    the head and of the backbone, how directed the drift is, the share of the memory term's gradient from entries
    written 100 steps ago or more, and the mean age of the active negatives."""
    probed = [r for r in rows if r["figure"] in ("fig1a", "drift") and _read_drift(args, r)]
    if not probed:
        return []
    seed = min(int(r["seed"]) for r in probed)
    b0 = min(int(r["batch"] or 0) for r in probed)
    probed = [r for r in probed if int(r["seed"]) == seed and int(r["batch"] or 0) == b0]
    fig, axes = plt.subplots(1, 4, figsize=(19, 4))
    order = _method_order(probed)
    for r in sorted(probed, key=lambda r: order.index(r["method"])):
        hist = _read_drift(args, r)
        end = int(r["warmup_end"])
        colour = f"C{order.index(r['method'])}"  # the colours of the validation curves

        def line(ax, col, **kw):
            pts = [(int(h["step"]) - end, float(h[col])) for h in hist if h.get(col)]
            if pts:
                ax.plot([s for s, _ in pts], [v for _, v in pts], color=colour, **kw)

        line(axes[0], "D_100", label=r["method"])
        line(axes[0], "Dbackbone_100", linestyle="--", alpha=0.7)
        line(axes[1], "directed", label=r["method"])
        hist = [{**h, "old": str(float(h["grad_100-1000"] or 0) + float(h["grad_1000+"] or 0))
                 if h.get("grad_100-1000") or h.get("grad_1000+") else ""} for h in hist]
        line(axes[2], "old", label=r["method"])
        line(axes[3], "active_neg_age", label=r["method"])
    titles = ("D(t; 100): head (solid), backbone (dashed)", "directed = D(t; 100) / (10 D(t; 10))",
              "memory gradient from entries >= 100 steps old", "mean age of the active negatives (steps)")
    for ax, title in zip(axes, titles):
        ax.axvline(0, color="gray", linestyle="--", linewidth=1)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step after the warm-up")
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].axhline(1, color="black", linewidth=0.8)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"Staleness of the memory, batch {b0}, seed {seed} ({rows[0]['split']} runs)")
    fig.tight_layout()
    fig.savefig(docs / name, dpi=110)
    plt.close(fig)
    return [name]


def markdown(args, rows: list[dict[str, str]]) -> str:
    """The docs' tables from the results CSV: Fig. 1a (R@1 per batch with and without XBM, the paired gain per
    seed), Fig. 1b (R@1 per memory ratio at the smallest batch) and auto against the fixed warm-up."""
    def cell(vals: list[float]) -> str:
        if not vals:
            return ""
        sd = f" ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else ""
        return f"{statistics.fmean(vals):.4f}{sd}"

    def by_seed(rs) -> dict[int, float]:
        return {int(r["seed"]): float(r["recall@1"]) for r in rs}

    out = _order_table(args, rows)
    rows = _of_this_order(args, rows)
    sched = [r for r in rows if r["warmup"] == str(args.warmup_steps) and r["figure"] in ("fig1a", "fig1b")]
    for xbm in sorted({int(r["xbm_steps"]) for r in sched if r["figure"] == "fig1a"}):
        fig1 = [r for r in sched if r["figure"] == "fig1a" and r["xbm_steps"] == str(xbm)]
        out += [f"Fig. 1a, {args.warmup_steps} + {xbm} steps: test Recall@1, mean ± std over seeds",
                "", "| batch (P x 4) | seeds | without XBM | with XBM | paired gain (points), per seed |",
                "|---|---|---|---|---|"]
        for norm in ("batch", "group"):
            for b in sorted({int(r["batch"]) for r in fig1 if r["norm"] == norm}):
                pick = [r for r in fig1 if r["norm"] == norm and int(r["batch"]) == b]
                off = by_seed(r for r in pick if r["memory"] == "False")
                on = by_seed(r for r in pick if r["memory"] == "True")
                both = sorted(set(off) & set(on))
                gains = [100 * (on[k] - off[k]) for k in both]
                g = (f"{statistics.fmean(gains):+.1f} ({' / '.join(f'{v:+.1f}' for v in gains)})" if gains else "")
                name = f"{b}" if norm == "batch" else f"{b}, GroupNorm"
                out.append(f"| {name} | {' '.join(map(str, sorted(set(off) | set(on))))} | "
                           f"{cell(list(off.values()))} | {cell(list(on.values()))} | {g} |")
        out.append("")
    b0 = min(args.batches)
    small = [r for r in sched if r["norm"] == "batch" and int(r["batch"]) == b0
             and r["xbm_steps"] == str(args.xbm_steps)]
    if any(r["figure"] == "fig1b" for r in small):
        out += [f"Fig. 1b, batch {b0}, {args.warmup_steps} + {args.xbm_steps} steps: test Recall@1 per memory ratio",
                "", "| memory ratio | seeds | test R@1 |", "|---|---|---|"]
        ratios = sorted({float(r["ratio"]) for r in small})
        for ratio in ratios:
            rs = by_seed(r for r in small if float(r["ratio"]) == ratio)
            name = "0 (no memory)" if ratio == 0 else f"{ratio:g}"
            out.append(f"| {name} | {' '.join(map(str, sorted(rs)))} | {cell(list(rs.values()))} |")
        out.append("")
    out += _drift_table(args, rows)
    auto = by_seed(r for r in rows if r["figure"] == "auto")
    if auto:
        ends = {int(r["seed"]): r["warmup_end"] for r in rows if r["figure"] == "auto"}
        # Fixed: the drift runs, or the fig1a runs of the default schedule (the probe does not change training).
        d = _run_params(args, [], resolve=False).train
        default = dict(batch=str(d.batch_size), warmup=str(d.warmup_steps), xbm_steps=str(d.xbm_steps),
                       memory="True", norm="batch", ratio="1.0")
        fixed = by_seed(r for r in rows if (r["figure"] == "drift" and r["memory"] == "True") or
                        (r["figure"] == "fig1a" and all(r[k] == v for k, v in default.items())))
        out += ["`train.warmup_steps: auto` against the fixed warm-up of params.yaml (XBM, the default schedule)",
                "", "| seed | auto: warm-up end | auto: test R@1 | fixed: test R@1 |", "|---|---|---|---|"]
        for k in sorted(auto):
            out.append(f"| {k} | {ends[k]} | {auto[k]:.4f} | {fixed[k]:.4f} |" if k in fixed else
                       f"| {k} | {ends[k]} | {auto[k]:.4f} | |")
        out.append("")
    return "\n".join(out)


def _drift_table(args, rows: list[dict[str, str]]) -> list[str]:
    """D(t; dt) of each seed's drift run with the memory, at about a dozen probe steps: every warm-up probe up to
    ten, the warm-up's end, then evenly through the XBM phase."""
    def read(r) -> list[dict[str, str]]:
        path = Path(args.out) / "drift" / f"{r['key']}.csv"
        if not path.is_file():
            return []
        with open(path, newline="") as f:
            return list(csv.DictReader(f))

    out = []
    for r in sorted((r for r in rows if r["figure"] == "drift" and r["memory"] == "True"), key=lambda r: r["seed"]):
        hist = read(r)
        if not hist:
            continue
        cols = [c for c in hist[0] if c.startswith("D_")]
        # The same schedule without the memory (--drift-baseline), its D(t; 100) beside: what the memory adds.
        base = next((read(b) for b in rows if b["figure"] == "drift" and b["memory"] == "False"
                     and b["seed"] == r["seed"]), [])
        base_d = {h["step"]: h.get("D_100", "") for h in base}
        end = int(r["warmup_end"])
        warm = [h for h in hist if int(h["step"]) <= end]
        after = [h for h in hist if int(h["step"]) > end]
        pick = warm[:: max(1, len(warm) // 10)] + after[max(1, len(after) // 8) - 1:: max(1, len(after) // 8)]
        pick = sorted({int(h["step"]): h for h in [*pick, warm[-1]] if any(h[c] for c in cols)}.items())
        extra = ["D(t; 100) without memory"] if base_d else []
        out += [f"D(t; dt) of the drift run, seed {r['seed']} (memory on at step {end}; test R@1 {r['recall@1']})",
                "", "| step | " + " | ".join([*(f"D(t; {c[2:]})" for c in cols), *extra]) + " |",
                "|---" * (len(cols) + len(extra) + 1) + "|"]
        for step, h in pick:
            name = f"{step:,}" + (" (memory on)" if step == end else "")
            cells = [f"{float(h[c]):.3f}" if h[c] else "" for c in cols]
            if base_d:
                cells.append(f"{float(base_d[h['step']]):.3f}" if base_d.get(h["step"]) else "")
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def _order_table(args, rows: list[dict[str, str]]) -> list[str]:
    """The enqueue-order ablation: per batch and seed, the baseline and XBM with either order, and the paired
    difference before - after."""
    # fig1a's runs at these batches are the same runs (the same key): a full study trains each once.
    portable = str(_run_params(args, [], resolve=False).train.portable)
    rows = [r for r in rows if r["figure"] in ("order", "fig1a") and r["norm"] == "batch"
            and r.get("portable", "False") == portable
            and float(r["ratio"] or 0) in (0.0, 1.0) and int(r["batch"]) in args.order_batches
            and r["warmup"] == str(args.warmup_steps) and r["xbm_steps"] == str(args.xbm_steps)]
    if not any(r["memory"] == "True" and r["enqueue"] == "before" for r in rows) or \
            not any(r["memory"] == "True" and r["enqueue"] == "after" for r in rows):
        return []
    out = [f"Enqueue order, {args.warmup_steps} + {args.xbm_steps} steps: test Recall@1 per seed (the three runs "
           "of a seed share its warm-up)", "",
           "| batch | seed | without XBM | XBM, after | XBM, before (Alg. 1) | before - after (points) |",
           "|---|---|---|---|---|---|"]
    for b in sorted({int(r["batch"]) for r in rows}):
        diffs = []
        for seed in sorted({int(r["seed"]) for r in rows if int(r["batch"]) == b}):
            pick = {(r["memory"], r["enqueue"] if r["memory"] == "True" else ""): float(r["recall@1"])
                    for r in rows if int(r["batch"]) == b and int(r["seed"]) == seed}
            off, after, before = (pick.get(k) for k in (("False", ""), ("True", "after"), ("True", "before")))
            d = 100 * (before - after) if before is not None and after is not None else None
            diffs += [] if d is None else [d]
            f = (lambda v: "" if v is None else f"{v:.4f}")
            out.append(f"| {b} | {seed} | {f(off)} | {f(after)} | {f(before)} | {'' if d is None else f'{d:+.1f}'} |")
        if diffs:
            out.append(f"| {b} | mean | | | | **{statistics.fmean(diffs):+.1f}** |")
    return out + [""]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.paper_figures", description=__doc__.split("\n\n")[0])
    add_params_arguments(ap, params=PARAMS)
    ap.add_argument("--baseline-set", action="append", default=[], metavar="KEY=VALUE",
                    help="more overrides for the runs without memory: the baseline's own tuned settings (train.lr), "
                         "after the warm-up both share")
    ap.add_argument("--only", nargs="+", default=["fig1a", "fig1b", "drift", "auto", "order"],
                    choices=["fig1a", "fig1b", "drift", "auto", "order"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--drift-seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--drift-baseline", action="store_true", help="also probe the run without memory")
    ap.add_argument("--seeds-auto", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3, 1.0])
    ap.add_argument("--order-batches", type=int, nargs="+", default=[16, 64], help="batches of the order ablation")
    # The committed schedule at every batch size (the same steps everywhere, so a larger batch sees more images).
    ap.add_argument("--warmup-steps", type=int, default=None,
                    help="fig1a/b warm-up steps at every batch size (default: params.yaml's train.warmup_steps)")
    ap.add_argument("--xbm-steps", type=int, default=None,
                    help="fig1a/b steps after the warm-up (default: params.yaml's train.xbm_steps)")
    ap.add_argument("--method", action="append", default=None, metavar="NAME[:KEY=VALUE,...]",
                    help="a memory variant run beside the baseline, e.g. momentum0.99:memory.momentum=0.99 "
                         "(repeatable; none: the baseline alone; default: plain:memory.momentum=0, the paper's memory written by the model "
                         "itself, whatever params.yaml's memory.momentum says)")
    ap.add_argument("--no-baseline", action="store_true", help="fig1a: only the memory's runs (--method)")
    ap.add_argument("--baseline-name", default="baseline",
                    help="fig1a: the method name of the runs without memory, for a baseline under other settings "
                         "(e.g. -S loss.reduction=mean_per_kind) beside the plain one; the gains are paired with "
                         "the one named baseline")
    ap.add_argument("--probe", type=int, default=0, metavar="N",
                    help="fig1a/b: the drift probe's N images in every run, its D(t; dt) and the memory's staleness "
                         "written to <out>/drift/<key>.csv (the drift figure's runs always probe 128)")
    ap.add_argument("--scale-momentum", action="store_true",
                    help="fig1a: a --method's memory.momentum m (chosen at the smallest batch b0) runs as m ** (b / b0) "
                         "at batch b, the same images in the moving average at every batch size")
    ap.add_argument("--same-images", action="store_true",
                    help="fig1a: the XBM phase of batch b runs xbm_steps x (smallest batch) / b steps, the same images "
                         "at every batch size (the warm-up keeps its steps)")
    ap.add_argument("--eval-every", type=int, default=0,
                    help="validation Recall@1 every this many steps of the XBM / baseline phase (at the smallest "
                         "batch, with --same-images), each run scored at its best validation checkpoint, the "
                         "tables and figures per --method; 0: scored at its last step, the earlier figures")
    ap.add_argument("--split", choices=["test", "val"], default="test",
                    help="the split each run is evaluated on: val to choose settings, test for the figures")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (groups sharing a warm-up run in one)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--lock", default=None, help="file to flock around each training phase")
    ap.add_argument("--out", default=str(ROOT / "artifacts" / "paper_figures"))
    ap.add_argument("--docs", default=str(ROOT / "docs"))
    ap.add_argument("--figure-prefix", default="paper_", help="the PNGs' names begin with this")
    ap.add_argument("--cost", default=None, metavar="JSON",
                    help="the output of bench.freshness: the cost table's step times (paired in one process)")
    ap.add_argument("--plot", action="store_true", help="only draw the figures from the results CSV")
    ap.add_argument("--markdown", action="store_true", help="also print the tables as Markdown (to stderr)")
    ap.add_argument("--markdown-out", default=None, metavar="PATH",
                    help="also write the tables as Markdown to PATH (the docs include docs/paper_figures/*.md)")
    args = ap.parse_args(argv)
    # --method none: the baseline's runs alone
    args.method = [] if args.method == ["none"] else [_method(m) for m in (args.method or ["plain:memory.momentum=0"])]
    from xbmcore.config import load_params

    base = load_params(args.params, args.overrides).train
    if args.warmup_steps is None:
        if base.warmup_steps == "auto":
            ap.error("params.yaml's train.warmup_steps is auto: give --warmup-steps for the figures' fixed warm-up")
        args.warmup_steps = base.warmup_steps
    args.xbm_steps = base.xbm_steps if args.xbm_steps is None else args.xbm_steps
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if not args.plot:
        todo = groups(args)
        if args.jobs > 1:
            with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
                for f in [pool.submit(run_group, args, g) for g in todo]:
                    f.result()
        else:
            for g in todo:
                run_group(args, g)
    everything = list(_done(out / "results.csv").values())
    # Figures and tables of one split, and of the base params' numerics: rows of portable mode and of a CPU's own
    # kernels round differently, so their seeds are not pooled.
    portable = str(load_params(args.params, args.overrides).train.portable)
    rows = [r for r in everything if r["split"] == args.split and r["portable"] == portable]
    # Rows scored at their best validation checkpoint (--eval-every) are a study of their own: methods, figures.
    scored = [r for r in rows if r.get("eval_every") not in (None, "", "0")]
    draw, tables = (plot, markdown) if not scored else (plot_methods, markdown_methods)
    rows = scored or rows
    summary = {"results": str(out / "results.csv"), "seconds": round(time.time() - t0),
               "warmup_steps": args.warmup_steps, "xbm_steps": args.xbm_steps, **summarise(rows),
               "figures": draw(args, rows)}
    print(json.dumps(summary, indent=2))
    if args.markdown:
        print(tables(args, rows), file=sys.stderr)
    if args.markdown_out:
        from xbmcore.atomic import write_text
        write_text(args.markdown_out, tables(args, rows) + "\n")
    return 0


if __name__ == "__main__":
    from pipeline.cli import enter_portable

    enter_portable(params=str(PARAMS))  # train.portable: torch is loaded already, so this starts the process again with it
    sys.exit(main())
