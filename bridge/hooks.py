"""Local actions: `--exec` commands run for each event, beside (never before) publishing.

A hook starts the moment its event is recorded, on a bounded pool of its own: a hook that
hangs is killed at its timeout, one that fails is logged and counted, and a flood of events
past the pool's queue is counted as dropped rather than piling up threads or delaying the
publish path. When the bridge stops, hooks still running are killed (their process groups),
each said in the log: a hook must not hold the bridge past its service's stop timeout.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from bridge.events import Event
from bridge.metrics import Metrics

log = logging.getLogger("bridge.hooks")
MAX_QUEUED = 64


@dataclass(frozen=True)
class Hook:
    """A command, optionally limited to kinds starting with `kinds` (e.g. `maintenance.`)."""

    command: str
    kinds: str = ""

    @classmethod
    def parse(cls, spec: str) -> Hook:
        """`KIND_PREFIX=CMD` or `CMD`; a head with a space or a path start is part of `CMD`."""
        head, sep, rest = spec.partition("=")
        if sep and head and " " not in head and not head.startswith(("/", ".")):
            return cls(command=rest.strip(), kinds=head.strip())
        return cls(command=spec.strip())

    def matches(self, event: Event) -> bool:
        return event.kind.startswith(self.kinds)


def hook_environment(event: Event, base: Mapping[str, str]) -> dict[str, str]:
    """The event's main fields as variables, on top of the bridge's own environment."""
    data = event.data
    env = dict(base)
    env.update(
        {
            "CE_ID": event.id,
            "CE_TYPE": event.type,
            "CE_SOURCE": event.source,
            "CE_SUBJECT": event.subject,
            "CE_TIME": event.time,
            "BRIDGE_KIND": event.kind,
            "BRIDGE_KEY": data.key,
            "BRIDGE_PREVIOUS": data.previous,
            "BRIDGE_CURRENT": data.current,
            "BRIDGE_NOTICE_SECONDS": ""
            if data.notice_seconds is None
            else str(data.notice_seconds),
            "BRIDGE_HAPPENED_WHILE_DOWN": "true" if data.happened_while_down else "false",
            "BRIDGE_INSTANCE_ID": data.instance.id,
            "BRIDGE_INSTANCE_NAME": data.instance.name,
            "BRIDGE_ZONE": data.instance.zone,
        }
    )
    return env


class Hooks:
    """Runs the configured hooks; `dispatch` never blocks the caller."""

    def __init__(
        self,
        specs: tuple[str, ...],
        timeout: float,
        metrics: Metrics,
        environ: Mapping[str, str],
        workers: int = 4,
    ) -> None:
        self.hooks = [Hook.parse(spec) for spec in specs]
        self.timeout = timeout
        self.metrics = metrics
        self.environ = dict(environ)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hook")
        self._slots = threading.BoundedSemaphore(MAX_QUEUED)
        self._running: dict[subprocess.Popen[bytes], str] = {}  # process -> what it runs for
        self._closed = False
        self._lock = threading.Lock()

    def dispatch(self, event: Event) -> None:
        for hook in self.hooks:
            if not hook.matches(event):
                continue
            if not self._slots.acquire(blocking=False):
                self.metrics.hook_runs.labels("dropped").inc()
                log.error(
                    "hook %r dropped for event %s: %d runs already queued",
                    hook.command,
                    event.id,
                    MAX_QUEUED,
                )
                continue
            try:
                self._pool.submit(self._run, hook, event)
            except RuntimeError:  # closed: an event recorded while the bridge stops
                self._slots.release()
                self.metrics.hook_runs.labels("dropped").inc()
                log.warning(
                    "hook %r not run for event %s: the bridge is stopping", hook.command, event.id
                )

    def close(self) -> None:
        """No more runs; the queued are dropped and the running killed, said in the log."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            self._closed = True
            running = list(self._running.items())
        posix = sys.platform != "win32"
        for proc, what in running:
            log.warning("hook %s killed: the bridge is stopping", what)
            _kill(proc, posix, reap=False)
        self._pool.shutdown(wait=True)

    def _run(self, hook: Hook, event: Event) -> None:
        started = time.monotonic()
        try:
            result, code = self._execute(hook, event)
        except Exception as exc:  # a hook that cannot start must not take the bridge down
            result, code = "error", None
            log.error("hook %r could not run: %s", hook.command, exc)
        finally:
            self._slots.release()
        took = time.monotonic() - started
        self.metrics.hook_runs.labels(result).inc()
        level = logging.INFO if result == "ok" else logging.WARNING
        log.log(
            level,
            "hook %r for %s %s: %s (exit %s) in %.3f s",
            hook.command,
            event.kind,
            event.id,
            result,
            code,
            took,
        )

    def _execute(self, hook: Hook, event: Event) -> tuple[str, int | None]:
        posix = sys.platform != "win32"
        args = shlex.split(hook.command, posix=posix) if posix else hook.command
        with self._lock:
            if self._closed:
                return "dropped", None
            proc = subprocess.Popen(
                args,
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=hook_environment(event, self.environ),
                start_new_session=posix,  # its own process group: a kill reaches its children
            )
            self._running[proc] = f"{hook.command!r} for event {event.id}"
        try:
            proc.communicate(event.structured, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            _kill(proc, posix)
            return "timeout", None
        except BrokenPipeError:  # the hook did not read stdin: fine
            proc.wait(timeout=self.timeout)
        finally:
            with self._lock:
                self._running.pop(proc, None)
                killed = self._closed
        if killed and proc.returncode is not None and proc.returncode < 0:
            return "killed", proc.returncode
        return ("ok" if proc.returncode == 0 else "failed"), proc.returncode


def _kill(proc: subprocess.Popen[bytes], posix: bool, *, reap: bool = True) -> None:
    """Kill the hook and its process group; `reap`: wait for it (else its runner does)."""
    if posix:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, 9)
    else:
        proc.kill()
    if reap:
        proc.wait()
