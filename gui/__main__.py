"""XBM desktop app: launch runs and studies, watch them live, compare past runs.

Usage:
  xbm-gui                       # the project in the current folder (or the nearest parent with params.yaml)
  xbm-gui --root PATH           # another project
  xbm-gui --run runs/<key>      # show one run folder instead of following runs/LATEST
  python -m gui ...             # the same
"""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path


def find_root(start: Path) -> Path:
    for d in (start, *start.parents):
        if (d / "params.yaml").is_file():
            return d
    return start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="xbm-gui", description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=None,
                    help="project folder holding params.yaml (default: the current folder or its nearest parent "
                         "with one)")
    ap.add_argument("--run", type=Path, default=None,
                    help="run folder or events.jsonl to show (default: follow <runs_dir>/LATEST)")
    args = ap.parse_args(argv)

    import PySide6
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication
    from pyqtgraph.util.garbage_collector import GarbageCollector

    from . import theme
    from .app import MainWindow

    if PySide6.__version__ == "6.12.0":
        # its SignalInstance.emit drops a reference to True on every call: pyqtgraph emits on each redraw, and
        # the process aborts ("bool_dealloc") within minutes
        print("xbm-gui: PySide6 6.12.0 crashes long sessions; install another version, e.g. "
              "pip install 'PySide6-Essentials==6.11.3'", file=sys.stderr)
    app = QApplication(sys.argv[:1])
    app.setOrganizationName("XBM")
    app.setApplicationName("xbm-gui")
    theme.apply(app)
    # Python's cyclic GC only in the GUI thread: a collection triggered in a worker thread (event tail, store
    # reads) could finalise Qt objects owned by the GUI thread, which aborts.
    app.gc = GarbageCollector(interval=1.0)  # kept alive with the app
    root = (args.root or find_root(Path.cwd())).resolve()
    win = MainWindow(root, follow=args.run)
    win.show()
    # Ctrl-C in the terminal closes the window the normal way (settings saved, child asked to stop)
    signal.signal(signal.SIGINT, lambda *_: win.close())
    wake = QTimer()
    wake.timeout.connect(lambda: None)  # lets Python run its signal handlers while Qt's loop waits
    wake.start(250)
    return app.exec()


if __name__ == "__main__":
    sys.exit(main())
