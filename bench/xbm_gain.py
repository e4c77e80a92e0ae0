"""Ablation: XBM against the same schedule without memory, for both loss reductions, over several seeds.

    python -m bench.xbm_gain                      # params.yaml, seeds 0 1 2, mean_active and sum_over_batch
    python -m bench.xbm_gain --seeds 0 1 -S train.xbm_steps=1000 --reductions mean_active

Runs the pipeline's own stage functions in-process in a temporary project (its own data copy and MLflow
database, deleted afterwards unless --keep). Per (reduction, seed) one warm-up is shared by the baseline and the
XBM run, so each seed gives a paired difference. Prints JSON: test Recall@1 (and MAP@R) per config as mean,
sample standard deviation and the runs, and the paired gain of XBM over the baseline per reduction.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.common import PARAMS
from pipeline.cli import add_params_arguments


def _summary(values: list[float]) -> dict:
    return {"mean": round(statistics.fmean(values), 4),
            "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
            "spread": round(max(values) - min(values), 4),
            "runs": [round(v, 4) for v in values]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.xbm_gain", description=__doc__.split("\n\n")[0])
    add_params_arguments(ap, params=PARAMS)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--reductions", nargs="+", default=["mean_active", "sum_over_batch"],
                    choices=["mean_active", "sum_over_batch"])
    ap.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary folder)")
    args = ap.parse_args(argv)

    from pipeline.stages import (
        run_download, run_evaluate, run_memory_init, run_pretrain, run_train_xbm, run_warmup,
    )
    from pipeline.tracking import configure_logging
    from xbmcore.config import load_params

    configure_logging()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="xbm_gain_"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # runs go to the work folder's own database
    t0 = time.time()
    results: dict[tuple[str, bool], list[dict]] = {}
    try:
        base = load_params(args.params, args.overrides)
        run_download(base, work)
        run_pretrain(base, work)  # model.pretrained's file in the work folder (seed-independent, as ImageNet is)
        for red in args.reductions:
            for seed in args.seeds:
                common = [*args.overrides, f"loss.reduction={red}", f"train.seed={seed}"]
                warm = work / f"{red}-seed{seed}"
                run_warmup(load_params(args.params, common), work, artifacts=warm)
                for enabled in (False, True):
                    p = load_params(args.params, [*common, f"memory.enabled={str(enabled).lower()}"])
                    art = work / f"{red}-seed{seed}-{'xbm' if enabled else 'baseline'}"
                    t1 = time.time()
                    run_memory_init(p, work, artifacts=art, warmup=warm / "warmup")
                    run_train_xbm(p, work, artifacts=art, warmup=warm / "warmup")
                    m = run_evaluate(p, work, artifacts=art, log_model=False)
                    m["seconds"] = time.time() - t1
                    results.setdefault((red, enabled), []).append(m)
                    print(json.dumps({"reduction": red, "memory": enabled, "seed": seed,
                                      "recall@1": round(m["recall@1"], 4), "map@r": round(m["map@r"], 4),
                                      "seconds": round(m["seconds"])}), file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    table = []
    for (red, enabled), runs in results.items():
        table.append({"config": f"{'xbm' if enabled else 'baseline'} / {red}", "reduction": red,
                      "memory": enabled, "recall@1": _summary([r["recall@1"] for r in runs]),
                      "map@r": _summary([r["map@r"] for r in runs])})
    gains = {}
    for red in args.reductions:
        b, x = results.get((red, False), []), results.get((red, True), [])
        if b and x:
            diff = [xr["recall@1"] - br["recall@1"] for br, xr in zip(b, x)]  # paired by seed
            gains[red] = {"recall@1_gain": _summary(diff),
                          "gain_exceeds_spread": min(diff) > 0 and statistics.fmean(diff) > max(
                              _summary([r["recall@1"] for r in b])["spread"],
                              _summary([r["recall@1"] for r in x])["spread"])}
    out = {"seeds": args.seeds, "overrides": args.overrides, "table": table, "gain": gains,
           "seconds": round(time.time() - t0)}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
