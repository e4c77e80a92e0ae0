"""Does the desktop app's UI thread only draw? The gaps between event-loop ticks while it follows a live run.

    QT_QPA_PLATFORM=offscreen python -m bench.ui_latency              # about 40 s
    QT_QPA_PLATFORM=offscreen python -m bench.ui_latency --rows 50000 --seconds 30

The main window, in a temporary project, follows a live run (tests/gui/gui_fake_run.py writing events.jsonl
every --step-delay s, launched from the window at 0.5 s). At 2.5 s the Retrieval tab is opened on a big collection:
a session of --rows test queries (random unit embeddings, 32 px images, ranked by the library), loaded through the
panel's own background path, so its worst-queries list is filled while the run is followed. From 3 s, as a user
would: a query picked every 250 ms, a key typed into the launch form every 100 ms, and the Runs / Study panels
polling their stores every second.

A QTimer at --tick-ms (5 ms; a precise timer) records a timestamp in the UI thread each time the event loop gets
to it; a gap much longer than the tick is time the UI thread spent elsewhere (or, on a loaded machine, time the
process was not scheduled). Prints JSON: the longest gap, the p99 and median, the longest gap in the second after
the launch (QProcess start, settings saved) and after the collection was opened (the tab shown, the worst-queries
list filled), and the longest and p99 gap outside those two moments (following the run).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FAKE_RUN = ROOT / "tests" / "gui" / "gui_fake_run.py"
PARAMS = ("data:\n  name: synthetic\nloss:\n  name: contrastive\n  margin: 0.5\nmemory:\n  ratio: 0.5\n"
          "train:\n  batch_size: 16\n  images_per_class: 4\n  lr: 0.001\n  warmup_steps: 20\n  xbm_steps: 40\n"
          "  device: cpu\n")


@dataclass
class _Images:
    """A stand-in test split: `class_ids` and `image(i)` are all the panel reads."""

    class_ids: np.ndarray

    def image(self, i: int):
        from PIL import Image

        shade = int(i * 37 % 256)
        return Image.new("RGB", (32, 32), (shade, 255 - shade, 128))


def big_session(run, rows: int, dim: int = 64, seed: int = 0):
    """A session of `rows` queries against themselves, ranked by the library (what open_session returns)."""
    import torch

    from gui import retrieval_logic as retrieval
    from xbmcore.config import DataParams
    from xbmcore.retrieval import first_relevant_rank, worst_first

    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((rows, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = np.arange(rows) // 4
    ranks = first_relevant_rank(emb, labels, None, None)
    images = _Images(labels)
    return retrieval.Session(run, DataParams(), torch.nn.Identity(), torch.device("cpu"), images, None, emb,
                             labels, emb, labels, True, ranks, worst_first(ranks))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ui_latency", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=20_000, help="test queries of the loaded collection")
    ap.add_argument("--seconds", type=float, default=20.0, help="how long the run is followed")
    ap.add_argument("--tick-ms", type=int, default=5)
    ap.add_argument("--step-delay", type=float, default=0.005, help="seconds between the fake run's steps")
    args = ap.parse_args(argv)

    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from PySide6.QtCore import QEventLoop, QSettings, Qt, QTimer
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication([])  # noqa: F841 (held for the run)
    from gui import retrieval
    from gui.app import MainWindow

    tmp = Path(tempfile.mkdtemp(prefix="ui_latency-"))
    project = tmp / "project"
    project.mkdir()
    (project / "params.yaml").write_text(PARAMS)
    run = retrieval.ModelRun("bench", "big-collection", time.time(), "models:/bench")
    session = big_session(run, args.rows)
    retrieval.fetch_model_runs = lambda uri, experiment: [run]
    retrieval.open_session = lambda *a, **kw: session

    settings = QSettings(str(tmp / "settings.ini"), QSettings.Format.IniFormat)
    w = MainWindow(project, settings, retry_s=1.0)
    w.resize(1400, 900)
    w.show()

    ticks: list[float] = []
    tick = QTimer()
    tick.setTimerType(Qt.TimerType.PreciseTimer)
    tick.timeout.connect(lambda: ticks.append(time.perf_counter()))
    marks: dict[str, float] = {}
    steps = max(100, int(args.seconds / max(args.step_delay, 1e-3)))

    def launch() -> None:  # Run pressed: the fake run starts and the Live tab follows it
        tick.start(args.tick_ms)
        marks["launch"] = time.perf_counter()
        w.launch([sys.executable, str(FAKE_RUN), str(project / "runs"), "live", "--warmup", str(steps // 10),
                  "--xbm", str(steps - steps // 10), "--delay", str(args.step_delay), "--eval-every", "200"],
                 "run")

    def open_tab() -> None:  # shown: the panel lists the runs and opens the newest
        marks["tab"] = time.perf_counter()
        w.tabs.setCurrentWidget(w.retrieval)

    w.retrieval.session_ready.connect(lambda: marks.setdefault("session", time.perf_counter()))
    picks = iter(range(10**9))

    def pick() -> None:  # a query picked in the worst-queries list, as a click would
        if w.retrieval.session is not None:
            w.retrieval.show_query(int(w.retrieval.session.order[next(picks) * 7 % args.rows]))

    keys = iter(range(10**9))
    lr = w.form.editors["train.lr"]

    def type_key() -> None:  # one keystroke in the launch form: textEdited, as typing emits it
        text = "0.00" + str(1 + next(keys) % 9)
        lr.setText(text)
        lr.textEdited.emit(text)

    timers = []
    for ms, fn in ((250, pick), (100, type_key)):
        t = QTimer()
        t.timeout.connect(fn)
        timers.append(t)
    QTimer.singleShot(500, launch)
    QTimer.singleShot(2500, open_tab)
    QTimer.singleShot(3000, lambda: [t.start(ms) for t, ms in zip(timers, (250, 100))])
    loop = QEventLoop()  # not app.exec(): Qt 6's quit() would close the window, which asks about the child
    QTimer.singleShot(int(args.seconds * 1000), loop.quit)
    loop.exec()
    tick.stop()
    for t in timers:
        t.stop()
    followed = w.monitor.data.last_step
    w.child.stop()  # SIGINT: the fake run ends its step and exits
    if w.child.is_running() and not w.child._proc.waitForFinished(10_000):
        w.child._proc.kill()
    w._quit_when_child_ends = True  # no "a child is running" question
    w.close()

    t = np.array(ticks)
    gaps = np.diff(t) * 1000
    end_t = t[1:]

    def window(mark: str | None, before: float = 0.05, after: float = 1.0) -> np.ndarray:
        if mark is None or mark not in marks:
            return np.zeros(len(gaps), bool)
        return (end_t >= marks[mark] - before) & (end_t <= marks[mark] + after)

    at_launch, at_open = window("launch"), window("tab") | window("session", 0.3)
    following = gaps[~(at_launch | at_open)]
    out = {
        "rows": args.rows, "seconds": round(float(t[-1] - t[0]), 2), "tick_ms": args.tick_ms, "ticks": len(t),
        "max_gap_ms": round(float(gaps.max()), 1), "p99_gap_ms": round(float(np.percentile(gaps, 99)), 1),
        "median_gap_ms": round(float(np.median(gaps)), 1), "gaps_over_50ms": int((gaps > 50).sum()),
        "max_gap_at_launch_ms": round(float(gaps[at_launch].max()), 1) if at_launch.any() else None,
        "max_gap_at_collection_open_ms": round(float(gaps[at_open].max()), 1) if at_open.any() else None,
        "max_gap_following_ms": round(float(following.max()), 1),
        "p99_gap_following_ms": round(float(np.percentile(following, 99)), 1),
        "session_opened_after_tab_s": round(marks["session"] - marks["tab"], 2) if "session" in marks else None,
        "steps_followed": followed, "queries_shown": next(picks), "keys_typed": next(keys),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
