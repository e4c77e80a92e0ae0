"""Pretraining as a classifier: the start the warm-up continues from, as metric-learning papers start from an
ImageNet classifier (the XBM paper's premise: features that drift slowly almost at once).

The loss is a normalised softmax (NormSoftmax; Zhai & Wu, BMVC 2019): one learned proxy per class, logits =
cos(embedding, proxy) / temperature, cross-entropy. It trains the same network the warm-up trains (backbone,
pooling, head, unit-norm embedding), so what it passes on is an embedding, not only features. The classes are
the dataset's `pretrain` split, disjoint from train, val and test.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

from xbmcore.config import PretrainParams
from xbmcore.data.batch import collate_for, to_device

# The key of the file the pretrain stage writes when the dataset has no pretrain split (its value says so).
SKIPPED = "pretrain_skipped"


class NormSoftmax(nn.Module):
    """Cross-entropy over cos(embedding, proxy_c) / temperature, one proxy per class (unit-normalised on use).

    Args:
        dim: D, the embedding's dimension.
        num_classes: C, the classes (>= 2); one learned proxy each.
        temperature: the divisor of the cosine logits (smaller: sharper softmax).

    Raises:
        ValueError: fewer than 2 classes.

    Attributes:
        proxies (nn.Parameter): C x D, the class proxies (not normalised; normalised on use).
        temperature (float): the logits' divisor.
    """

    def __init__(self, dim: int, num_classes: int, temperature: float):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"NormSoftmax: expected at least 2 classes, got {num_classes}")
        self.proxies = nn.Parameter(torch.randn(num_classes, dim) / math.sqrt(dim))
        self.temperature = temperature

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, accuracy) of unit-norm embeddings B x D with labels in 0..C-1.

        Args:
            emb: B x D unit-norm embeddings.
            labels: B int64 class labels in ``[0, C)``.

        Returns:
            ``(loss, accuracy)``: the mean cross-entropy (differentiable) and the fraction of B whose nearest
                proxy is their own class.
        """
        logits = emb @ F.normalize(self.proxies, dim=1).T / self.temperature
        return F.cross_entropy(logits, labels), (logits.argmax(1) == labels).to(logits.dtype).mean()


def pretrain(model: nn.Module, dataset: Dataset, p: PretrainParams, device: torch.device,
             on_log: Callable[[int, dict[str, float]], None] | None = None, log_every: int = 50) -> list[dict]:
    """Train `model` (an EmbeddingNet) in place for p.steps steps of p.batch_size random images of `dataset`
    (augmented; labels contiguous), Adam with a cosine decay of the lr to 0. The images come in epochs of a seeded
    permutation (p.seed). Every `log_every` steps the mean loss and accuracy since the last log go to
    `on_log(step, metrics)` and to the returned history.

    Args:
        model: the EmbeddingNet to train (its `embedding_dim` sizes the proxies); moved to `device`.
        dataset: the pretrain split: items ``(image, label, index)`` with labels in ``[0, num_classes)`` and a
            `num_classes` attribute (an ImageDataset with augmentation).
        p: the `pretrain` section: steps, batch_size, lr, weight_decay, temperature, seed.
        device: where training runs.
        on_log: called as ``on_log(step, {"loss", "accuracy", "lr"})`` every `log_every` steps and at the end.
        log_every: steps between logs.

    Returns:
        The logs: ``[{"step", "loss", "accuracy", "lr"}, ...]``.

    Raises:
        ValueError: a batch larger than the split, or a loss that is not finite (lower pretrain.lr).
    """
    head = NormSoftmax(model.embedding_dim, dataset.num_classes, p.temperature).to(device)
    model.to(device).train()
    opt = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=p.lr, weight_decay=p.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, p.steps) / p.steps)))
    gen = torch.Generator().manual_seed(p.seed)
    batches = BatchSampler(RandomSampler(dataset, replacement=False, generator=gen), p.batch_size, drop_last=True)
    if len(batches) == 0:
        raise ValueError(f"pretrain.batch_size ({p.batch_size}) exceeds the pretrain split ({len(dataset)} images)")
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate_for(device), num_workers=0)
    history, sums, step = [], torch.zeros(2, dtype=torch.float64, device=device), 0
    while step < p.steps:
        for batch in loader:
            imgs, labels, _ = to_device(batch, device)
            loss, acc = head(model(imgs), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            sums += torch.stack([loss.detach(), acc]).double()
            if step % log_every == 0 or step == p.steps:
                n = log_every if step % log_every == 0 else step % log_every
                loss_mean, acc_mean = (sums / n).tolist()  # one read per log
                if not math.isfinite(loss_mean):
                    raise ValueError(f"pretrain: the loss is {loss_mean} at step {step}; lower pretrain.lr "
                                     f"(now {p.lr:g})")
                rec = {"step": step, "loss": loss_mean, "accuracy": acc_mean, "lr": opt.param_groups[0]["lr"]}
                history.append(rec)
                if on_log is not None:
                    on_log(step, {k: v for k, v in rec.items() if k != "step"})
                sums.zero_()
            if step == p.steps:
                break
    return history
