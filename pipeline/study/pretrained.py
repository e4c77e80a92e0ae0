"""The study's pretrained weights: made when `model.pretrained` is the pretrain stage's out and it is missing.

A fresh clone has no artifacts/pretrain/model.pt (a DVC out, not in git). The study makes it the way `dvc repro
pretrain` would, once for all workers on the host (the caller holds a file lock):

1. from the DVC cache (`dvc checkout`), when dvc.lock records the pretrain stage's out, `dvc status pretrain` finds
   nothing else changed (code, data, params.yaml) and the params the study runs with (its `-S` overrides
   included) are those dvc.lock recorded: the bytes `dvc repro pretrain` wrote;
2. else by the pretrain stage's own function, `stages.run_pretrain`, with the study's params: the same bytes as
   `dvc repro pretrain` with those params (`python -m pipeline.tune` enters portable mode like the stages do).
   When they are the bytes dvc.lock records, they go into the DVC cache too (`dvc commit pretrain`, dvc.lock
   unchanged), as after `dvc repro pretrain`: `dvc status` stays clean and `dvc repro` does not run it again.

Any other missing `model.pretrained` file is the stages' error (resolve_pretrained): the study cannot make it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from xbmcore.backbones import resolve_input
from xbmcore.config import Params, validate_params
from pipeline import stages

log = logging.getLogger(__name__)

PRETRAIN_OUT = "artifacts/pretrain/model.pt"  # the pretrain stage's out in dvc.yaml, relative to the root
# What the default pretrain (2,000 steps of 64 images, 32 px, smallcnn) took on 2 shared CPU cores (AMD EPYC): 286 s
# in a study on a fresh clone, 156 to 373 s as a `dvc repro` stage (runs/*/events.jsonl).
DEFAULT_MINUTES, DEFAULT_STEPS = 5, 2000


def pretrain_out(root: Path) -> Path:
    return stages.stage_dir(Path(root), "pretrain") / "model.pt"


def made_by_pretrain(params: Params, root: Path) -> bool:
    """Whether model.pretrained is the pretrain stage's out (relative to the root, or the same absolute path)."""
    m = params.model.pretrained
    if m in ("none", "imagenet"):
        return False
    return Path(os.path.abspath(Path(root) / m)) == Path(os.path.abspath(pretrain_out(root)))


def check_pretrained(params: Params, root: Path) -> None:
    """ValueError naming model.pretrained when it is a missing file the study cannot make (any file but the
    pretrain stage's out); nothing for none, imagenet, an existing file or the pretrain stage's out."""
    if not made_by_pretrain(params, root):
        stages.resolve_pretrained(params, root)


def ensure_pretrained(params: Params, root: Path, run: Callable[[], Any] | None = None) -> str:
    """Make the pretrain stage's out if model.pretrained needs it and it is missing (call under a file lock).

    run: how to run the pretrain stage (default: stages.run_pretrain(params, root)); the study passes one that
    logs into a nested MLflow run. Returns "present" (nothing to do), "dvc" (checked out) or "pretrain" (ran).
    """
    root = Path(root).resolve()
    out = pretrain_out(root)
    if not made_by_pretrain(params, root) or out.is_file():
        return "present"
    md5 = checkout_from_dvc_cache(params, root)
    if md5 is not None:
        print(f"model.pretrained: {PRETRAIN_OUT} was missing; checked out from the DVC cache (md5 {md5[:8]}, "
              "the out dvc.lock records for these params)", flush=True)
        return "dvc"
    pp = params.pretrain
    took = f"about {DEFAULT_MINUTES} minutes on 2 CPU cores"
    took = took if pp.steps == DEFAULT_STEPS else f"the default {DEFAULT_STEPS:,} take {took}"
    print(f"model.pretrained: {PRETRAIN_OUT} is missing; running the pretrain stage ({pp.steps:,} steps of "
          f"{pp.batch_size} images: {took}), once for all workers ...", flush=True)
    t0 = time.time()
    with _threads_kept():
        if run is None:
            stages.run_pretrain(params, root)
        else:
            run()
    cached = " (and in the DVC cache, as dvc.lock records it)" if commit_to_dvc_cache(params, root) else ""
    print(f"pretrain stage done in {time.time() - t0:.0f} s: {out}{cached}", flush=True)
    return "pretrain"


@contextmanager
def _threads_kept() -> Iterator[None]:
    """The pretrain stage sets pretrain.num_threads for torch and the BLAS libraries, for the rest of the process:
    the study's warm-up and trials then run with the threads they had, as after `dvc repro pretrain`."""
    import torch
    from threadpoolctl import threadpool_limits

    n = torch.get_num_threads()
    with threadpool_limits(limits=None):  # restores the loaded libraries' limits on exit
        try:
            yield
        finally:
            torch.set_num_threads(n)


# ---- DVC ----

