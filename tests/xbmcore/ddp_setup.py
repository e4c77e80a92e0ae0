"""The tiny problem the distributed tests train on, shared by the tests and their torchrun workers."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from test_trainer import Blobs, Splits, TinyNet

# No BatchNorm: per-rank BN statistics differ from one process's, and torch's SyncBatchNorm needs GPUs.
Net = TinyNet
from xbmcore.config import Params

WARMUP, XBM = 4, 20
TOTAL = WARMUP + XBM


def blob_splits() -> Splits:
    # No per-draw noise: each rank draws its own augmentation stream, which one process would draw in another
    # order, so only noise-free images can give the same batches.
    return Splits(Blobs(12, 6, 1, False), Blobs(4, 5, 2, False), Blobs(4, 5, 3, False))


def ddp_params(batch_size: int, nproc: int, mode: str = "queue") -> Params:
    # K = 18 of 72 images: a global batch of 16 wraps the ring at every other step.
    return Params.model_validate({
        "train": dict(batch_size=batch_size, images_per_class=2, warmup_steps=WARMUP, xbm_steps=XBM, nproc=nproc,
                      checkpoint_every=5, eval_every=10, lr=3e-3, warmup_lr=3e-3, seed=0, device="cpu"),
        "memory": {"ratio": 0.25, "mode": mode}, "eval": {"recall_at": [1, 2]}})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(out: Path, folder: Path, *args: str) -> subprocess.CompletedProcess:
    """ddp_worker.py on 2 gloo ranks (127.0.0.1) with the worker's own arguments (see its docstring)."""
    here = Path(__file__).resolve().parent
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               PYTHONPATH=os.pathsep.join([str(here.parents[1]), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={_free_port()}", "--monitor-interval=0.2", str(here / "ddp_worker.py"), str(out),
           str(folder), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
