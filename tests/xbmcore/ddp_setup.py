"""The tiny problem the distributed tests train on, shared by the test and its torchrun workers."""
from __future__ import annotations

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


def ddp_params(batch_size: int, nproc: int) -> Params:
    # K = 18 of 72 images: a global batch of 16 wraps the ring at every other step.
    return Params.model_validate({
        "train": dict(batch_size=batch_size, images_per_class=2, warmup_steps=WARMUP, xbm_steps=XBM, nproc=nproc,
                      checkpoint_every=5, eval_every=10, lr=3e-3, warmup_lr=3e-3, seed=0, device="cpu"),
        "memory": {"ratio": 0.25}, "eval": {"recall_at": [1, 2]}})
