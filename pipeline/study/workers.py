"""Who runs a trial, whether it is still alive, and failing the trials of dead workers.

Optuna's own heartbeat exists for RDB storages only; this one is kept in a trial user attribute, so it works the
same on SQLite, server databases and journal files. A worker on this host is checked by process id (and the
process start time, so a recycled pid does not pass for the dead worker), which fails a killed worker's trial
at once instead of after `stale_after_s`.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

log = logging.getLogger(__name__)

WORKER_ATTR = "xbm.worker"
HEARTBEAT_ATTR = "xbm.heartbeat"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> int | None:
    """Process start time in clock ticks since boot (field 22 of /proc/<pid>/stat); None if not running."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    if fields[0] == "Z":  # a zombie is dead; only its parent has not reaped it yet
        return None
    return int(fields[19])


def this_worker() -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "boot": _boot_id(), "pid": pid, "start": _start_ticks(pid)}


def is_dead(worker: dict[str, Any] | None) -> bool | None:
    """True/False for a worker on this host (same boot), None when it cannot be told from here."""
    if not worker:
        return None
    me = this_worker()
    if worker.get("host") != me["host"]:
        return None
    if worker.get("boot") != me["boot"]:
        return True  # the host rebooted since the trial started
    ticks = _start_ticks(int(worker["pid"]))
    if ticks is None:
        return True
    return worker.get("start") is not None and ticks != worker["start"]


class Heartbeat:
    """Writes the time into the trial every `interval` seconds while the trial runs (a daemon thread)."""

    def __init__(self, trial: optuna.Trial, interval: float):
        self.trial, self.interval = trial, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="optuna-heartbeat", daemon=True)

    def _beat(self) -> None:
        while True:
            try:
                self.trial.set_user_attr(HEARTBEAT_ATTR, time.time())
            except Exception as err:  # a busy database must not kill the trial; the next beat retries
                log.warning("heartbeat of trial %d not written: %s", self.trial.number, err)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> "Heartbeat":
        self.trial.set_user_attr(WORKER_ATTR, this_worker())
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def fail_stale_trials(study: optuna.Study, stale_after_s: float) -> list[optuna.trial.FrozenTrial]:
    """Mark FAILED the RUNNING trials whose worker is dead (this host) or silent for `stale_after_s` (any host).

    Returns the trials failed here (as they were). Another worker failing the same trial at the same moment is
    not an error (the trial is then already finished).
    """
    failed = []
    now = time.time()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        dead = is_dead(t.user_attrs.get(WORKER_ATTR))
        last = t.user_attrs.get(HEARTBEAT_ATTR)
        if last is None and t.datetime_start is not None:
            last = t.datetime_start.timestamp()
        silent = last is not None and now - last > stale_after_s
        if dead or (dead is None and silent):
            try:
                study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            except UpdateFinishedTrialError:  # finished by another worker in the meantime
                continue
            failed.append(t)
            log.warning("trial %d was left RUNNING by a %s worker: marked FAILED", t.number,
                        "dead" if dead else "silent")
    return failed
