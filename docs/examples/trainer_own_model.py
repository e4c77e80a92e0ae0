"""xbmcore's Trainer with your own model and your own data: warm-up, memory init,
XBM phase, test Recall@K.

    python docs/examples/trainer_own_model.py              # about 10 s on 2 CPU cores
    python docs/examples/trainer_own_model.py --steps 20   # a quick look

What the Trainer asks of your code:
- the data: a `Splits` of datasets whose items are `(image, label, dataset index)`
  and whose train set has a `labels` array (the P x M sampler draws from it); here
  16 x 16 images of 120 training classes and 40 test classes (other classes), each
  class a random pattern, drawn with fresh noise on every read.
- the model: any `nn.Module` that maps a batch of images to L2-normalised
  embeddings and says their width in `embedding_dim`.
- the settings: a `Params` (the schema of params.yaml; every key has a default,
  unknown keys are refused).
- the events: a sink (`xbmcore.events`): here a JSON-lines file and a line per
  evaluation on the terminal.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xbmcore.config import Params
from xbmcore.data import Splits
from xbmcore.events import JsonlSink, MultiSink
from xbmcore.trainer import Trainer


class Patterns(torch.utils.data.Dataset):
    """`per_class` images of each class: the class's random 16 x 16 pattern plus
    noise (fresh on each read when `augment`, fixed otherwise)."""

    def __init__(self, num_classes: int, per_class: int, seed: int, augment: bool):
        g = torch.Generator().manual_seed(seed)
        patterns = torch.randn(num_classes, 3, 16, 16, generator=g)
        self.labels = np.repeat(np.arange(num_classes), per_class)  # the sampler reads this
        self.images = patterns[self.labels] + 0.8 * torch.randn(
            len(self.labels), 3, 16, 16, generator=g
        )
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        x = self.images[i]
        if self.augment:
            x = x + 0.3 * torch.randn_like(x)
        return x, int(self.labels[i]), i


class SmallNet(nn.Module):
    """Two convolutions, pooled to 4 x 4 (the patterns are spatial), and a linear
    head to 32-d unit vectors."""

    embedding_dim = 32  # the Trainer sizes the memory from it

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
        )
        self.head = nn.Linear(64 * 16, self.embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.body(x)), dim=1)


class PrintEvaluations:
    """A sink of our own: one line per evaluation event (the event stream's `eval` kind)."""

    def emit(self, event: dict) -> None:
        if event["kind"] == "eval":
            print(f"step {event['step']}: val R@1 {event['metrics']['recall@1']:.4f}")

    def close(self) -> None:
        pass


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--steps", type=int, default=300, help="XBM-phase steps (default: %(default)s)"
    )
    ap.add_argument(
        "--warmup", type=int, default=100, help="warm-up steps, without the memory"
    )
    ap.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="where the events and checkpoints go (default: a temporary folder)",
    )
    args = ap.parse_args(argv)
    torch.manual_seed(0)

    params = Params.model_validate(
        {
            "train": {
                "batch_size": 32,
                "images_per_class": 4,
                "warmup_steps": args.warmup,
                "xbm_steps": args.steps,
                "lr": 3e-3,
                "warmup_lr": 3e-3,
                "eval_every": max(1, (args.warmup + args.steps) // 4),
                "checkpoint_every": 100,
                "drift_probe": 0,
                "device": "cpu",
                "seed": 0,
            },
            "memory": {
                "ratio": 1.0,
                "momentum": 0.0,
            },  # the whole train set; entries written by the model itself
            "loss": {"name": "contrastive", "margin": 0.5},
            "eval": {"recall_at": [1, 10]},
        }
    )
    splits = Splits(
        train=Patterns(120, 10, seed=1, augment=True),
        val=Patterns(30, 10, seed=3, augment=False),
        test=Patterns(40, 10, seed=2, augment=False),
    )
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="xbm-example-"))
    sink = MultiSink([JsonlSink(run_dir / "events.jsonl"), PrintEvaluations()])
    trainer = Trainer(params, SmallNet(), splits, sink, run_dir=run_dir)

    print(f"test before training: {json.dumps(trainer.evaluate('test'))}")
    trainer.train_phase("warmup", params.train.warmup_steps)
    memory = trainer.init_memory()  # K entries embedded by the warmed-up model
    print(f"memory: {len(memory)} of K = {memory.K} entries after the warm-up")
    trainer.train_phase("xbm", params.train.xbm_steps, memory)
    metrics = trainer.evaluate("test")
    print(f"test after {trainer.step} steps: {json.dumps(metrics)}")
    sink.close()
    print(f"events and checkpoints in {run_dir}")
    return metrics


if __name__ == "__main__":
    main()
