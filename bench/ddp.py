"""Data-parallel XBM training speed: the plain one-process path against torchrun ranks.

    python -m bench.ddp                        # CPU: plain, 1 rank and 2 ranks (gloo, one thread each)
    python -m bench.ddp --device cuda          # GPU: plain against 1 rank (NCCL): DDP's own overhead
    python -m bench.ddp -S model.backbone=resnet50 -S data.train_size=224 --device cuda

Every configuration trains the XBM phase of params.yaml (memory filled by memory init) with the same batch per
process, so 2 ranks train a global batch twice as large: their images/s is the figure to compare (on 2 CPU
cores expect less than 2x: the cores are shared with the data pipeline and the gathers). Each run is a fresh
torchrun job (or a plain process); the configurations take turns for --rounds rounds and the medians are
reported. In each job rank 0 also times the step's collectives alone (the rank-ordered all_gathers of the
embeddings, labels and indices, the all_reduce of the step's scalars and of the embeddings' gradient) at the
step's sizes: `gather_share` is their time over the step time. DDP's gradient all_reduce is not counted there;
`overhead_vs_plain` of the 1-rank job is what DDP and the collectives add to the plain step (target: <= 3%).
Prints JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import PARAMS, ROOT, data_root, quiet_trainer
from pipeline.cli import add_params_arguments


def _worker(args) -> None:
    """One rank (or the plain process): time --steps XBM steps after --warm untimed ones."""
    import torch

    from xbmcore.config import load_params
    from xbmcore.data import open_splits
    from xbmcore.distributed import Dist, init_process_group

    if device_is_cpu := args.device == "cpu":
        torch.set_num_threads(1)  # one core per rank
    p = load_params(args.params, [*args.overrides, f"train.device={args.device}", "train.eval_every=0"])
    device = torch.device("cpu" if device_is_cpu else "cuda")
    init_process_group(device)
    splits = open_splits(Path(args.data_root) / p.data.prepared / p.data.name, p.data)
    trainer = quiet_trainer(p, splits)
    memory = trainer.init_memory()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    trainer.train_phase("xbm", args.warm, memory)
    sync()
    t0 = time.perf_counter()
    trainer.train_phase("xbm", args.steps, memory)
    sync()
    step_s = (time.perf_counter() - t0) / args.steps
    d = Dist()
    gather_s = 0.0
    if d.active:  # the step's collectives alone, at its sizes
        b, D = p.train.batch_size, trainer.model.embedding_dim
        emb = torch.randn(b, D, device=device)
        labels = torch.zeros(b, dtype=torch.int64, device=device)
        scalars = torch.zeros(8, dtype=torch.float64, device=device)
        grad = torch.randn(b * d.world, D, device=device)
        for rep in range(2):  # the first round warms the communicators up
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                d.gather(emb), d.gather(labels), d.gather(labels), d.sum(scalars), d.sum(grad)
            sync()
            gather_s = (time.perf_counter() - t0) / args.steps
    if d.is_main:
        Path(args.worker).write_text(json.dumps({"step_s": step_s, "gather_s": gather_s, "world": d.world}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(nproc: int | None, args, root: Path, out: Path) -> dict:
    """nproc None: the plain path (no torchrun); else a torchrun job of nproc ranks on 127.0.0.1."""
    worker = ["-m", "bench.ddp", "--worker", str(out), "--data-root", str(root), "--params", args.params,
              "--device", args.device, "--steps", str(args.steps), "--warm", str(args.warm),
              *[a for ov in args.overrides for a in ("-S", ov)]]
    if nproc is not None:
        worker = ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
                  f"--master-port={_free_port()}", *worker]
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, *worker], env=env, check=True, capture_output=True, timeout=1200)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ddp", description=__doc__.split("\n\n")[0])
    add_params_arguments(ap, params=PARAMS)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=100, help="timed steps per job")
    ap.add_argument("--warm", type=int, default=10, help="untimed steps first (allocator, autotuning)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--data-root", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0

    from xbmcore.config import load_params
    from xbmcore.data import prepare_dataset

    p = load_params(args.params, args.overrides)
    root = data_root(p)
    prepare_dataset(p.data, root, progress=False)
    configs = {"plain": None, "ranks_1": 1} | ({"ranks_2": 2} if args.device == "cpu" else {})
    runs: dict[str, list[dict]] = {k: [] for k in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, nproc in configs.items():
                runs[name].append(_launch(nproc, args, root, Path(tmp) / f"{name}_{r}.json"))
    b = p.train.batch_size
    out = {"device": args.device, "model": p.model.backbone, "image_size": p.data.train_size,
           "batch_per_rank": b, "steps": args.steps, "rounds": args.rounds, "configs": {}}
    plain = [x["step_s"] for x in runs["plain"]]
    for name, nproc in configs.items():
        step = [x["step_s"] for x in runs[name]]
        world = nproc or 1
        t = statistics.median(step)
        out["configs"][name] = {
            "ranks": world, "global_batch": b * world, "ms_per_step": round(1000 * t, 2),
            "ms_per_step_rounds": [round(1000 * x, 2) for x in step],
            "steps_per_s": round(1 / t, 2), "images_per_s": round(b * world / t, 1),
            "gather_share": round(statistics.median(x["gather_s"] / x["step_s"] for x in runs[name]), 4),
            # paired by round, so a change in machine load between rounds cancels
            "overhead_vs_plain": round(statistics.median(x / y for x, y in zip(step, plain)) - 1, 4),
        }
    if "ranks_2" in out["configs"]:
        out["images_per_s_2_over_1"] = round(out["configs"]["ranks_2"]["images_per_s"]
                                             / out["configs"]["plain"]["images_per_s"], 3)
    out["ddp_overhead_1_rank"] = out["configs"]["ranks_1"]["overhead_vs_plain"]
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
