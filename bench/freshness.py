"""What keeping the memory fresh costs: training-step speed of each `memory.*` method against plain XBM.

    python -m bench.freshness                                  # the methods of the study, params.yaml's data
    python -m bench.freshness --method refresh64:memory.refresh=64 --steps 30 --rounds 5

Times full XBM training steps (data, forward, the method's extra work, loss, backward, optimiser step, enqueue)
of one Trainer per method, each with a memory of the train set filled by memory initialisation, and the baseline
(no memory). The configurations take turns in rounds, so a change in machine load spreads over all of them; a
method's cost is the median over rounds of its step time over plain XBM's step time in the same round. Prints
JSON: ms per step, images/s and the ratio to plain XBM per method.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from bench.common import PARAMS, prepared_splits, quiet_trainer
from pipeline.cli import add_params_arguments

# The selection's methods (docs/fresh-memory.md).
METHODS = ["plain", "momentum0.99:memory.momentum=0.99", "momentum0.999:memory.momentum=0.999",
           "refresh16:memory.refresh=16", "refresh64:memory.refresh=64", "sdc0.5:memory.sdc_sigma=0.5",
           "sdc2:memory.sdc_sigma=2.0", "features:memory.store=features"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.freshness", description=__doc__.split("\n\n")[0])
    add_params_arguments(ap, params=PARAMS)
    ap.add_argument("--method", action="append", default=None, metavar="NAME[:KEY=VALUE,...]",
                    help=f"a method to time (repeatable; default: {', '.join(m.split(':')[0] for m in METHODS)})")
    ap.add_argument("--steps", type=int, default=40, help="steps per configuration per round")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)

    import torch

    from xbmcore.config import load_params

    specs = [m.partition(":") for m in (args.method or METHODS)]
    base = [*args.overrides, "train.device=cpu", "train.drift_probe=0", "train.eval_every=0", "memory.ratio=1.0"]
    p0 = load_params(args.params, base)
    splits = prepared_splits(p0)
    configs = {"baseline": (quiet_trainer(load_params(args.params, [*base, "memory.enabled=false"]), splits), None)}
    for name, _, overrides in specs:
        p = load_params(args.params, [*base, *[o for o in overrides.split(",") if o]])
        trainer = quiet_trainer(p, splits)
        configs[name] = (trainer, trainer.init_memory())

    def run(trainer, memory, steps: int) -> float:
        t0 = time.perf_counter()
        trainer.train_phase("baseline" if memory is None else "xbm", steps, memory)
        return (time.perf_counter() - t0) / steps

    for trainer, memory in configs.values():  # allocator, first touch of the data
        run(trainer, memory, 5)
    times: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(args.rounds):
        for name, (trainer, memory) in configs.items():
            times[name].append(run(trainer, memory, args.steps))
    B = p0.train.batch_size
    out = {"device": "cpu", "threads": torch.get_num_threads(), "batch_size": B, "train_images": len(splits.train),
           "steps_per_round": args.steps, "rounds": args.rounds, "configs": {}}
    ref = "plain" if "plain" in times else None
    for name, t in times.items():
        m = statistics.median(t)
        out["configs"][name] = {
            "ms_per_step": round(1000 * m, 2), "ms_per_step_rounds": [round(1000 * x, 2) for x in t],
            "images_per_s": round(B / m, 1),
            **({"time_vs_plain": round(statistics.median(x / r for x, r in zip(t, times[ref])), 3)} if ref else {}),
        }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    from pipeline.cli import enter_portable

    enter_portable(params=str(PARAMS))
    sys.exit(main())
