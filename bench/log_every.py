"""What reading the step's scalars every step costs: train.log_every 1 against a large value.

    python -m bench.log_every                     # the default model and data of params.yaml, on the CPU
    python -m bench.log_every --device cuda       # on a GPU, where each read is a host-device sync

Times XBM steps (memory filled by memory init) of the Trainer with log_every 1 (the default: one read, i.e. one
sync, per step) and log_every --every (one read per --every steps). The two take turns for --rounds rounds on
the same trainer, in alternating order; `sync_cost` is the median over rounds of the per-step time ratio minus 1.
Prints JSON.
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
    ap = argparse.ArgumentParser(prog="python -m bench.log_every", description=__doc__.split("\n\n")[0])
    add_params_arguments(ap, params=PARAMS)
    ap.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: train.device")
    ap.add_argument("--every", type=int, default=50, help="the deferred configuration's log_every")
    ap.add_argument("--steps", type=int, default=100, help="steps per configuration per round")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)

    from xbmcore.config import load_params

    overrides = [*args.overrides, "train.eval_every=0"] + ([f"train.device={args.device}"] if args.device else [])
    p = load_params(args.params, overrides)
    trainer = quiet_trainer(p, prepared_splits(p))
    memory = trainer.init_memory()
    dev = trainer.device
    variants = {n: p.model_copy(update={"train": p.train.model_copy(update={"log_every": n})})
                for n in (1, args.every)}

    def run(n: int, steps: int) -> float:
        trainer.params = variants[n]
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        trainer.train_phase("xbm", steps, memory)  # flushes at the end: every step's scalars are read
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / steps

    for n in variants:  # untimed: allocator, autotuning
        run(n, 10)
    times: dict[int, list[float]] = {n: [] for n in variants}
    for r in range(args.rounds):
        for n in (list(variants) if r % 2 == 0 else list(variants)[::-1]):  # alternate which goes first
            times[n].append(run(n, args.steps))
    every, deferred = 1, args.every
    out = {
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "threads": torch.get_num_threads(), "model": p.model.backbone, "batch_size": p.train.batch_size,
        "steps_per_round": args.steps, "rounds": args.rounds,
        "ms_per_step": {f"log_every_{n}": round(1000 * statistics.median(t), 3) for n, t in times.items()},
        # paired within a round, so that drift in machine load cancels
        "sync_cost": round(statistics.median(a / b for a, b in zip(times[every], times[deferred])) - 1, 4),
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
