"""Regenerate docs/memory_tab.png: the Memory tab in a real window, following a live training run.

    python -m gui.screenshot_memory [--out docs/memory_tab.png] [--size 1600x1000]

Prepares a small synthetic set (classes in super-classes of siblings) in a temporary project, starts a child
process that trains on it (`record_run`: the Trainer with a JsonlSink, warm-up then XBM, a memory view every few
steps), opens the window on the run (its event tail), shows the Memory tab, waits for a few views while the run
goes on, saves the window, then stops the child. Under a minute on one CPU core; use xvfb-run for a real X11
window.

`record_run` is also the GUI tests' recorded run (tests/gui/test_gui_memory.py).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

# A small synthetic set: 32 px images, 792 classes in super-classes of 6 siblings (half of them train); a
# from-scratch SmallCNN; a memory of the whole training split, so that entries grow a hundred steps old.
DEMO = {
    "data": {"name": "synthetic", "prepared": "data/prepared", "train_size": 32, "test_resize": 32, "test_size": 32,
             "val_fraction": 0.1,
             "synthetic": {"num_classes": 792, "images_per_class_min": 4, "images_per_class_max": 6,
                           "classes_per_superclass": 6, "image_size": 32, "pretrain_classes": 12}},
    "model": {"backbone": "smallcnn", "embedding_dim": 32, "pretrained": "none"},
    "memory": {"ratio": 1.0},
    "train": {"batch_size": 16, "images_per_class": 4, "warmup_steps": 40, "xbm_steps": 400, "lr": 0.003,
              "warmup_lr": 0.003, "device": "cpu", "num_threads": 1, "drift_probe": 32, "drift_every": 10,
              "drift_dts": [10], "memory_view_every": 20, "memory_view_k": 8, "memory_view_anchors": 8,
              "eval_every": 0},
    "eval": {"recall_at": [1, 2], "batch_size": 128},
}


def demo_params(overrides: dict[str, Any] | None = None):
    """The demo's Params (DEMO with `overrides` merged in, section by section)."""
    from xbmcore.config import Params

    raw = {k: dict(v) for k, v in DEMO.items()}
    for section, values in (overrides or {}).items():
        merged = dict(raw.get(section, {}))
        for k, v in values.items():
            merged[k] = {**merged.get(k, {}), **v} if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
        raw[section] = merged
    return Params.model_validate(raw)


def record_run(root: Path, key: str, params, hooks: Sequence = (), delay: float = 0.0, clean_train: bool = False):
    """Train `params` on its synthetic set prepared under `root` (warm-up, memory init, XBM), writing the run's
    events to root/runs/key/events.jsonl (root/runs/LATEST names it). Returns the trainer.

    Args:
        root: the project folder (data.prepared is relative to it).
        key: the run's folder name.
        params: the run's Params.
        hooks: extra hooks of the XBM phase (a test's recorder).
        delay: seconds to sleep after each step (a live run to watch).
        clean_train: train on the test view (no augmentation), so a recomputation sees the anchors as the trainer.
    """
    import torch

    from xbmcore.data import open_splits, prepare_dataset
    from xbmcore.events import JsonlSink, make_event
    from xbmcore.hooks import Hook
    from xbmcore.models import build_model
    from xbmcore.trainer import Trainer

    torch.manual_seed(params.train.seed)
    splits = open_splits(prepare_dataset(params.data, root, progress=False), params.data)
    if clean_train:
        splits.train.train = False
    runs = root / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    sink = JsonlSink(runs / key / "events.jsonl")
    (runs / "LATEST").write_text(key + "\n")
    t = params.train
    sink.emit(make_event("start", 0, run_id=key, run_key=key, stage="train_xbm", params=params.flat(),
                         total_steps=t.warmup_steps + t.xbm_steps))

    class Sleep(Hook):
        def on_step(self, trainer):
            time.sleep(delay)

    trainer = Trainer(params, build_model(params.model, load_weights=False), splits, sink)
    if delay:
        trainer.hooks.append(Sleep())
    trainer.train_phase("warmup", t.warmup_steps)
    trainer.train_phase("xbm", t.xbm_steps, trainer.init_memory(), hooks=list(hooks))
    sink.emit(make_event("end", trainer.step, status="finished", message=""))
    sink.close()
    return trainer


def _child(root: Path) -> int:
    record_run(root, "memory-demo", demo_params(), delay=0.05)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "memory_tab.png")
    ap.add_argument("--size", default="1600x1000", help="window size WxH in pixels")
    ap.add_argument("--views", type=int, default=10, help="memory views to wait for before the picture")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return _child(args.child)
    from PySide6.QtCore import QSettings
    from PySide6.QtWidgets import QApplication

    from gui.app import MainWindow
    from gui.screenshot import save_window, wait_until
    from gui.theme import apply

    import yaml

    root = Path(tempfile.mkdtemp(prefix="memory_demo_"))
    (root / "params.yaml").write_text(yaml.safe_dump(demo_params().model_dump(mode="json"), sort_keys=False))
    child = subprocess.Popen([sys.executable, "-m", "gui.screenshot_memory", "--child", str(root)],
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        app = QApplication.instance() or QApplication(sys.argv)
        apply(app)
        w, h = (int(v) for v in args.size.split("x"))
        win = MainWindow(root, QSettings(str(root / "settings.ini"), QSettings.Format.IniFormat), retry_s=600)
        win.resize(w, h)
        win.show()
        events = root / "runs" / "memory-demo" / "events.jsonl"
        wait_until(app, events.exists, 300, "the run's events")
        win.follow_run(events)
        win.tabs.setCurrentWidget(win.memory)
        wait_until(app, lambda: len(win.memory.views) >= args.views and win.memory.thumbs, 600,
                   f"{args.views} memory views")
        wait_until(app, lambda: all(i in win.memory.thumbs for i in win.memory.tiles), 60, "the thumbnails")
        save_window(app, win, args.out)
        print(f"wrote {args.out} at step {win.memory.views[-1]['step']} ({len(win.memory.views)} views)")
        win.close()
    finally:
        child.terminate()
        child.wait(30)
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
