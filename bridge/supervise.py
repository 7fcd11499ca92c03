"""Supervised threads: a loop that meets an unexpected exception is restarted, not lost.

A watcher or the relay that dies of a bug would otherwise end a key's watch, or every
delivery, for good while the process looks alive. The supervisor logs the exception once per
run of failures (with its traceback), reports it on /healthz, backs off (doubling, up to
MAX_BACKOFF) and calls the loop again; a loop that then runs for RESET_AFTER counts as
recovered, and its next failure is news again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from bridge.health import Health
from bridge.outage import Outage

log = logging.getLogger("bridge.supervise")
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
RESET_AFTER = 60.0


def supervised_thread(
    name: str,
    loop: Callable[[], None],
    health: Health,
    *,
    finished: Callable[[], bool],
    stop: threading.Event,
) -> threading.Thread:
    """A daemon thread running `loop` under supervision. A return while `finished()` is the
    loop's normal end; any other return or exception is a failure, after which `loop` runs
    again unless `stop` is set during the back-off."""
    return threading.Thread(
        target=_supervise, args=(name, loop, health, finished, stop), name=name, daemon=True
    )


def _supervise(
    name: str,
    loop: Callable[[], None],
    health: Health,
    finished: Callable[[], bool],
    stop: threading.Event,
) -> None:
    outage = Outage(log, f"thread {name} running again")
    failures = 0
    while True:
        started = time.monotonic()
        try:
            loop()
        except Exception as exc:
            why = f"{type(exc).__name__}: {exc}"
            if outage.failed(type(exc).__name__, "thread %s failed: %s", name, why):
                log.error("thread %s: the exception", name, exc_info=exc)
        else:
            if finished():
                return
            why = "its loop ended unexpectedly"
            outage.failed("ended", "thread %s failed: %s", name, why)
        if time.monotonic() - started > RESET_AFTER:
            failures = 0
            outage.recovered()
        failures += 1
        delay = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** (failures - 1))
        health.crashed(name, why)
        log.debug("thread %s restarts in %.1f s", name, delay)
        if stop.wait(delay):
            return
