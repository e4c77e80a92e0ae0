"""`make check-repro`: does this machine reproduce the committed results byte for byte?

    python -m pipeline.check_repro                        # the whole pipeline in a temporary clone of HEAD
    python -m pipeline.check_repro --until pretrain       # the stages up to pretrain only (minutes)
    python -m pipeline.check_repro -S train.portable=false   # the same with the CPU's own kernels

It clones the project's last commit into a temporary folder, runs `dvc repro` there with this environment, and
compares what each stage wrote with what the committed dvc.lock records (the md5 of every out, stage by stage in
pipeline order), then the committed metrics.json and plots with the clone's, byte for byte. It prints one line
per output and names the stage where the bytes first part (everything after it differs because of it). Exit
status 0: all equal; 1: something differs; 2: the pipeline failed or the project is not a git repository.

Uncommitted changes are not in the clone: the check is of the committed state.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from pipeline.cli import add_params_arguments
from xbmcore import portable
from xbmcore.config import load_params

ROOT = Path(__file__).resolve().parents[1]
# Files the evaluate and train_xbm stages write into the project and git keeps (not DVC-cached).
TRACKED_OUTPUTS = ("metrics.json", "plots/train.csv", "plots/val.csv", "plots/drift.csv", "plots/retrieval.png")


def stage_order(dvc_yaml: Path) -> list[str]:
    return list(yaml.safe_load(dvc_yaml.read_text())["stages"])


def lock_outs(lock: dict) -> dict[str, dict[str, str]]:
    """{stage: {out path: md5}} of a dvc.lock."""
    return {stage: {o["path"]: o.get("md5", "") for o in entry.get("outs", [])}
            for stage, entry in lock.get("stages", {}).items()}


def compare_locks(order: list[str], committed: dict, fresh: dict, ran: list[str]) -> tuple[list[dict], str | None]:
    """One row per out of the stages that ran, and the first stage (in pipeline order) whose outs differ."""
    want, got = lock_outs(committed), lock_outs(fresh)
    rows, first = [], None
    for stage in order:
        if stage not in ran:
            continue
        for path, md5 in want.get(stage, {}).items():
            mine = got.get(stage, {}).get(path)
            same = mine == md5
            rows.append({"stage": stage, "output": path, "committed": md5, "here": mine, "same": same})
            if not same and first is None:
                first = stage
    return rows, first


def metric_differences(committed: dict, fresh: dict, prefix: str = "") -> list[str]:
    """`key: committed -> here` for every number of metrics.json that differs."""
    out = []
    for key in sorted(set(committed) | set(fresh)):
        a, b = committed.get(key), fresh.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += metric_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} committed, {b!r} here")
    return out


def _set(raw: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    node = raw
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value


def apply_overrides(params_file: Path, overrides: list[str]) -> None:
    """`-S key=value` written into the clone's params.yaml (values parsed as YAML, as DVC does), then validated."""
    if not overrides:
        return
    raw = yaml.safe_load(params_file.read_text())
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"-S {item}: expected KEY=VALUE")
        _set(raw, key.strip(), yaml.safe_load(value))
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    load_params(params_file)  # a bad key or value stops here, named


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout


def run_check(root: Path, work: Path, until: str | None, overrides: list[str], log=print) -> int:
    """Clone `root`'s HEAD into `work`/clone, run the pipeline there, compare; returns the exit status."""
    dirty = git(root, "status", "--porcelain", "--untracked-files=no").strip()
    if dirty:
        log("note: uncommitted changes are not in the clone; the check is of the last commit")
    clone = work / "clone"
    git(root, "clone", "--quiet", str(root), str(clone))
    commit = git(clone, "rev-parse", "--short", "HEAD").strip()
    committed_lock = yaml.safe_load((clone / "dvc.lock").read_text()) if (clone / "dvc.lock").is_file() else {}
    committed_files = {f: (clone / f).read_bytes() for f in TRACKED_OUTPUTS if (clone / f).is_file()}
    apply_overrides(clone / "params.yaml", overrides)
    order = stage_order(clone / "dvc.yaml")
    if until is not None and until not in order:
        raise ValueError(f"--until {until}: expected one of the stages {', '.join(order)}")
    ran = order[: order.index(until) + 1] if until else order
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    for var in ("MLFLOW_TRACKING_URI", "XBM_MLFLOW_RUN_ID", "XBM_MLFLOW_PARENT_RUN_ID"):
        env.pop(var, None)  # the clone's own store: nothing lands in the user's
    log(f"running the pipeline of {commit}{' up to ' + until if until else ''} in {clone}"
        f"{' with ' + ' '.join(overrides) if overrides else ''} ...")
    with open(work / "repro.log", "w") as out:
        rc = subprocess.call([sys.executable, "-m", "dvc", "repro", *([until] if until else [])], cwd=clone,
                             env=env, stdout=out, stderr=subprocess.STDOUT)
    if rc:
        tail = (work / "repro.log").read_text()[-3000:]
        log(f"dvc repro failed (exit {rc}); its output ends with:\n{tail}")
        return 2
    fresh_lock = yaml.safe_load((clone / "dvc.lock").read_text())
    rows, first = compare_locks(order, committed_lock, fresh_lock, ran)
    width = max([len(r["output"]) for r in rows] + [len("metrics.json")])
    for r in rows:
        log(f"{r['stage']:<12} {r['output']:<{width}}  {'same' if r['same'] else 'DIFFERS'}  "
            f"(committed {r['committed'][:12] or '-'}, here {(r['here'] or '-')[:12]})")
    differs = first is not None
    if until is None:
        for name, data in committed_files.items():
            here = (clone / name).read_bytes() if (clone / name).is_file() else None
            same = here == data
            differs |= not same
            log(f"{'':<12} {name:<{width}}  {'same' if same else 'DIFFERS'}")
            if name == "metrics.json" and not same and here is not None:
                for line in metric_differences(json.loads(data), json.loads(here)):
                    log(f"{'':<14}{line}")
    if not differs:
        log(f"reproduced: every output of {', '.join(ran)} is byte for byte the committed one")
        return 0
    if first is not None:
        log(f"the bytes first part at the {first} stage; the stages after it differ because of it")
    params = load_params(clone / "params.yaml")
    if not params.train.portable:
        log("train.portable is off: each library ran this CPU's own kernels")
    elif why := portable.unsupported():
        log(f"this machine cannot run the portable kernels ({why}): its results are not expected to match")
    return 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.check_repro", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--until", metavar="STAGE", help="run and compare the stages up to this one only")
    ap.add_argument("--keep", action="store_true", help="keep the temporary clone (its path is printed)")
    add_params_arguments(ap, example=", e.g. -S train.portable=false")
    args = ap.parse_args(argv)
    root = Path(args.params).resolve().parent
    if not (root / ".git").exists():
        print(f"{root} is not a git repository: the check clones the last commit", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="xbm-check-repro-"))
    try:
        return run_check(root, work, args.until, args.overrides)
    except (ValueError, subprocess.CalledProcessError) as err:
        print(f"check-repro: {err}", file=sys.stderr)
        return 2
    finally:
        if args.keep:
            print(f"the clone is kept in {work / 'clone'}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