def _dvc(root: Path, *args: str) -> subprocess.CompletedProcess | None:
    """`dvc <args>` in the root (this interpreter's DVC); None, with the reason logged, when it fails."""
    cmd = [sys.executable, "-m", "dvc", *args]
    try:
        done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    except (OSError, subprocess.TimeoutExpired) as err:
        log.info("dvc %s: %s", " ".join(args), err)
        return None
    if done.returncode != 0:
        said = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        log.info("dvc %s failed (%d): %s", " ".join(args), done.returncode, " ".join(said[:3])[:500])
        return None
    return done


def _lookup(d: Any, dotted: str) -> Any:
    for name in dotted.split("."):
        if not isinstance(d, dict) or name not in d:
            return KeyError  # a sentinel no params value equals
        d = d[name]
    return d


def same_params(recorded: dict[str, Any], params: Params, root: Path | None = None) -> bool:
    """Whether `params` hold the values dvc.lock recorded for a stage (its `params:` mapping, params.yaml only).

    The recorded keys (a section or a dotted key) are compared after validation, so a key that params.yaml left
    to its default compares as that default, and with `auto` data keys resolved on both sides (dvc.lock records
    `auto`, the study runs with what it means for the model)."""
    if set(recorded) != {"params.yaml"} or not isinstance(recorded["params.yaml"], dict):
        return False
    values = recorded["params.yaml"]
    raw: dict[str, Any] = {}
    for key, value in values.items():
        *sections, name = key.split(".")
        d = raw
        for s in sections:
            d = d.setdefault(s, {})
        d[name] = value
    try:
        then = resolve_input(validate_params(raw, "dvc.lock"), root).model_dump(mode="json")
        now = resolve_input(params, root).model_dump(mode="json")
    except ValueError:
        return False
    return all(_lookup(now, k) is not KeyError and _lookup(then, k) == _lookup(now, k) for k in values)


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _locked_md5(params: Params, root: Path) -> str | None:
    """The md5 dvc.lock records for the pretrain stage's out, when the root is a DVC project whose dvc.lock has it
    and the stage's recorded params are these params; else None."""
    lock = root / "dvc.lock"
    if not lock.is_file() or not (root / ".dvc").is_dir():
        return None
    try:
        stage = ((yaml.safe_load(lock.read_text()) or {}).get("stages") or {}).get("pretrain") or {}
    except (OSError, yaml.YAMLError) as err:
        log.info("dvc.lock not read: %s", err)
        return None
    md5 = next((o.get("md5") for o in stage.get("outs") or [] if o.get("path") == PRETRAIN_OUT), None)
    if md5 and not same_params(stage.get("params") or {}, params, root):
        log.info("dvc.lock's pretrain stage ran with other params than the study's")
        return None
    return md5 or None


def _out_status(root: Path) -> str | None:
    """What `dvc status pretrain` says of the out ("deleted", "not in cache", ...) when nothing else changed
    (code, data, params.yaml); "" when nothing changed at all; None when something else did or DVC failed."""
    status = _dvc(root, "status", "pretrain", "--json")
    if status is None:
        return None
    try:
        changes = json.loads(status.stdout or "{}").get("pretrain", [])
    except (ValueError, AttributeError):
        return None
    if not changes:
        return ""
    # Only the out itself may differ; a changed dependency means `dvc repro` would train anew.
    if len(changes) != 1 or not isinstance(changes[0], dict) or set(changes[0]) != {"changed outs"} \
            or set(changes[0]["changed outs"]) != {PRETRAIN_OUT}:
        log.info("dvc status pretrain: %s", changes)
        return None
    return str(changes[0]["changed outs"][PRETRAIN_OUT])


def checkout_from_dvc_cache(params: Params, root: Path) -> str | None:
    """Check the pretrain stage's out out of the local DVC cache; its md5, or None when that is not the file
    `dvc repro pretrain` would write with these params (another params value, a changed dependency, no DVC
    project, no dvc.lock entry) or the cache lacks it."""
    md5 = _locked_md5(params, root)
    if md5 is None or _out_status(root) is None:
        return None
    if _dvc(root, "checkout", PRETRAIN_OUT) is None:  # e.g. not in the cache
        return None
    out = pretrain_out(root)
    if not out.is_file() or _md5(out) != md5:  # the pretrain stage overwrites it (atomically)
        log.warning("dvc checkout %s did not give md5 %s", PRETRAIN_OUT, md5)
        return None
    return md5


def commit_to_dvc_cache(params: Params, root: Path) -> bool:
    """After the pretrain stage ran in the study: put its out into the DVC cache (`dvc commit pretrain`), as
    `dvc repro pretrain` would have, when it is the very file dvc.lock records (so dvc.lock keeps its content);
    `dvc repro` would otherwise run the stage again for an out "not in cache". False when not done."""
    md5 = _locked_md5(params, root)
    if md5 is None or _md5(pretrain_out(root)) != md5:
        if md5 is not None:
            log.info("the pretrain stage wrote another file than dvc.lock records: not committed to the DVC cache")
        return False
    if _out_status(root) != "not in cache":
        return False
    return _dvc(root, "commit", "--force", "pretrain") is not None
