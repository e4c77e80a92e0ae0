"""Regenerate docs/gui.png: the window during a real (short) pipeline run that it launched itself.

    python -m gui.screenshot [--out docs/gui.png] [--size 1600x1000] [--keep DIR]

Makes a throwaway copy of the project (gui/demo.py) with a short schedule, opens the window on it, sets
`XBM steps` in the launch form, presses Run (`dvc exp run -S ...`), waits until the XBM phase is three quarters
done, saves the window, then presses Stop. Runs offscreen when there is no display. About 2 minutes on 2 idle CPU cores.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# A short run of the default synthetic benchmark: long enough for a warm-up, the memory switching on, drift
# measurements and a few evaluations.
PARAMS = {"train.warmup_steps": 300, "train.xbm_steps": 500, "train.eval_every": 100,
          "train.checkpoint_every": 200, "train.device": "cpu"}
XBM_STEPS_IN_FORM = "600"  # typed into the form, so the picture shows an override in the command preview


def wait_until(app, cond, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        app.processEvents()
        time.sleep(0.02)


def save_window(app, win, out: Path) -> None:
    """Let pending redraws (plot timer, log flush, layout) run, then save the window as a PNG."""
    for _ in range(20):
        app.processEvents()
        time.sleep(0.05)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not win.grab().save(str(out)):
        raise RuntimeError(f"could not write {out}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "gui.png")
    ap.add_argument("--size", default="1600x1000", help="window size WxH in pixels")
    ap.add_argument("--at", type=float, default=0.75, help="fraction of the XBM phase done when the picture is taken")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds to wait for that step")
    ap.add_argument("--keep", type=Path, default=None, help="make the demo project here and keep it")
    args = ap.parse_args(argv)
    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

    from PySide6.QtCore import QSettings
    from PySide6.QtWidgets import QApplication
    from pyqtgraph.util.garbage_collector import GarbageCollector

    from . import theme
    from .app import MainWindow
    from .demo import make_project

    app = QApplication(sys.argv[:1])
    theme.apply(app)
    app.gc = GarbageCollector(interval=1.0)  # GC in the GUI thread only; kept alive with the app
    work = Path(tempfile.mkdtemp(prefix="xbm-screenshot-")) if args.keep is None else args.keep.resolve()
    root = make_project(work / "project", PARAMS)
    w, h = (int(v) for v in args.size.lower().split("x"))
    win = MainWindow(root, QSettings(str(work / "settings.ini"), QSettings.Format.IniFormat))
    win.resize(w, h)
    win.show()
    win.form.editors["train.xbm_steps"].setText(XBM_STEPS_IN_FORM)
    win.form._changed()
    win.form.run_button.click()
    if not win.child.is_running():
        raise RuntimeError(f"the run did not start: {win.banner.detail.text()}")
    data = lambda: win.monitor.data  # noqa: E731 (replaced on each new events file)
    warmup = PARAMS["train.warmup_steps"]
    target = warmup + int(args.at * int(XBM_STEPS_IN_FORM))
    print(f"demo project {root}; waiting for step {target} (XBM phase)", flush=True)
    wait_until(app, lambda: (data().last_step or 0) >= target or not win.child.is_running(), args.timeout,
               f"step {target}")
    if not win.child.is_running():
        raise RuntimeError(f"the run ended early:\n{win.log.toPlainText()[-2000:]}")
    time.sleep(0.3)
    save_window(app, win, args.out)
    print(f"saved {args.out} at step {data().last_step}", flush=True)
    win.form.stop_button.click()
    wait_until(app, lambda: not win.child.is_running(), 120, "the run to stop")
    win.close()
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
