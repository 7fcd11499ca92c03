"""An in-memory sink: what the relay sent, from which thread, and what it acknowledged.

It acknowledges at once by default; `hold=True` keeps every future open until the test calls
`ack`, which is how a test sees what the relay does while events are in flight. `fail` makes
every send fail with that exception (a sink outage) until it is set back to None.

Like every sink it owns its failure classification (`FAILURES`, given to the relay): its own
exception types, nothing of Pub/Sub, so a test shows that the relay needs nothing more.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from bridge.events import Event
from bridge.sinks import OTHER, Failures


class SinkDown(Exception):
    """The sink cannot be reached: class `unavailable`."""


class SinkDenied(Exception):
    """The sink refuses this bridge: class `permission`, with a hint saying what to fix."""


class SinkPaused(Exception):
    """The sink refuses until it recovers from an earlier failure: class `paused`, a
    follow-up (not news when another failure of the same outage was already told)."""


_CLASSES = {SinkDown: "unavailable", SinkDenied: "permission", SinkPaused: "paused"}
DENIED_HINT = " (grant the bridge access; events wait in the outbox)"


def _classify(exc: BaseException) -> str:
    return next((cls for kind, cls in _CLASSES.items() if isinstance(exc, kind)), OTHER)


def _hint(failure_class: str) -> str:
    return DENIED_HINT if failure_class == "permission" else ""


FAILURES = Failures(
    classes=(*_CLASSES.values(), OTHER),
    classify=_classify,
    hint=_hint,
    follow_ups=frozenset({"paused"}),
)


@dataclass(frozen=True)
class Send:
    """One call of `send`: the event, the calling thread's name, and when (monotonic)."""

    event: Event
    thread: str
    at: float


class MemorySink:
    name = "memory"

    def __init__(self, *, hold: bool = False) -> None:
        self.hold = hold
        self.fail: BaseException | None = None
        self.sends: list[Send] = []  # every attempt, retries and duplicates included
        self.acked: list[Event] = []  # in the order their futures resolved successfully
        self.recovered: list[str] = []  # ids `recover` was called with
        self._held: list[tuple[Event, Future[str]]] = []
        self._cond = threading.Condition()

    def send(self, event: Event) -> Future[str]:
        future: Future[str] = Future()
        with self._cond:
            self.sends.append(Send(event, threading.current_thread().name, time.monotonic()))
            failure = self.fail
            if failure is None and self.hold:
                self._held.append((event, future))
            elif failure is None:
                self.acked.append(event)
            self._cond.notify_all()
        if failure is not None:
            future.set_exception(failure)
        elif not self.hold:
            future.set_result(event.id)
        return future

    def ack(self, *sequences: int) -> None:
        """Acknowledge the held sends of these sequence numbers (all held ones if none given)."""
        with self._cond:
            chosen = [
                (e, f) for e, f in self._held if not sequences or e.data.sequence in sequences
            ]
            self._held = [item for item in self._held if item not in chosen]
            self.acked.extend(e for e, _ in chosen)
            self._cond.notify_all()
        for event, future in chosen:
            future.set_result(event.id)

    def recover(self, event: Event) -> None:
        with self._cond:
            self.recovered.append(event.id)

    def close(self) -> None:
        return None

    def wait(self, what: str, predicate: Callable[[MemorySink], Any], timeout: float = 10.0) -> Any:
        """Block until `predicate(self)` is truthy (checked on every send and ack)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not (value := predicate(self)):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
                self._cond.wait(left)
            return value

    def events(self, key: str | None = None) -> list[Event]:
        """The acknowledged events (of one metadata key if given), in acknowledgement order."""
        with self._cond:
            return [e for e in self.acked if key is None or e.data.key == key]

    def sent_ids(self) -> list[str]:
        with self._cond:
            return [s.event.id for s in self.sends]

    def acked_ids(self) -> list[str]:
        with self._cond:
            return [e.id for e in self.acked]
