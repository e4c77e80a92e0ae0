"""Training speed of large backbones at their 224 px input: images/s of full XBM training steps.

    python -m bench.backbones                                  # resnet50 and timm's ViT-S/16 on the CPU
    python -m bench.backbones --models timm:convnext_tiny --batch-size 32 --steps 20 --device cuda

Random weights (nothing is downloaded; speed does not depend on them) and random 224 px images, the Trainer's own
step: forward, the contrastive loss against the batch and a full memory of --memory entries, backward, Adam step,
enqueue. One untimed step first (allocator, autotuning), then --steps timed ones. Prints JSON, one entry per
model: ms per step and images per second.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch


class _Images(torch.utils.data.Dataset):
    """Random 3 x S x S images of `classes` classes, `per_class` each (already normalised tensors)."""

    def __init__(self, classes: int, per_class: int, size: int):
        self.labels = np.repeat(np.arange(classes), per_class).astype(np.int64)
        self.x = torch.randn(len(self.labels), 3, size, size)
        self.num_classes = classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.x[i], int(self.labels[i]), i


class _Splits:
    def __init__(self, size: int):
        self.train, self.val, self.test = _Images(16, 4, size), None, None
        self.query = self.gallery = None


def time_model(backbone: str, size: int, batch: int, steps: int, memory: int, device: str) -> dict:
    from xbmcore.backbones import resolve_input
    from xbmcore.config import validate_params
    from xbmcore.events import NullSink
    from xbmcore.memory import build_memory
    from xbmcore.models import build_model
    from xbmcore.trainer import Trainer

    p = validate_params({
        "model": {"backbone": backbone, "pretrained": "none", "embedding_dim": 128, "input_size": size},
        "data": {"train_size": size, "test_resize": size, "test_size": size},
        "train": {"batch_size": batch, "images_per_class": 4, "device": device, "eval_every": 0, "drift_probe": 0,
                  "warmup_steps": 0, "xbm_steps": steps + 1, "checkpoint_every": 10_000},
        "memory": {"size": memory}})
    p = resolve_input(p)
    torch.manual_seed(0)
    model = build_model(p.model)
    trainer = Trainer(p, model, _Splits(size), NullSink())
    mem = build_memory(p, len(trainer.splits.train), trainer.memory_dim, trainer.device)
    D = trainer.memory_dim
    mem.enqueue(torch.nn.functional.normalize(torch.randn(memory, D, device=trainer.device), dim=1),
                torch.randint(0, 16, (memory,), device=trainer.device),
                torch.randint(0, 64, (memory,), device=trainer.device), step=0)
    trainer.train_phase("xbm", 1, mem)  # untimed
    sync = torch.cuda.synchronize if trainer.cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    trainer.train_phase("xbm", steps, mem)
    sync()
    dt = (time.perf_counter() - t0) / steps
    return {"model": backbone, "parameters_M": round(sum(x.numel() for x in model.parameters()) / 1e6, 1),
            "image_size": size, "batch_size": batch, "memory_K": memory, "steps": steps,
            "ms_per_step": round(1000 * dt, 1), "images_per_s": round(batch / dt, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.backbones", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["resnet50", "timm:vit_small_patch16_224"],
                    help="model.backbone values (default: %(default)s)")
    ap.add_argument("--size", type=int, default=224, help="input side in pixels (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=8, help="images per step (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per model (default: %(default)s)")
    ap.add_argument("--memory", type=int, default=1024, help="memory entries (default: %(default)s)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = {"device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
           "threads": torch.get_num_threads(), "torch": torch.__version__,
           "results": [time_model(m, args.size, args.batch_size, args.steps, args.memory, args.device)
                       for m in args.models]}
    json.dump(out, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
