"""xbm-gui on a machine without the X libraries of Qt's xcb plugin: it names the Debian packages to install instead
of letting Qt abort with "Could not load the Qt platform plugin xcb"."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gui.__main__ import debian_package, missing_libraries, xcb_plugin, xcb_problem

LDD_OUTPUT = """\
\tlinux-vdso.so.1 (0x00007ffd)
\tlibQt6XcbQpa.so.6 => /venv/PySide6/Qt/lib/libQt6XcbQpa.so.6 (0x00007f10)
\tlibxcb-icccm.so.4 => not found
\tlibxcb-keysyms.so.1 => not found
\tlibxcb-icccm.so.4 => not found
\tlibxcb.so.1 => /lib/x86_64-linux-gnu/libxcb.so.1 (0x00007f20)
"""


class _Done:
    def __init__(self, stdout: str):
        self.stdout, self.returncode = stdout, 0


def _ldd(text):
    calls = []

    def run(argv, **kw):
        calls.append(argv)
        return _Done(text)

    return run, calls


@pytest.fixture
def plugin(tmp_path):
    path = tmp_path / "libqxcb.so"
    path.write_bytes(b"\x7fELF")
    return path


def test_missing_libraries_named_with_their_debian_packages(plugin):
    run, calls = _ldd(LDD_OUTPUT)
    assert missing_libraries(plugin, run) == ["libxcb-icccm.so.4", "libxcb-keysyms.so.1"]
    assert calls == [["ldd", str(plugin)]]
    msg = xcb_problem({}, plugin, run)
    assert "libxcb-icccm.so.4, libxcb-keysyms.so.1 are not installed" in msg
    assert "sudo apt-get install libxcb-icccm4 libxcb-keysyms1\n" in msg
    assert "QT_QPA_PLATFORM=offscreen" in msg
    assert xcb_problem({"QT_QPA_PLATFORM": "xcb"}, plugin, run) == msg


def test_no_message_when_xcb_loads_or_is_not_used(plugin):
    run, calls = _ldd(LDD_OUTPUT)
    assert xcb_problem({"QT_QPA_PLATFORM": "offscreen"}, plugin, run) is None
    assert xcb_problem({"XDG_SESSION_TYPE": "wayland", "WAYLAND_DISPLAY": "wayland-0"}, plugin, run) is None
    assert xcb_problem({}, plugin.with_name("absent.so"), run) is None
    assert calls == []  # nothing to check in those cases
    ok, _ = _ldd(LDD_OUTPUT.replace("not found", "/lib/x86_64-linux-gnu/x.so (0x1)"))
    assert xcb_problem({"DISPLAY": ":0"}, plugin, ok) is None
    # the libraries are there but no X server is named: Qt would abort the same way
    assert "DISPLAY is not set" in xcb_problem({}, plugin, ok)


def test_broken_pyside_install_is_not_blamed_on_x(plugin):
    run, _ = _ldd("\tlibQt6XcbQpa.so.6 => not found\n\tlibxcb-icccm.so.4 => not found\n")
    msg = xcb_problem({}, plugin, run)
    assert "reinstall" in msg and "libQt6XcbQpa.so.6" in msg and "apt-get" not in msg


def test_debian_package_names():
    # the table, checked with `dpkg -S` on Debian 12; Debian's soname rule for the rest
    assert debian_package("libxkbcommon-x11.so.0") == "libxkbcommon-x11-0"
    assert debian_package("libX11-xcb.so.1") == "libx11-xcb1"
    assert debian_package("libglib-2.0.so.0") == "libglib2.0-0"
    assert debian_package("libxcb-xinerama.so.0") == "libxcb-xinerama0"
    assert debian_package("libfoo2.so.0.1") == "libfoo2-0"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the xcb plugin is Linux's")
def test_xbm_gui_says_which_packages_instead_of_aborting(tmp_path):
    """The app itself, with an `ldd` on PATH that reports the two libraries missing (as on a machine without
    them): exit code 1 and the packages on stderr, before Qt is started."""
    assert xcb_plugin().is_file()
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "ldd").write_text("#!/bin/sh\nprintf '\\tlibxcb-icccm.so.4 => not found\\n"
                              "\\tlibxcb-keysyms.so.1 => not found\\n'\n")
    (fake / "ldd").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("QT_QPA_PLATFORM", "XDG_SESSION_TYPE")}
    env["PATH"] = f"{fake}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    out = subprocess.run([sys.executable, "-m", "gui"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1
    assert "sudo apt-get install libxcb-icccm4 libxcb-keysyms1" in out.stderr
    assert "Could not load the Qt platform plugin" not in out.stderr
