"""Loss-step benchmark: the XBM contrastive objective against a full memory, its matmul floor, and pml.

    python -m bench.loss_step                       # CPU, B=64, K=59,551 (SOP's train set), D=512
    python -m bench.loss_step --device cuda         # bfloat16 autocast on a GPU (--device auto: cuda if any)
    python -m bench.loss_step --iters 30 --threads 2
    python -m bench.loss_step --reduction mean_per_kind   # the positives and negatives averaged apart

One step = enqueue + XBMObjective(ContrastiveLoss) forward (batch + memory) + backward. The floor is the two
B x K x D matrix products no implementation can avoid: sim = emb @ memory^T forward and
grad_emb = dL/dsim @ memory backward (the memory needs no gradient), timed in both layouts (B x K and
K x B); the faster counts. The peer is pytorch-metric-learning's
CrossBatchMemory(ContrastiveLoss(pos_margin=1, neg_margin=0.5)) with DotProductSimilarity (the same loss on
L2-normalised embeddings, and pml's fastest distance for it), pre-filled to K, whose forward also enqueues.
The three are timed round-robin in one run, so background load hits them alike; medians are reported.
On CPU the same figures are also given in process CPU time ("cpu_time"), which time slices lost to other
processes do not inflate: the cross-check to read on a busy machine. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from xbmcore.losses import ContrastiveLoss, XBMObjective
from xbmcore.memory import CrossBatchMemory


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64, help="B (default 64: 16 classes x 4 images)")
    p.add_argument("--memory", type=int, default=59_551, help="K (default 59,551: the SOP train set)")
    p.add_argument("--dim", type=int, default=512, help="D (default 512)")
    p.add_argument("--classes", type=int, default=11_318, help="label range (default: SOP's train classes)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"], help="auto: cuda if available")
    p.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run every step under bfloat16 autocast (default: on for cuda, off for cpu)",
    )
    p.add_argument("--memory-dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--reduction", choices=["mean_active", "mean_per_kind"], default="mean_active",
                   help="the loss's reduction (mean_per_kind sums the positives' terms apart: one more B x K pass)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    p.add_argument("--iters", type=int, default=20, help="timed rounds; medians reported (default 20)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-pml", action="store_true", help="skip pytorch-metric-learning")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def make_inputs(a: argparse.Namespace, device: torch.device) -> dict[str, torch.Tensor]:
    """A PK batch and a memory of class-structured unit vectors (positives near, negatives spread)."""
    g = torch.Generator().manual_seed(a.seed)
    per_class = 4
    centers = torch.randn(a.classes, a.dim, generator=g)
    labels = torch.randperm(a.classes, generator=g)[: a.batch // per_class].repeat_interleave(per_class)
    mem_labels = torch.randint(0, a.classes, (a.memory,), generator=g)

    def embed(y: torch.Tensor) -> torch.Tensor:
        return F.normalize(centers[y] + torch.randn(len(y), a.dim, generator=g), dim=1)

    return {
        "emb": embed(labels).to(device),
        "labels": labels.to(device),
        "indices": torch.randperm(a.memory, generator=g)[: a.batch].to(device),  # images also in memory
        "mem": embed(mem_labels).to(device),
        "mem_labels": mem_labels.to(device),
        "mem_indices": torch.arange(a.memory).to(device),
    }


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    use_amp = device.type == "cuda" if a.bf16 is None else a.bf16
    x = make_inputs(a, device)
    B, K = a.batch, a.memory

    memory = CrossBatchMemory(K, a.dim, num_items=K, dtype=getattr(torch, a.memory_dtype), device=device)
    memory.enqueue(x["mem"], x["mem_labels"], x["mem_indices"], step=0)
    objective = XBMObjective(ContrastiveLoss(margin=0.5, reduction=a.reduction), weight=1.0)
    emb = x["emb"].clone().requires_grad_()
    step = [0]

    def ours() -> None:
        step[0] += 1
        emb.grad = None
        memory.enqueue(emb.detach(), x["labels"], x["indices"], step[0])  # first, as Algorithm 1 (and pml)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            out = objective(emb, x["labels"], x["indices"], memory)
        out["loss"].backward()

    mem_feats = memory.get()[0]
    if not use_amp:  # without autocast a bfloat16 memory is upcast by the loss; the floor gets it upcast for free
        mem_feats = mem_feats.to(emb.dtype)
    dsim = torch.randn(B, K, device=device)  # B x K
    dsim_t = dsim.T.contiguous()  # K x B

    def floor_bk() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            emb @ mem_feats.T  # forward: sim, B x K
            dsim @ mem_feats  # backward: grad wrt emb, B x D

    def floor_kb() -> None:  # the same two products in K-major layout (what the losses use)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            mem_feats @ emb.T  # forward: sim^T, K x B
            mem_feats.T @ dsim_t  # backward: grad wrt emb^T, D x B

    steps: dict[str, Callable[[], None]] = {"floor_bk": floor_bk, "floor_kb": floor_kb, "ours": ours}
    if not a.no_pml:
        steps["pml"] = make_pml_step(a, x, device, use_amp)

    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(a.warmup + a.iters):
        for name, fn in steps.items():  # round-robin: background load hits all alike
            dt_wall, dt_cpu = timed(fn, device)
            if i >= a.warmup:
                wall[name].append(dt_wall)
                cpu[name].append(dt_cpu)
    ms = medians(wall)
    result = {
        "B": B,
        "K": K,
        "D": a.dim,
        "device": str(device),
        "autocast_bf16": use_amp,
        "memory_dtype": a.memory_dtype,
        "reduction": a.reduction,
        **summary(ms),
        "cpu_time": None if device.type == "cuda" else summary(medians(cpu)),
        "warmup": a.warmup,
        "iters": a.iters,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if "pml" in ms:
        import pytorch_metric_learning

        result["pml_version"] = pytorch_metric_learning.__version__
    print(json.dumps(result))
    return result


def make_pml_step(
    a: argparse.Namespace, x: dict[str, torch.Tensor], device: torch.device, use_amp: bool
) -> Callable[[], None]:
    from pytorch_metric_learning import distances, losses

    pml = losses.CrossBatchMemory(
        losses.ContrastiveLoss(pos_margin=1, neg_margin=0.5, distance=distances.DotProductSimilarity()),
        embedding_size=a.dim,
        memory_size=a.memory,
    ).to(device)
    with torch.no_grad():  # pre-filled to K, like ours
        pml.embedding_memory.copy_(x["mem"])
        pml.label_memory.copy_(x["mem_labels"])
    pml.has_been_filled, pml.queue_idx = True, 0
    emb = x["emb"].clone().requires_grad_()

    def step() -> None:
        emb.grad = None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = pml(emb, x["labels"])
        loss.backward()

    return step


def medians(seconds: dict[str, list[float]]) -> dict[str, float]:
    """Median ms per step; the floor is the faster of the two layouts of the same products."""
    ms = {name: statistics.median(v) * 1e3 for name, v in seconds.items()}
    ms["floor"] = min(ms.pop("floor_bk"), ms.pop("floor_kb"))
    return ms


def summary(ms: dict[str, float]) -> dict[str, float | None]:
    return {
        "ms_per_step": round(ms["ours"], 2),
        "floor_ms": round(ms["floor"], 2),
        "ratio": round(ms["ours"] / ms["floor"], 3),
        "pml_ms": round(ms["pml"], 2) if "pml" in ms else None,
        "speedup_vs_pml": round(ms["pml"] / ms["ours"], 2) if "pml" in ms else None,
    }


def timed(fn: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - w0, time.process_time() - c0


if __name__ == "__main__":
    main()
