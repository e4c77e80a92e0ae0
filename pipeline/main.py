"""`make run`: run the DVC pipeline with the committed params.yaml, then print the Recall@K table.

    python -m pipeline.main            # dvc repro, then the table from metrics.json
    python -m pipeline.main --table    # only the table of the last run

The stages run in child processes started by DVC (`python -m pipeline.<stage>`); this interpreter's folder goes
first on their PATH so they use the same environment even when it is not activated.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from xbmcore.config import load_params

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = (("map@r", "MAP@R"), ("r_precision", "R-precision"), ("nmi", "NMI"))


def format_table(metrics: dict) -> str:
    """Markdown table: one row per split in metrics.json, Recall@K columns first."""
    rows = [(split, m) for split, m in metrics.items() if isinstance(m, dict)]
    ks = sorted({int(k.split("@")[1]) for _, m in rows for k in m if k.startswith("recall@")})
    cols = [(f"recall@{k}", f"R@{k}") for k in ks] + [c for c in COLUMNS if any(c[0] in m for _, m in rows)]
    lines = ["| split | " + " | ".join(h for _, h in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for split, m in rows:
        lines.append(f"| {split} | " + " | ".join(f"{m[k]:.4f}" if m.get(k) is not None else "-" for k, _ in cols)
                     + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.main", description=__doc__.split("\n\n")[0])
    ap.add_argument("--table", action="store_true", help="print the table of the last run without running")
    args = ap.parse_args(argv)
    params = load_params(ROOT / "params.yaml")  # fail here, before DVC starts, on a bad params file
    t0 = time.time()
    if not args.table:
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        rc = subprocess.call([sys.executable, "-m", "dvc", "repro"], cwd=ROOT, env=env)
        if rc:
            print(f"dvc repro failed (exit {rc}); the failing stage's error is above", file=sys.stderr)
            return rc
    path = ROOT / "metrics.json"
    if not path.is_file():
        print(f"{path} not found: run the pipeline first (python -m pipeline.main)", file=sys.stderr)
        return 1
    metrics = json.loads(path.read_text())
    kind = "XBM" if params.memory.enabled else "baseline (no memory)"
    print(f"\n{params.data.name}, {params.model.backbone}, {params.loss.name} loss, {kind}, "
          f"step {metrics.get('step')}:\n")
    print(format_table(metrics))
    if not args.table:
        print(f"\npipeline time: {time.time() - t0:.0f} s")
    from pipeline.tracking import tracking_uri

    print(f"runs: mlflow ui --backend-store-uri {tracking_uri(params, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
