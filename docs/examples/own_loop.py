"""Cross-Batch Memory in your own training loop: xbmcore's memory, objective,
sampler and evaluation, nothing else.

    python docs/examples/own_loop.py                  # about 10 s on 2 CPU cores
    python docs/examples/own_loop.py --steps 40       # a quick look

An MLP learns a 32-d embedding of 64-d vectors: 300 training classes and 100 test
classes (other classes, as in metric learning), each a random centre plus noise.
Batches are 4 classes x 4 images. The first `--warmup` steps train on the batch
alone; from then on each step enqueues the batch into a memory of the last K
embeddings and pairs every anchor with the whole memory too (Algorithm 1 of the
paper). It prints the test Recall@1 before training, at the end of the warm-up and
at the end.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from xbmcore.evaluate import retrieval_metrics
from xbmcore.losses import ContrastiveLoss, XBMObjective
from xbmcore.memory import CrossBatchMemory
from xbmcore.sampler import PKSampler


def make_classes(
    num_classes: int, per_class: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_class` noisy 64-d vectors around each of `num_classes` random centres,
    and their labels."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, 64, generator=g)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return centres[labels] + 1.2 * torch.randn(len(labels), 64, generator=g), labels


def recall_at_1(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> float:
    """Test Recall@1, each test vector a query against all the others."""
    model.eval()
    with torch.no_grad():
        emb = F.normalize(model(x), dim=1)
    model.train()
    return retrieval_metrics(emb.numpy(), labels.numpy(), recall_at=(1,), nmi=False)[
        "recall@1"
    ]


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--steps",
        type=int,
        default=600,
        help="optimiser steps in all (default: %(default)s)",
    )
    ap.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="steps without the memory (default: a third)",
    )
    ap.add_argument(
        "--ratio",
        type=float,
        default=0.5,
        help="memory size as a fraction of the training set",
    )
    args = ap.parse_args(argv)
    warmup = args.steps // 3 if args.warmup is None else args.warmup
    torch.manual_seed(0)

    train_x, train_y = make_classes(300, 8, seed=1)
    test_x, test_y = make_classes(100, 8, seed=2)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 32))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    # K = ratio x N entries of D = 32; the memory also records each entry's dataset
    # index, label and step.
    memory = CrossBatchMemory.from_ratio(args.ratio, num_items=len(train_x), dim=32)
    # L = L(batch, batch) + weight * L(batch, memory)
    objective = XBMObjective(ContrastiveLoss(margin=0.5), weight=1.0)
    batches = iter(PKSampler(train_y.numpy(), batch_size=16, images_per_class=4, seed=0))

    results = {"before": recall_at_1(model, test_x, test_y)}
    print(f"test R@1 before training: {results['before']:.4f}")
    for step in range(1, args.steps + 1):
        indices = torch.as_tensor(next(batches))  # dataset indices of the batch's 16 images
        x = train_x[indices] + 0.3 * torch.randn(
            len(indices), 64
        )  # an augmentation: fresh noise per draw
        labels = train_y[indices]
        emb = F.normalize(model(x), dim=1)
        use_memory = step > warmup
        if use_memory:
            # Algorithm 1: the batch joins the memory first (detached), then
            # is compared with all of it.
            memory.enqueue(emb.detach(), labels, indices, step)
        out = objective(emb, labels, indices, memory if use_memory else None)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        if step == warmup:
            results["warmup"] = recall_at_1(model, test_x, test_y)
            print(f"test R@1 after the {warmup}-step warm-up: {results['warmup']:.4f}")
        if step % 100 == 0 or step == args.steps:
            loss, batch, mem = (out[k].item() for k in ("loss", "loss_batch", "loss_memory"))
            print(
                f"step {step}: loss {loss:.4f} (batch {batch:.4f}, memory {mem:.4f} over "
                f"{int(out['mem_neg_pairs'])} negative pairs), memory {memory.fill_level:.0%} full"
            )
    results["end"] = recall_at_1(model, test_x, test_y)
    print(f"test R@1 after {args.steps} steps: {results['end']:.4f}")
    return results


if __name__ == "__main__":
    main()
