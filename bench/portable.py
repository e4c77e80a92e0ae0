"""What portable mode (`train.portable`) costs on this CPU: the stages' work with every kernel at AVX2 against the
CPU's own kernels, timed in one run.

    python -m bench.portable                 # params.yaml's model, batch and threads, 5 rounds
    python -m bench.portable --rounds 9 --steps 60

The switches are read when torch loads, so each measurement is a child process in one mode; the two modes take
turns in rounds, so a change in machine load spreads over both. Each child times, after a few untimed steps:
XBM training steps of the Trainer with the whole train set in the memory (train.num_threads), pretraining steps
(pretrain.num_threads) and one evaluation of the test split (embedding + Recall@K, eval.num_threads). Prints JSON:
per mode the median ms per step (and s per evaluation), and per workload the median over rounds of the paired
ratio native speed / portable speed ("slowdown": 1.25 means portable mode takes 25% longer).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

MODES = ("portable", "native")
WORKLOADS = ("xbm_ms_per_step", "pretrain_ms_per_step", "evaluate_s")


def child(args) -> dict:
    from xbmcore import portable

    portable.enter(args.child == "portable")
    import time

    import torch

    from bench.common import prepared_splits, quiet_trainer
    from xbmcore.config import load_params
    from xbmcore.device import set_cpu_threads
    from xbmcore.evaluate import embed_split, retrieval_metrics
    from xbmcore.memory import build_memory
    from xbmcore.pretrain import pretrain

    p = load_params(args.params, [*args.overrides, "train.device=cpu", "train.eval_every=0", "train.drift_probe=0"])
    splits = prepared_splits(p)
    out: dict = {"aten_capability": torch.backends.cpu.get_cpu_capability(), "portable": portable.in_force()}

    trainer = quiet_trainer(p, splits)  # sets train.num_threads
    N, D = len(splits.train), trainer.model.embedding_dim
    memory = build_memory(p.model_copy(update={"memory": p.memory.model_copy(update={"ratio": 1.0})}), N, D,
                          trainer.device)
    memory.enqueue(torch.nn.functional.normalize(torch.randn(memory.K, D), dim=1),
                   torch.as_tensor(splits.train.labels[: memory.K]), torch.arange(memory.K) % N, step=0)
    trainer.train_phase("xbm", 5, memory)
    t0 = time.perf_counter()
    trainer.train_phase("xbm", args.steps, memory)
    out["xbm_ms_per_step"] = 1e3 * (time.perf_counter() - t0) / args.steps

    if splits.pretrain is not None:
        set_cpu_threads(p.pretrain.num_threads)
        model = trainer.model
        pretrain(model, splits.pretrain, p.pretrain.model_copy(update={"steps": 3}), trainer.device)
        t0 = time.perf_counter()
        pretrain(model, splits.pretrain, p.pretrain.model_copy(update={"steps": args.steps}), trainer.device)
        out["pretrain_ms_per_step"] = 1e3 * (time.perf_counter() - t0) / args.steps

    set_cpu_threads(p.eval.num_threads)
    t0 = time.perf_counter()
    embedded = embed_split(trainer.model, splits, "test", p.eval.batch_size, trainer.device, 0)
    retrieval_metrics(*embedded, recall_at=p.eval.recall_at, device=trainer.device)
    out["evaluate_s"] = time.perf_counter() - t0
    return out


def main(argv: list[str] | None = None) -> int:
    from bench.common import PARAMS
    from pipeline.cli import add_params_arguments

    ap = argparse.ArgumentParser(prog="python -m bench.portable", description=__doc__.split("\n\n")[0])
    add_params_arguments(ap, params=PARAMS)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=40, help="timed steps per workload per child")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    extra = ["--params", args.params, "--steps", str(args.steps), *[f"-S{o}" for o in args.overrides]]
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            out = subprocess.run([sys.executable, "-m", "bench.portable", "--child", mode, *extra],
                                 capture_output=True, text=True, check=True).stdout
            runs[mode].append(json.loads(out.splitlines()[-1]))
    result: dict = {"rounds": args.rounds, "steps": args.steps,
                    "kernels": {m: runs[m][0]["aten_capability"] for m in MODES},
                    "portable_in_force": {m: runs[m][0]["portable"] for m in MODES}, "modes": {}, "slowdown": {}}
    for mode in MODES:
        result["modes"][mode] = {w: round(statistics.median(r[w] for r in runs[mode]), 3)
                                 for w in WORKLOADS if w in runs[mode][0]}
    for w in WORKLOADS:
        if w in runs["portable"][0]:
            result["slowdown"][w] = round(statistics.median(
                a[w] / b[w] for a, b in zip(runs["portable"], runs["native"])), 3)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
