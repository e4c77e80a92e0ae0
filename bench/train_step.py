"""Training-step speed with and without the cross-batch memory.

    python -m bench.train_step                    # the default model and data of params.yaml, on the CPU
    python -m bench.train_step --device cuda      # on a GPU (bf16 autocast, channels_last)
    python -m bench.train_step -S train.batch_size=64 --steps 200

Times full training steps (data loading, forward, loss, backward, optimiser step, enqueue) of the Trainer in
four configurations: no memory (the baseline phase), the memory at the default size (memory.ratio or
memory.size), the memory at 100% of the train set, and (informative) a memory of --large-k entries. The
configurations take turns in rounds, so a change in machine load spreads over all of them; a memory's cost is
the median over rounds of its step time over the no-memory step time of the same round. Prints JSON with ms per
step, steps/s, images/s and each memory's cost (target: <= 10% at the default size and at 100%).
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
    ap = argparse.ArgumentParser(prog="python -m bench.train_step", description=__doc__.split("\n\n")[0])
    add_params_arguments(ap, params=PARAMS)
    ap.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: train.device")
    ap.add_argument("--steps", type=int, default=50, help="steps per configuration per round")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--large-k", type=int, default=59_551,
                    help="also time a memory of this size (default: the SOP train set; 0: skip); informative, "
                         "not part of the target")
    ap.add_argument("--data-root", default=None,
                    help="project root holding the prepared dataset (default: this project if prepared there, "
                         "else a temporary folder)")
    args = ap.parse_args(argv)

    from xbmcore.config import load_params
    from xbmcore.memory import build_memory

    overrides = list(args.overrides) + ([f"train.device={args.device}"] if args.device else [])
    p = load_params(args.params, overrides)
    splits = prepared_splits(p, args.data_root)
    trainer = quiet_trainer(p, splits)
    N, D, dev = len(splits.train), trainer.model.embedding_dim, trainer.device
    default = build_memory(p, N, D, dev)
    full = type(default)(N, D, mode=p.memory.mode, num_items=N, dtype=default.get()[0].dtype, device=dev)
    configs = {"no_memory": None, "memory_default": default, "memory_full": full}
    if args.large_k:
        configs["memory_large"] = type(default)(args.large_k, D, mode="queue", dtype=default.get()[0].dtype,
                                                device=dev)
    for m in [m for m in configs.values() if m is not None]:  # a full memory from the start, as after memory_init
        m.enqueue(torch.nn.functional.normalize(torch.randn(m.K, D, device=dev), dim=1),
                  torch.as_tensor(splits.train.labels[: m.K], device=dev) if m.K <= N else
                  torch.randint(0, splits.train.num_classes, (m.K,), device=dev),
                  torch.arange(m.K, device=dev) % N, step=0)

    def run(memory, steps: int) -> float:
        phase = "baseline" if memory is None else "xbm"
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        trainer.train_phase(phase, steps, memory)  # each step syncs once (its loss is checked and logged)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / steps

    for name, m in configs.items():  # warm-up: allocator, cuDNN autotuning, first-touch of the data
        run(m, 10)
    times: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(args.rounds):
        for name, m in configs.items():
            times[name].append(run(m, args.steps))
    B = p.train.batch_size
    out = {
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "threads": torch.get_num_threads(),
        "precision": str(trainer.amp_dtype or torch.float32).removeprefix("torch."),
        "model": p.model.backbone, "batch_size": B, "image_size": p.data.train_size, "embedding_dim": D,
        "train_images": N, "steps_per_round": args.steps, "rounds": args.rounds,
        "configs": {},
        # cost = median over rounds of (this config's step time / the no-memory step time of the same round):
        # pairing within a round cancels most of the drift in machine load.
    }
    for name, m in configs.items():
        t = statistics.median(times[name])
        out["configs"][name] = {
            "memory_K": 0 if m is None else m.K,
            "ms_per_step": round(1000 * t, 3),
            "ms_per_step_rounds": [round(1000 * x, 3) for x in times[name]],
            "steps_per_s": round(1 / t, 2),
            "images_per_s": round(B / t, 1),
            "cost_vs_no_memory": round(statistics.median(
                x / b for x, b in zip(times[name], times["no_memory"])) - 1, 4),
        }
    out["xbm_cost_default"] = out["configs"]["memory_default"]["cost_vs_no_memory"]
    out["xbm_cost_full"] = out["configs"]["memory_full"]["cost_vs_no_memory"]
    out["target_met"] = out["xbm_cost_default"] <= 0.10 and out["xbm_cost_full"] <= 0.10
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
