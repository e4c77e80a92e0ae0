"""One rank of the distributed-trainer tests, started by torchrun from test_distributed.py:

    torchrun --nproc-per-node 2 tests/xbmcore/ddp_worker.py OUT_DIR CHECKPOINT_DIR [KILL_AT_STEP]

Warm-up, memory init and an XBM phase on the tiny blobs; writes
OUT_DIR/rank<r>.pt with the curves, the weights and the memory. With KILL_AT_STEP, rank 1 SIGKILLs itself after
that step (torchrun then ends the job; the checkpoints stay).
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ddp_setup import TOTAL, WARMUP, XBM, blob_splits, ddp_params, Net  # noqa: E402
from xbmcore.distributed import init_process_group  # noqa: E402
from xbmcore.events import NullSink  # noqa: E402
from xbmcore.trainer import Hook, Trainer  # noqa: E402


class KillRank(Hook):
    def __init__(self, step: int):
        self.step = step

    def on_step(self, trainer):
        if trainer.step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main(out: Path, folder: Path, kill_at: int | None) -> None:
    torch.set_num_threads(1)
    init_process_group(torch.device("cpu"))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    params = ddp_params(batch_size=16 // world, nproc=world)
    torch.manual_seed(0)
    trainer = Trainer(params, Net(), blob_splits(), NullSink())
    trainer.train_phase("warmup", WARMUP, checkpoint_dir=folder / "warmup")
    memory = trainer.init_memory()
    hooks = [KillRank(kill_at)] if kill_at and rank == 1 else []
    trainer.train_phase("xbm", XBM, memory, checkpoint_dir=folder / "xbm", hooks=hooks)
    assert trainer.step == TOTAL
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"history": trainer.history, "evals": trainer.evals, "model": trainer.model.state_dict(),
                "memory": memory.state_dict()}, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None)
