"""torch.distributed for XBM: one process per device (torchrun), gathers in rank order, rank 0 writes.

Every rank must hold the same memory, so every cross-rank concatenation here is in rank order (rank 0's rows
first), the order one process would have seen the global batch in. (pytorch-metric-learning's wrapper puts each
rank's own rows first, so its ranks enqueue in different orders and their memories diverge.)

`Dist()` outside torchrun is the single-process case: every collective is the identity and the trainer takes its
plain path. Inside torchrun the collectives run even with one process (the DDP path, whose cost bench/ddp.py
measures against the plain one).
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def launched_by_torchrun() -> bool:
    """Whether this process was started by torchrun (its environment variables are set).

    Returns:
        True inside a torchrun job, before or after the process group is joined.
    """
    return "TORCHELASTIC_RUN_ID" in os.environ or ("WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ)


def world_size() -> int:
    """Processes in the job: the process group's size, or what torchrun announces before it is joined.

    Returns:
        The number of ranks; 1 outside torchrun.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1")) if launched_by_torchrun() else 1


def init_process_group(device: torch.device) -> None:
    """Join the job torchrun started (no-op outside torchrun): NCCL on GPUs, gloo on the CPU.

    Args:
        device: the training device; on a GPU, this rank's GPU (LOCAL_RANK) becomes the current one.
    """
    if dist.is_initialized() or not launched_by_torchrun():
        return
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    # A rank that died is noticed by torchrun, which ends the others; the timeout only bounds a hang.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=10))


class _GatherRankOrder(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's rows (an all_reduce, which gloo has;
    torch.distributed.nn's all_gather needs a reduce_scatter or all_to_all there)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        ctx.rows, ctx.rank = x.shape[0], rank
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # d(sum of all ranks' losses) / d(global batch)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


class Dist:
    """The job's ranks as seen from one of them; inactive (world 1) when torch.distributed is not initialised.

    Every collective is the identity when inactive. Collectives must be called by every rank, in the same order.

    Attributes:
        active (bool): whether a process group is initialised.
        world (int): the number of ranks (1 when inactive).
        rank (int): this process's rank (0 when inactive).
        is_main (bool): rank 0, the one that writes checkpoints and events.
    """

    def __init__(self) -> None:
        self.active = dist.is_available() and dist.is_initialized()
        self.world = dist.get_world_size() if self.active else 1
        self.rank = dist.get_rank() if self.active else 0
        self.is_main = self.rank == 0

    def gather(self, x: Tensor, differentiable: bool = False) -> Tensor:
        """Concatenation of every rank's `x` (same shape on all ranks) along dim 0, in rank order.

        Args:
            x: this rank's tensor.
            differentiable: keep the autograd graph: the backward pass sums every rank's gradient for this
                rank's rows (an all_reduce).

        Returns:
            world x rows of `x`, rank 0's first; `x` itself when inactive.
        """
        if not self.active:
            return x
        if differentiable:
            return _GatherRankOrder.apply(x)
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def gather_rows(self, x: Tensor) -> Tensor:
        """Like gather, for row counts that differ between ranks (a shard of a split).

        Args:
            x: this rank's rows (the other dimensions equal on all ranks).

        Returns:
            Every rank's rows, concatenated in rank order (not differentiable).
        """
        if not self.active:
            return x
        n = torch.tensor([x.shape[0]], device=x.device)
        counts = self.gather(n).tolist()
        pad = x.new_zeros((max(counts), *x.shape[1:]))
        pad[: x.shape[0]] = x
        rows = self.gather(pad).split(max(counts))
        return torch.cat([r[:c] for r, c in zip(rows, counts)])

    def sum(self, x: Tensor) -> Tensor:
        """Sum over ranks (a new tensor; no host sync).

        Args:
            x: this rank's tensor (same shape on all ranks).

        Returns:
            The elementwise sum over ranks; `x` itself when inactive.
        """
        if not self.active:
            return x
        x = x.clone()
        dist.all_reduce(x)
        return x

    def objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (picklable), in rank order.

        Args:
            obj: any picklable object.

        Returns:
            A list of world objects, rank 0's first.
        """
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank.

        Args:
            obj: rank 0's object (picklable); the other ranks' is ignored.

        Returns:
            Rank 0's object.
        """
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def shard(self, n: int) -> slice:
        """This rank's contiguous part of range(n): gathered in rank order, the parts give range(n) back.

        Args:
            n: the number of items to share out.

        Returns:
            The slice of this rank's items (sizes differ by at most one between ranks).
        """
        bounds = [n * r // self.world for r in range(self.world + 1)]
        return slice(bounds[self.rank], bounds[self.rank + 1])
