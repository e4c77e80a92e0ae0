"""Children of the window: a crash is shown and the window stays usable; Stop ends a long child."""
import sys

import pytest
from PySide6.QtCore import Qt

from gui import process
from gui.app import MainWindow

PY = sys.executable


@pytest.fixture
def window(qtbot, project, settings):
    def make(run_argv, grace_s=5.0):
        w = MainWindow(project, settings, run_command=lambda ov: run_argv, grace_s=grace_s, retry_s=60)
        qtbot.addWidget(w)
        w.show()
        return w
    return make


def test_crashing_child_shows_exit_code_and_stderr(qtbot, window):
    w = window([PY, "-c", "import sys; print('loading', flush=True); "
                          "print('Traceback: boom in stage', file=sys.stderr); sys.exit(3)"])
    qtbot.mouseClick(w.form.run_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: not w.banner.isHidden(), timeout=15_000)
    assert "exited with code 3" in w.banner.title.text()
    assert "boom in stage" in w.banner.detail.text()
    assert "failed with exit code 3" in w.child_status.text()
    qtbot.waitUntil(lambda: "loading" in w.log.toPlainText(), timeout=5_000)
    # still usable: the form launches again, the banner can be dismissed
    assert w.form.run_button.isEnabled() and not w.form.stop_button.isEnabled()
    w.run_command = lambda ov: [PY, "-c", "print('second run ok')"]
    qtbot.mouseClick(w.form.run_button, Qt.MouseButton.LeftButton)
    assert w.banner.isHidden()
    qtbot.waitUntil(lambda: w.child_status.text() == "run finished", timeout=15_000)
    qtbot.waitUntil(lambda: "second run ok" in w.log.toPlainText(), timeout=5_000)


def test_missing_program_is_reported(qtbot, window):
    w = window(["/nonexistent/xbm-program"])
    qtbot.mouseClick(w.form.run_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: not w.banner.isHidden(), timeout=10_000)
    assert "Could not start" in w.banner.title.text()
    assert w.form.run_button.isEnabled()


def test_stop_ends_a_long_child(qtbot, window):
    # like a stage: on SIGINT it finishes its "step", says so, and exits non-zero
    script = ("import signal, sys, time\n"
              "stop = []\n"
              "signal.signal(signal.SIGINT, lambda *a: stop.append(1))\n"
              "print('training', flush=True)\n"
              "for _ in range(6000):\n"
              "    time.sleep(0.01)\n"
              "    if stop:\n"
              "        print('checkpoint kept', flush=True); sys.exit(130)\n")
    w = window([PY, "-c", script])
    qtbot.mouseClick(w.form.run_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: "training" in w.log.toPlainText(), timeout=15_000)
    assert w.child.is_running() and w.form.stop_button.isEnabled()
    with qtbot.waitSignal(w.child.finished, timeout=10_000) as sig:
        qtbot.mouseClick(w.form.stop_button, Qt.MouseButton.LeftButton)
    code, stopped, _ = sig.args
    assert (code, stopped) == (130, True)
    assert w.banner.isHidden()  # a requested stop is not an error
    assert "run stopped (exit code 130)" == w.child_status.text()
    qtbot.waitUntil(lambda: "checkpoint kept" in w.log.toPlainText(), timeout=5_000)


def test_stop_escalates_to_kill_after_the_grace_period(qtbot):
    child = process.ChildProcess(grace_s=0.3)
    stubborn = ("import signal, time\n"
                "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                "print('up', flush=True)\n"
                "time.sleep(600)\n")
    with qtbot.waitSignal(child.output, timeout=15_000):
        assert child.start([PY, "-c", stubborn], cwd=".")
    with qtbot.waitSignal(child.finished, timeout=10_000) as sig:
        child.stop()
    code, stopped, _ = sig.args
    assert stopped and code == -9  # SIGINT and SIGTERM ignored, SIGKILL after 2 x 0.3 s


def test_stop_reaches_the_whole_process_tree(qtbot, tmp_path):
    # `dvc exp run` runs its stage as a grandchild; Stop must reach it (its own SIGINT handler writes a file)
    marker = tmp_path / "stopped"
    grandchild = (f"import signal, time, pathlib\n"
                  f"signal.signal(signal.SIGINT, lambda *a: (pathlib.Path({str(marker)!r}).write_text('ok'), "
                  f"exit(130)))\n"
                  f"print('grandchild up', flush=True)\n"
                  f"time.sleep(600)\n")
    parent = (f"import signal, subprocess, sys\n"
              f"signal.signal(signal.SIGINT, signal.SIG_IGN)  # what DVC does while its stage runs\n"
              f"sys.exit(subprocess.call([sys.executable, '-c', {grandchild!r}]))\n")
    child = process.ChildProcess(grace_s=5.0)
    lines = []
    child.output.connect(lambda text, err: lines.append(text))
    assert child.start([PY, "-c", parent], cwd=str(tmp_path))
    qtbot.waitUntil(lambda: any("grandchild up" in ln for ln in lines), timeout=15_000)
    with qtbot.waitSignal(child.finished, timeout=10_000) as sig:
        child.stop()
    assert sig.args[0] == 130 and marker.read_text() == "ok"


def test_command_lines():
    assert process.format_command(process.run_command(["train.lr=0.01", "memory.mode=index"])) == \
        "dvc exp run -S train.lr=0.01 -S memory.mode=index"
    assert process.format_command(process.tune_command(["tune.n_trials=5"])) == \
        "python -m pipeline.tune -S tune.n_trials=5"


def test_mlflow_ui_button_starts_a_server_and_opens_it(qtbot, monkeypatch, tmp_path):
    opened = []
    monkeypatch.setattr(process.QDesktopServices, "openUrl", lambda url: opened.append(url.toString()))
    seen = {}

    def command(uri, port):  # a stand-in server: the real `mlflow ui` takes ~10 s to import
        seen["uri"] = uri
        return [PY, "-m", "http.server", str(port), "--bind", "127.0.0.1"]

    ui = process.MlflowUi(command=command)
    with qtbot.waitSignal(ui.opened, timeout=30_000) as sig:
        ui.open("sqlite:////tmp/x/mlflow.db", tmp_path)
    assert seen["uri"] == "sqlite:////tmp/x/mlflow.db"
    assert opened == [sig.args[0]] and sig.args[0].startswith("http://127.0.0.1:")
    assert process.mlflow_ui_command("sqlite:///a.db", 5001)[1:] == [
        "-m", "mlflow", "ui", "--backend-store-uri", "sqlite:///a.db", "--host", "127.0.0.1", "--port", "5001"]
    ui.shutdown()
    assert not ui.is_running()


def test_tune_launches_the_study_command_with_the_form_overrides(qtbot, project, settings):
    seen = []

    def tune(overrides):
        seen.append(overrides)
        return [PY, "-c", "import sys; print('study args', sys.argv[1:])", *overrides]

    w = MainWindow(project, settings, tune_command=tune, retry_s=60)
    qtbot.addWidget(w)
    w.form.editors["memory.ratio"].setText("0.25")
    w.form._changed()
    with qtbot.waitSignal(w.child.finished, timeout=15_000) as sig:
        qtbot.mouseClick(w.form.tune_button, Qt.MouseButton.LeftButton)
    assert seen == [["memory.ratio=0.25"]] and sig.args[0] == 0
    assert w.child_status.text() == "study finished"
    qtbot.waitUntil(lambda: "study args ['memory.ratio=0.25']" in w.log.toPlainText(), timeout=5_000)
