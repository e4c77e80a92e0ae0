"""A stand-in training process for the GUI tests: writes a run's events the way the stages do.

    python tests/gui/gui_fake_run.py RUNS_DIR KEY [--warmup N] [--xbm N] [--delay S] [--bad-line]

Writes RUNS_DIR/LATEST (atomically) then RUNS_DIR/KEY/events.jsonl: start, warm-up steps, memory init, XBM steps
with memory filling and drift, an evaluation every --eval-every steps, end. Values follow simple closed forms so
tests can assert what the plots received.
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from pathlib import Path

from xbmcore.events import JsonlSink, make_event

SCRIPT = Path(__file__).resolve()


def step_fields(step: int, phase: str, warmup: int, k: int) -> dict:
    xbm = phase == "xbm"
    t = step - warmup if xbm else 0
    fill = min(1.0, t * 16 / k) if xbm else 0.0
    loss_batch = 0.5 * math.exp(-step / 200) + 0.1
    loss_memory = 0.3 * math.exp(-t / 300) + 0.05 if xbm else 0.0
    return dict(
        phase=phase, loss=loss_batch + loss_memory, loss_batch=loss_batch, loss_memory=loss_memory,
        pos_pairs=48, neg_pairs=192, mem_pos_pairs=int(48 * fill * 10) if xbm else 0,
        mem_neg_pairs=int(2000 * fill) if xbm else 0, memory_fill=fill, memory_size=int(fill * k),
        drift=0.02 * math.exp(-t / 400) if xbm and fill >= 1.0 else None,
        drift_age=float(k / 16) if xbm and fill >= 1.0 else None, lr=1e-3, images_per_s=800.0 + (step % 7),
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs_dir", type=Path)
    ap.add_argument("key")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--xbm", type=int, default=40)
    ap.add_argument("--memory", type=int, default=320)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--delay", type=float, default=0.0)
    ap.add_argument("--bad-line", action="store_true", help="write one malformed line in the middle")
    a = ap.parse_args()

    stop = []
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))  # like the trainer: finish the step, then end
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    run = a.runs_dir / a.key
    run.mkdir(parents=True, exist_ok=True)
    tmp = a.runs_dir / ".LATEST.tmp"
    tmp.write_text(a.key + "\n")
    os.replace(tmp, a.runs_dir / "LATEST")
    sink = JsonlSink(run / "events.jsonl")
    total = a.warmup + a.xbm
    sink.emit(make_event("start", 0, run_id="fake", params={"train.seed": 0}, total_steps=total))
    print(f"fake run {a.key}: {total} steps", flush=True)
    status = "finished"
    step = 0
    for step in range(1, total + 1):  # like the trainer: step n is the state after n optimiser steps
        phase = "warmup" if step <= a.warmup else "xbm"
        if step == 1:
            sink.emit(make_event("phase", 0, phase="warmup", total_steps=a.warmup, start_step=0))
        if step == a.warmup + 1:
            sink.emit(make_event("phase", a.warmup, phase="memory_init", total_steps=0))
            sink.emit(make_event("phase", a.warmup, phase="xbm", total_steps=a.xbm, start_step=a.warmup))
        sink.emit(make_event("step", step, **step_fields(step, phase, a.warmup, a.memory)))
        if a.bad_line and step == total // 2:
            sink._f.write('{"kind": "step", "step": \n')  # a torn line, as after a crash mid-write
            sink._f.flush()
        if a.eval_every and step % a.eval_every == 0:
            sink.emit(make_event("eval", step, phase=phase, split="val",
                                 metrics={"recall@1": 0.3 + 0.4 * step / total, "map@r": 0.1}))
        if stop:
            status = "stopped"
            break
        if a.delay:
            time.sleep(a.delay)
    sink.emit(make_event("end", step, status=status, message=f"fake run {status}"))
    sink.close()
    print(f"fake run {status} at step {step}", flush=True)
    return 0 if status == "finished" else 130


if __name__ == "__main__":
    sys.exit(main())
