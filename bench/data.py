"""Benchmark of the embedded dataset: generation time and loader throughput (images/s), printed as JSON.

Usage: python -m bench.data [--batches 300] [--batch-size 64]

Throughput is measured the way the trainer reads data: DataLoader(ds, batch_sampler=..., num_workers=0) over the
train split with augmentation (random resized crop + flip, normalisation), batches of 64 random indices. For
comparison it also times the test split (no augmentation) and the per-image path (`__getitem__` one by one, what a
dataset without `__getitems__` would cost).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from xbmcore.config import DataParams
from xbmcore.data import open_splits, prepare_dataset


class RandomBatches(torch.utils.data.Sampler[list[int]]):
    """`n` batches of `size` indices drawn uniformly without replacement within a batch."""

    def __init__(self, num_items: int, size: int, n: int, seed: int = 0):
        self.num_items, self.size, self.n, self.seed = num_items, size, n, seed

    def __iter__(self):
        rng = np.random.default_rng(self.seed)
        for _ in range(self.n):
            yield rng.choice(self.num_items, self.size, replace=False).tolist()

    def __len__(self) -> int:
        return self.n


def throughput(ds, batch_size: int, batches: int, per_item: bool = False) -> float:
    if per_item:  # hide __getitems__ so the DataLoader falls back to one __getitem__ per image
        ds = torch.utils.data.Subset(ds, range(len(ds)))
    loader = torch.utils.data.DataLoader(ds, batch_sampler=RandomBatches(len(ds), batch_size, batches),
                                         num_workers=0)
    it = iter(loader)
    next(it)  # warm-up: first touch of the memory map, allocator
    t0 = time.perf_counter()
    n = 0
    for x, _, _ in it:
        n += len(x)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.data", description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    p = DataParams()  # the schema's defaults: the embedded set at 32 px
    with tempfile.TemporaryDirectory() as tmp:
        p = p.model_copy(update={"prepared": str(Path(tmp) / "prepared")})
        t0 = time.perf_counter()
        out = prepare_dataset(p, Path(tmp), progress=False)
        prepare_s = time.perf_counter() - t0
        meta = json.loads((out / "meta.json").read_text())
        t0 = time.perf_counter()
        prepare_dataset(p, Path(tmp), progress=False)
        verify_s = time.perf_counter() - t0
        s = open_splits(out, p)
        result = {
            "dataset": "synthetic",
            "num_classes": p.synthetic.num_classes,
            "num_images": meta["num_images"],
            "image_size": p.synthetic.image_size,
            "array_mb": round((out / "images.npy").stat().st_size / 2**20, 1),
            "prepare_s": round(prepare_s, 2),
            "verify_s": round(verify_s, 3),
            "batch_size": args.batch_size,
            "torch_threads": torch.get_num_threads(),
            "train_images_per_s": round(throughput(s.train, args.batch_size, args.batches)),
            "test_images_per_s": round(throughput(s.test, args.batch_size, args.batches)),
            "train_per_item_images_per_s": round(throughput(s.train, args.batch_size, max(args.batches // 10, 5),
                                                            per_item=True)),
        }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
