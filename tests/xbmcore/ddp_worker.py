"""One rank of the distributed-trainer tests, started by torchrun from test_distributed.py:

    torchrun --nproc-per-node 2 tests/xbmcore/ddp_worker.py OUT_DIR CHECKPOINT_DIR [--kill-at STEP]
        [--mode queue|index] [--record] [--timm]

Warm-up, memory init and an XBM phase on the tiny blobs; writes
OUT_DIR/rank<r>.pt with the curves, the weights and the memory. With --kill-at, rank 1 SIGKILLs itself after
that step (torchrun then ends the job; the checkpoints stay). --mode is the memory's. --record adds the memory
after its init and every XBM step's record (algorithm1.record: weights before, this rank's batch, gradients and
memory after). --timm trains timm's test_vit instead of the tiny MLP, its backbone frozen in the warm-up.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from algorithm1 import record  # noqa: E402
from ddp_setup import TOTAL, WARMUP, XBM, Splits, blob_splits, ddp_params, Net  # noqa: E402
from xbmcore.config import ModelParams  # noqa: E402
from xbmcore.distributed import init_process_group  # noqa: E402
from xbmcore.events import NullSink  # noqa: E402
from xbmcore.hooks import Hook  # noqa: E402
from xbmcore.trainer import Trainer  # noqa: E402


class KillRank(Hook):
    def __init__(self, step: int):
        self.step = step

    def on_step(self, trainer):
        if trainer.step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class Upsampled(torch.utils.data.Dataset):
    """The blobs at 16 px (each pixel 2 x 2): a ViT's 16 px patch."""

    def __init__(self, blobs):
        self.blobs, self.labels, self.num_classes = blobs, blobs.labels, blobs.num_classes

    def __len__(self) -> int:
        return len(self.blobs)

    def __getitem__(self, i: int):
        x, y, j = self.blobs[i]
        return x.repeat_interleave(2, -1).repeat_interleave(2, -2), y, j


def main(out: Path, folder: Path, kill_at: int | None, mode: str, recording: bool, timm_model: bool = False) -> None:
    torch.set_num_threads(1)
    init_process_group(torch.device("cpu"))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    params = ddp_params(batch_size=16 // world, nproc=world, mode=mode)
    torch.manual_seed(0)
    net, splits = Net(), blob_splits()
    if timm_model:  # timm's test_vit (no BatchNorm) on the blobs at 16 px, its backbone frozen in the warm-up
        from xbmcore.models import build_model

        params = params.model_copy(update={"train": params.train.model_copy(update={
            "freeze_backbone_warmup": True, "backbone_lr_scale": 0.5})})
        net, splits = build_model(ModelParams(backbone="timm:test_vit", input_size=16, embedding_dim=16)), \
            Splits(*(Upsampled(s) for s in (splits.train, splits.val, splits.test)))
    trainer = Trainer(params, net, splits, NullSink())
    trainer.train_phase("warmup", WARMUP, checkpoint_dir=folder / "warmup")
    memory = trainer.init_memory()
    extra = {}
    if recording:
        extra = {"initial_memory": {k: v.clone() for k, v in memory.state_dict().items()}, "steps": record(trainer)}
    hooks = [KillRank(kill_at)] if kill_at and rank == 1 else []
    trainer.train_phase("xbm", XBM, memory, checkpoint_dir=folder / "xbm", hooks=hooks)
    assert trainer.step == TOTAL
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"history": trainer.history, "evals": trainer.evals, "model": trainer.model.state_dict(),
                "memory": memory.state_dict(), **extra}, out / f"rank{rank}.pt")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--kill-at", type=int)
    ap.add_argument("--mode", default="queue")
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--timm", action="store_true")
    a = ap.parse_args()
    main(a.out, a.folder, a.kill_at, a.mode, a.record, a.timm)
