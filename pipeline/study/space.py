"""The search space: which params key each `tune.space` range drives, and a trial's params.

Optuna parameters are named after the params keys ("memory.ratio"), so the dashboard, the importances and the
best-params file all speak the schema's language and the best trial becomes `dvc exp run -S` arguments as is.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import optuna

from xbmcore.config import Params, validate_params

# The learning rate of the XBM phase. The warm-up is shared by all trials, so only this phase's rate is tuned.
LR_KEY = "train.lr"


class Dim(NamedTuple):
    space_field: str                      # field of TuneSpace
    key: str                              # dotted params key
    log: bool
    active: Callable[[Params], bool]      # e.g. the margin of the loss in use only


def _loss(name: str) -> Callable[[Params], bool]:
    return lambda p: p.loss.name == name


DIMS = (
    Dim("memory_ratio", "memory.ratio", True, lambda p: True),
    Dim("memory_weight", "memory.weight", True, lambda p: True),
    Dim("lr", LR_KEY, True, lambda p: True),
    Dim("margin", "loss.margin", False, _loss("contrastive")),
    Dim("triplet_margin", "loss.triplet_margin", False, _loss("triplet")),
    Dim("ms_alpha", "loss.ms_alpha", False, _loss("multi_similarity")),
    Dim("ms_beta", "loss.ms_beta", False, _loss("multi_similarity")),
    Dim("ms_base", "loss.ms_base", False, _loss("multi_similarity")),
)


def active_dims(params: Params) -> list[tuple[Dim, tuple[float, float]]]:
    """The dimensions this study samples, with their ranges; checks that tuning them makes sense."""
    dims = [(d, getattr(params.tune.space, d.space_field)) for d in DIMS if d.active(params)]
    dims = [(d, r) for d, r in dims if r is not None]
    keys = {d.key for d, _ in dims}
    if keys & {"memory.ratio", "memory.weight"} and not params.memory.enabled:
        raise ValueError("tune.space: memory.ratio/memory.weight are tuned but memory.enabled is false; "
                         "enable the memory or set tune.space.memory_ratio and memory_weight to null")
    if "memory.ratio" in keys and params.memory.size is not None:
        raise ValueError(f"tune.space.memory_ratio: memory.size ({params.memory.size}) overrides the ratio; "
                         "set memory.size to null or tune.space.memory_ratio to null")
    if not dims:
        raise ValueError("tune.space: every range is null for this loss, nothing to tune")
    return dims


def describe(params: Params) -> dict[str, str]:
    """The search space in words, one entry per sampled key: what a study records and compares on reuse."""
    return {d.key: f"[{lo:g}, {hi:g}]{' log' if d.log else ''}" for d, (lo, hi) in active_dims(params)}


def differences(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """What changed between two described spaces, one phrase per key."""
    return [f"{k}: {old.get(k, 'not searched')} -> {new.get(k, 'not searched')}"
            for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]


def suggest(trial: optuna.Trial, params: Params) -> dict[str, float]:
    return {d.key: trial.suggest_float(d.key, lo, hi, log=d.log) for d, (lo, hi) in active_dims(params)}


def eval_every(params: Params, xbm_steps: int) -> int:
    """Periodic validation is what the pruner judges, so a trial always has some."""
    if params.tune.eval_every is not None:
        return params.tune.eval_every
    if params.train.eval_every > 0:
        return params.train.eval_every
    return max(1, xbm_steps // 5)


def trial_params(params: Params, values: dict[str, Any]) -> Params:
    """The study's params with the sampled values and the trial's step budget; validated like params.yaml."""
    raw = params.model_dump(mode="json")
    xbm_steps = params.tune.xbm_steps or params.train.xbm_steps
    raw["train"]["xbm_steps"] = xbm_steps
    raw["train"]["eval_every"] = eval_every(params, xbm_steps)
    for key, value in values.items():
        section, name = key.split(".")
        raw[section][name] = value
    return validate_params(raw, "trial params")


def memory_on_step(params: Params) -> int:
    """Global step at which the memory term switches on (steps count on from the warm-up); with an auto warm-up
    its upper bound, so that no trial is judged before its memory is on."""
    return params.train.warmup_budget


def warmup_keys(params: Params, values: dict[str, Any]) -> dict[str, Any]:
    """The tuned keys the pipeline's warm-up also depends on, with the value the study's shared warm-up used.

    `dvc exp run -S` with such a key trains the warm-up with the tuned value too, which the trial did not.
    """
    from xbmcore.checkpoint import training_digest  # torch: only when a report is written

    base = training_digest(params, "warmup")
    flat = params.flat()
    return {k: flat[k] for k, v in sorted(values.items())
            if training_digest(trial_params(params, {k: v}), "warmup") != base}
