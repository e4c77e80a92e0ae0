"""Cost of the drift probe (xbmcore.drift) next to the training step.

    python -m bench.drift_probe                     # params.yaml (its train.drift_probe, drift_every, drift_dts)
    python -m bench.drift_probe -S train.drift_probe=256 --rounds 5

Trains the XBM phase of the default model in rounds of `train.drift_every` steps, taking turns with the probe
attached and detached, so machine load spreads over both. The probe embeds its images at the probe step and at
t - dt for each dt, so per `drift_every` steps it embeds `embeds_per_interval` times; a round with it attached
holds one more (its first step). The probe's cost per step is the median over rounds of (time with - time
without) / embeds in the round x embeds_per_interval / drift_every, as a share of the step without it. Prints JSON
(target: at most 5% of the default step).
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
    ap = argparse.ArgumentParser(prog="python -m bench.drift_probe", description=__doc__.split("\n\n")[0])
    add_params_arguments(ap, params=PARAMS)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)

    from xbmcore.config import load_params

    p = load_params(args.params, ["train.device=cpu", "train.eval_every=0", *args.overrides])
    t = p.train
    if not t.drift_probe:
        raise SystemExit("train.drift_probe is 0: nothing to measure (set -S train.drift_probe=512)")
    trainer = quiet_trainer(p, prepared_splits(p))
    monitor = trainer.hooks[-1]
    probe = trainer.probe
    embeds = [0]
    embed = probe.embed
    probe.embed = lambda: (embeds.__setitem__(0, embeds[0] + 1), embed())[1]
    memory = trainer.init_memory()
    per_interval = len({0, *((-dt) % t.drift_every for dt in t.drift_dts)})

    def run(attached: bool) -> tuple[float, int]:
        trainer.hooks = [monitor] if attached else []
        before = embeds[0]
        t0 = time.perf_counter()
        trainer.train_phase("xbm", t.drift_every, memory)
        return time.perf_counter() - t0, embeds[0] - before

    run(False)  # first touch of data and kernels
    plain, probed, per_embed, cost = [], [], [], []
    for _ in range(args.rounds):
        a, _ = run(False)
        b, n = run(True)
        plain.append(a / t.drift_every)
        probed.append(b / t.drift_every)
        per_embed.append((b - a) / n)
        cost.append((b - a) / n * per_interval / t.drift_every / (a / t.drift_every))
    out = {
        "threads": torch.get_num_threads(), "model": p.model.backbone, "batch_size": t.batch_size,
        "probe_images": len(probe.items), "drift_every": t.drift_every, "drift_dts": t.drift_dts,
        "embeds_per_interval": per_interval, "rounds": args.rounds,
        "ms_per_step": round(1000 * statistics.median(plain), 2),
        "ms_per_embed": round(1000 * statistics.median(per_embed), 1),
        "probe_cost": round(statistics.median(cost), 4),
        "probe_cost_rounds": [round(c, 4) for c in cost],
        "snapshots_held": len(probe.snapshots),
        "snapshot_mb": round(sum(s.numel() * 4 for s in probe.snapshots.values()) / 2**20, 2),
    }
    out["target_met"] = out["probe_cost"] <= 0.05
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
