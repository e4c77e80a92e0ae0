"""Regenerate docs/gui.png: the window during a real (short) pipeline run that it launched itself.

    python -m gui.screenshot [--out docs/gui.png] [--size 1600x1000] [--keep DIR]
    python -m gui.screenshot --remote [--out docs/remote.png]

Makes a throwaway copy of the project (gui/demo.py) with a short schedule, opens the window on it, sets
`XBM steps` in the launch form, presses Run (`dvc exp run -S ...`), waits until the XBM phase is three quarters
done, saves the window, then presses Stop. Runs offscreen when there is no display. About 2 minutes on 2 idle CPU cores.

--remote: a team's view instead. An `mlflow server` on 127.0.0.1, `dvc repro` in one project copy (the GPU
server) logging to it through MLFLOW_TRACKING_URI, and the window opened on another copy (a desk, no local run)
following the server's newest active run.
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


def save_window(app, win, out: Path, ticks: int = 20) -> None:
    """Let pending redraws (plot timer, log flush, layout, a remote poll) run, then save the window as a PNG."""
    for _ in range(ticks):
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
    ap.add_argument("--remote", action="store_true", help="follow a run through a tracking server instead")
    args = ap.parse_args(argv)
    if args.remote and args.out == ap.get_default("out"):
        args.out = args.out.with_name("remote.png")
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
    w, h = (int(v) for v in args.size.lower().split("x"))
    if args.remote:
        try:
            return _remote(app, work, args, (w, h))
        finally:
            if args.keep is None:
                shutil.rmtree(work, ignore_errors=True)
    root = make_project(work / "project", PARAMS)
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


def _remote(app, work: Path, args, size: tuple[int, int]) -> int:
    import socket
    import subprocess
    import urllib.request

    from PySide6.QtCore import QSettings

    from .app import MainWindow
    from .demo import make_project

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    work.mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                               f"sqlite:///{work / 'server.db'}", "--artifacts-destination", str(work / "store"),
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=open(work / "server.log", "w"), stderr=subprocess.STDOUT, env=env)
    run = None
    try:
        wait_until(app, lambda: _answers(urllib.request, uri), 180, f"mlflow server on {uri}")
        host = make_project(work / "gpu-server", PARAMS)
        desk = make_project(work / "desk", {})
        run = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=host, env={**env, "MLFLOW_TRACKING_URI": uri},
                               stdout=open(work / "repro.log", "w"), stderr=subprocess.STDOUT)
        settings = QSettings(str(work / "settings.ini"), QSettings.Format.IniFormat)
        settings.setValue("remote/uri", uri)
        win = MainWindow(desk, settings)
        win.resize(*size)
        win.show()
        win.follow_remote("")  # the newest active run on the server
        warmup = PARAMS["train.warmup_steps"]
        target = warmup + int(args.at * PARAMS["train.xbm_steps"])
        print(f"{uri}: dvc repro in {host}; the window on {desk} waits for step {target}", flush=True)
        wait_until(app, lambda: (win.monitor.data.last_step or 0) >= target or run.poll() is not None,
                   args.timeout, f"step {target}")
        if run.poll() is not None:
            raise RuntimeError(f"the run ended early:\n{(work / 'repro.log').read_text()[-2000:]}")
        save_window(app, win, args.out, 40)  # ticks for the next poll too
        print(f"saved {args.out} at step {win.monitor.data.last_step}", flush=True)
        win.close()
    finally:
        for p in (run, server):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(60)
    return 0


def _answers(request, uri: str) -> bool:
    try:
        request.urlopen(f"{uri}/health", timeout=1).close()
        return True
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(main())
