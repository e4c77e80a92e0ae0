"""The optimiser (`train.optimizer`) and the lr schedule of the phases (`train.lr_schedule`)."""
from __future__ import annotations

import math
from typing import Any

import torch

from xbmcore.config import TrainParams


def param_groups(t: TrainParams, model: torch.nn.Module) -> list[torch.nn.Parameter] | list[dict[str, Any]]:
    """The trainable parameters as the optimiser takes them: one list, or with `train.backbone_lr_scale` < 1 and a
    model with a `backbone`, two groups, the rest (the head) first at the phase's lr and the backbone's at the
    fraction `backbone_lr_scale` of it; each group carries its ``lr_scale`` (`Trainer.set_lr` reads it).

    Args:
        t: the `train` section.
        model: the model; its parameters with ``requires_grad`` are optimised.

    Returns:
        The parameters, or ``[{"params": ..., "lr_scale": 1.0}, {"params": ..., "lr_scale": scale}]``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    backbone = getattr(model, "backbone", None)
    if t.backbone_lr_scale == 1.0 or not isinstance(backbone, torch.nn.Module):
        return params
    own = {id(p) for p in backbone.parameters()}
    return [{"params": [p for p in params if id(p) not in own], "lr_scale": 1.0},
            {"params": [p for p in params if id(p) in own], "lr_scale": t.backbone_lr_scale,
             "lr": t.warmup_lr * t.backbone_lr_scale}]


def build_optimizer(t: TrainParams, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimiser of the model's trainable parameters, at the warm-up's lr (each phase then sets its own); the
    backbone's at `train.backbone_lr_scale` of it (`param_groups`).

    Args:
        t: the `train` section: `optimizer` (adam, adamw, or sgd with Nesterov momentum 0.9), `warmup_lr`,
            `weight_decay` and `backbone_lr_scale`.
        model: the model; its parameters with ``requires_grad`` are optimised.

    Returns:
        The torch optimiser.
    """
    params = param_groups(t, model)
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
