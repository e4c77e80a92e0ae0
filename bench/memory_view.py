"""Cost of the memory view (xbmcore.memory_view) next to the training step.

    python -m bench.memory_view                       # params.yaml (train.memory_view_every, _k, _anchors)
    python -m bench.memory_view --rounds 5 --steps 20

Trains the XBM phase of the default model in rounds of `--steps` steps without any hook, and after each round
times one view of that state (`MemoryView.record`) twice: as the trainer runs it at a view step, where the drift
probe has just embedded the anchors (memory_view_every a multiple of drift_every: the view reuses them), and with
its own embedding of the anchors (no probe at that step). The view's cost per step is view time / memory_view_every,
as a share of the step time of the same round (median over rounds). Prints JSON (target: at most 2% of the
default step).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from bench.common import PARAMS, prepared_splits, quiet_trainer
from pipeline.cli import add_params_arguments


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.memory_view", description=__doc__.split("\n\n")[0])
    add_params_arguments(ap, params=PARAMS)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20, help="training steps per round")
    args = ap.parse_args(argv)

    from xbmcore.config import load_params
    from xbmcore.memory_view import MemoryView

    p = load_params(args.params, ["train.device=cpu", "train.eval_every=0", *args.overrides])
    t = p.train
    if not t.memory_view_every:
        raise SystemExit("train.memory_view_every is 0: nothing to measure")
    trainer = quiet_trainer(p, prepared_splits(p))
    view = next((h for h in trainer.hooks if isinstance(h, MemoryView)), None) \
        or MemoryView(t.memory_view_every, t.memory_view_k, t.memory_view_anchors)
    trainer.hooks = []  # the rounds train without any hook; the view is timed on its own
    memory = trainer.init_memory()
    reuse = trainer.probe is not None and t.memory_view_every % t.drift_every == 0

    def timed_view(probe_embedded: bool) -> float:
        if trainer.probe is not None:  # the probe's embedding of this step, as DriftMonitor leaves it (untimed)
            trainer.probe.current = (trainer.step, trainer.probe.embed()) if probe_embedded else None
        view.last = -1
        t0 = time.perf_counter()
        view.record(trainer)
        return time.perf_counter() - t0

    trainer.train_phase("xbm", 2, memory)  # first touch of data and kernels
    timed_view(reuse), timed_view(False)
    step_s, view_s, own_s = [], [], []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        trainer.train_phase("xbm", args.steps, memory)
        step_s.append((time.perf_counter() - t0) / args.steps)
        view_s.append(timed_view(reuse))
        own_s.append(timed_view(False))
    cost = [v / t.memory_view_every / s for v, s in zip(view_s, step_s)]
    own = [v / t.memory_view_every / s for v, s in zip(own_s, step_s)]
    out = {
        "threads": torch.get_num_threads(), "model": p.model.backbone, "batch_size": t.batch_size,
        "memory_size": len(memory), "anchors": len(view.anchors(trainer)), "memory_view_k": t.memory_view_k,
        "memory_view_every": t.memory_view_every, "reuses_probe_embedding": reuse, "rounds": args.rounds,
        "steps_per_round": args.steps,
        "ms_per_step": round(1000 * statistics.median(step_s), 2),
        "ms_per_view": round(1000 * statistics.median(view_s), 2),
        "ms_per_view_own_embedding": round(1000 * statistics.median(own_s), 2),
        "view_cost": round(statistics.median(cost), 5),
        "view_cost_rounds": [round(c, 5) for c in cost],
        "view_cost_own_embedding": round(statistics.median(own), 5),
    }
    out["target_met"] = out["view_cost"] <= 0.02
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
