"""XBM desktop app: launch runs and studies, watch them live, compare past runs.

Usage:
  xbm-gui                       # the project in the current folder (or the nearest parent with params.yaml)
  xbm-gui --root PATH           # another project
  xbm-gui --run runs/<key>      # show one run folder instead of following runs/LATEST
  python -m gui ...             # the same
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

# Debian / Ubuntu packages of the X libraries that Qt's xcb platform plugin loads (`ldd` on PySide6's
# Qt/plugins/platforms/libqxcb.so, PySide6 6.11). A minimal machine or container often lacks the first ones.
XCB_PACKAGES = {
    "libxcb-icccm.so.4": "libxcb-icccm4", "libxcb-keysyms.so.1": "libxcb-keysyms1",
    "libxcb-cursor.so.0": "libxcb-cursor0", "libxcb-image.so.0": "libxcb-image0",
    "libxcb-render-util.so.0": "libxcb-render-util0", "libxkbcommon-x11.so.0": "libxkbcommon-x11-0",
    "libxcb-randr.so.0": "libxcb-randr0", "libxcb-render.so.0": "libxcb-render0",
    "libxcb-shape.so.0": "libxcb-shape0", "libxcb-shm.so.0": "libxcb-shm0", "libxcb-sync.so.1": "libxcb-sync1",
    "libxcb-util.so.1": "libxcb-util1", "libxcb-xfixes.so.0": "libxcb-xfixes0", "libxcb-xkb.so.1": "libxcb-xkb1",
    "libxcb.so.1": "libxcb1", "libxkbcommon.so.0": "libxkbcommon0", "libX11-xcb.so.1": "libx11-xcb1",
    "libX11.so.6": "libx11-6", "libEGL.so.1": "libegl1", "libGL.so.1": "libgl1",
    "libfontconfig.so.1": "libfontconfig1", "libfreetype.so.6": "libfreetype6", "libdbus-1.so.3": "libdbus-1-3",
    "libglib-2.0.so.0": "libglib2.0-0",
}
_NOT_FOUND = re.compile(r"^\s*(\S+)\s+=>\s+not found", re.MULTILINE)


def find_root(start: Path) -> Path:
    for d in (start, *start.parents):
        if (d / "params.yaml").is_file():
            return d
    return start


def debian_package(soname: str) -> str:
    """The package that ships a library: the table above, else Debian's rule (libfoo-bar.so.1 -> libfoo-bar1;
    a name ending in a digit takes a dash: libfoo2.so.0 -> libfoo2-0)."""
    if soname in XCB_PACKAGES:
        return XCB_PACKAGES[soname]
    name, _, version = soname.partition(".so.")
    return f"{name}{'-' if name[-1:].isdigit() else ''}{version.split('.')[0]}".lower()


def xcb_plugin() -> Path:
    import PySide6

    return Path(PySide6.__file__).parent / "Qt" / "plugins" / "platforms" / "libqxcb.so"


def missing_libraries(plugin: Path, run=subprocess.run) -> list[str]:
    """Libraries `ldd` cannot find for `plugin` (it follows the whole dependency tree), in ldd's order."""
    try:
        out = run(["ldd", str(plugin)], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []  # no ldd (musl, macOS): let Qt speak for itself
    return list(dict.fromkeys(_NOT_FOUND.findall(out.stdout)))


def xcb_problem(environ=os.environ, plugin: Path | None = None, run=subprocess.run) -> str | None:
    """Why Qt's X11 (xcb) platform plugin would fail (missing libraries, with the packages to install, or no
    display); None if it would work or another platform is used. Qt itself only prints "Could not load the Qt
    platform plugin xcb" and aborts."""
    if not sys.platform.startswith("linux"):
        return None
    platform = environ.get("QT_QPA_PLATFORM", "")
    if platform and not platform.startswith("xcb"):
        return None
    if not platform and environ.get("XDG_SESSION_TYPE") == "wayland" and environ.get("WAYLAND_DISPLAY"):
        return None  # Qt picks its wayland plugin in a Wayland session
    plugin = plugin or xcb_plugin()
    if not plugin.is_file():
        return None
    missing = missing_libraries(plugin, run)
    if not missing:
        if not environ.get("DISPLAY") and not environ.get("WAYLAND_DISPLAY"):  # Qt would abort the same way
            return ("xbm-gui: no display to open the window on (DISPLAY is not set): run it in a desktop "
                    "session or over `ssh -X`, or without a display: QT_QPA_PLATFORM=offscreen xbm-gui.")
        return None
    qt = [m for m in missing if m.startswith("libQt6")]
    if qt:
        return (f"xbm-gui: PySide6's own Qt libraries are missing ({', '.join(qt)}): reinstall it, e.g. "
                f"pip install --force-reinstall PySide6-Essentials")
    packages = " ".join(dict.fromkeys(debian_package(m) for m in missing))
    return (f"xbm-gui: Qt's X11 platform plugin (xcb) cannot load: {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not installed.\n"
            f"  Debian / Ubuntu: sudo apt-get install {packages}\n"
            f"  (the package names of other distributions differ; `ldd {plugin}` lists what is missing)\n"
            f"  Without a display: QT_QPA_PLATFORM=offscreen xbm-gui; in a Wayland session: QT_QPA_PLATFORM=wayland.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="xbm-gui", description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=None,
                    help="project folder holding params.yaml (default: the current folder or its nearest parent "
                         "with one)")
    ap.add_argument("--run", type=Path, default=None,
                    help="run folder or events.jsonl to show (default: follow <runs_dir>/LATEST)")
    args = ap.parse_args(argv)
    problem = xcb_problem()
    if problem:  # said before Qt aborts the process with a message that names no package
        print(problem, file=sys.stderr)
        return 1

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
