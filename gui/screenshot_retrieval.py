"""Regenerate docs/retrieval.png: the Retrieval tab on the model of a real (short) pipeline run.

    python -m gui.screenshot_retrieval [--out docs/retrieval.png] [--size 1600x1000] [--keep DIR]

Makes a throwaway copy of the project (gui/demo.py) with the short schedule of gui/screenshot.py, runs
`dvc repro` in it (the evaluate stage logs the model to MLflow), opens the window on it, switches to the Retrieval
tab, waits for the test split to be embedded, picks a query whose first same-class result is not first (the
kind of mistake one looks for) and saves the window. About 1.5 minutes on 2 idle CPU cores
(--warmup-steps 150 --xbm-steps 250: under one CPU-minute).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .screenshot import PARAMS, save_window, wait_until


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "retrieval.png")
    ap.add_argument("--size", default="1600x1000", help="window size WxH in pixels")
    ap.add_argument("--timeout", type=float, default=600, help="seconds to wait for the embeddings")
    ap.add_argument("--keep", type=Path, default=None, help="make the demo project here and keep it")
    ap.add_argument("--warmup-steps", type=int, default=PARAMS["train.warmup_steps"])
    ap.add_argument("--xbm-steps", type=int, default=PARAMS["train.xbm_steps"])
    args = ap.parse_args(argv)
    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

    from .demo import make_project

    work = Path(tempfile.mkdtemp(prefix="xbm-screenshot-")) if args.keep is None else args.keep.resolve()
    root = make_project(work / "project", {**PARAMS, "train.warmup_steps": args.warmup_steps,
                                           "train.xbm_steps": args.xbm_steps})
    print(f"demo project {root}: dvc repro", flush=True)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "XBM_MLFLOW_RUN_ID")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=root, env=env, check=True)

    from PySide6.QtCore import QSettings
    from PySide6.QtWidgets import QApplication
    from pyqtgraph.util.garbage_collector import GarbageCollector

    from . import theme
    from .app import MainWindow

    app = QApplication(sys.argv[:1])
    theme.apply(app)
    app.gc = GarbageCollector(interval=1.0)  # GC in the GUI thread only; kept alive with the app
    w, h = (int(v) for v in args.size.lower().split("x"))
    win = MainWindow(root, QSettings(str(work / "settings.ini"), QSettings.Format.IniFormat))
    win.resize(w, h)
    win.show()
    panel = win.retrieval
    win.tabs.setCurrentWidget(panel)
    wait_until(app, lambda: panel.session is not None, args.timeout, "the test split's embeddings")
    s = panel.session
    # a query whose first same-class result comes 2nd to 4th: wrong answers above right ones
    rows = panel.worst_rows()
    row = next((r for r in rows if 2 <= s.ranks[r] <= 4), rows[0])
    index = panel.worst_model.index(panel.worst_model.line_of(row), 0)  # fetched up to it if need be
    panel.worst.setCurrentIndex(index)
    panel.worst.scrollTo(index)
    wait_until(app, lambda: panel.results is not None and panel.results.row == row, 120, f"query {row}")
    save_window(app, win, args.out)
    print(f"saved {args.out}: {s.run.name}, query {row} (first match at rank {s.ranks[row]})", flush=True)
    win.close()
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
