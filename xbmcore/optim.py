"""The optimiser (`train.optimizer`) and the lr schedule of the phases (`train.lr_schedule`)."""
from __future__ import annotations

import math

import torch

from xbmcore.config import TrainParams


def build_optimizer(t: TrainParams, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimiser of the model's trainable parameters, at the warm-up's lr (each phase then sets its own).

    Args:
        t: the `train` section: `optimizer` (adam, adamw, or sgd with Nesterov momentum 0.9), `warmup_lr` and
            `weight_decay`.
        model: the model; its parameters with ``requires_grad`` are optimised.

    Returns:
        The torch optimiser.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.warmup_lr, weight_decay=t.weight_decay)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.warmup_lr, weight_decay=t.weight_decay)
    return torch.optim.SGD(params, lr=t.warmup_lr, momentum=0.9, weight_decay=t.weight_decay, nesterov=True)


def lr_factor(t: TrainParams, step: int, warmup_end: int | None) -> float:
    """What multiplies the phase's lr at global `step`: 1 through the warm-up; with `cosine`, a decay to 0 over
    the XBM phase only, counted from where the warm-up ended (its planned budget until it has), so the warm-up
    (and its cached output) does not depend on how long the XBM phase is.

    Args:
        t: the `train` section: `lr_schedule`, `xbm_steps` and the warm-up's budget.
        step: the global optimiser step.
        warmup_end: the step the warm-up ended at; None before it has (its planned budget is used).

    Returns:
        The factor in [0, 1]: 1 for ``constant`` and through the warm-up, then ``(1 + cos(pi * progress)) / 2``.
    """
    start = t.warmup_budget if warmup_end is None else warmup_end
    if t.lr_schedule == "constant" or step < start:
        return 1.0
    progress = min(1.0, (step - start) / t.xbm_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))
