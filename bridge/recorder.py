"""From an observed value to a recorded event: compare, build, store, hand on.

The one place where the stream meets the store. It keeps the last value of every key and the
next sequence number in memory (loaded from the store at start), so that if the disk fails the
bridge still publishes from memory, loudly, rather than stop telling the fleet.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import uuid
from collections.abc import Callable
from datetime import datetime

from bridge.config import Config
from bridge.events import Event, Instance, Scheduling, Transition, build_event, rfc3339
from bridge.health import Health
from bridge.hooks import Hooks
from bridge.keys import HEARTBEAT_KEY, HEARTBEAT_KIND, KEYS
from bridge.metrics import Metrics
from bridge.relay import Relay
from bridge.store import Snapshot, Store
from bridge.transitions import classify, notice_seconds

log = logging.getLogger("bridge.recorder")
HEARTBEAT = Transition(key=HEARTBEAT_KEY, previous="", current="", kind=HEARTBEAT_KIND)


class Recorder:
    """Serialises observations from every watcher (one lock), so sequence numbers are total."""

    def __init__(
        self,
        config: Config,
        store: Store,
        snapshot: Snapshot,
        instance: Instance,
        scheduling: Scheduling,
        relay: Relay,
        hooks: Hooks,
        health: Health,
        metrics: Metrics,
    ) -> None:
        self.config = config
        self.store = store
        self.instance = instance
        self.scheduling = scheduling
        self.relay = relay
        self.hooks = hooks
        self.health = health
        self.metrics = metrics
        self.values = dict(snapshot.values)
        self.next_sequence = snapshot.next_sequence
        self.stream_id = snapshot.stream_id
        self._lock = threading.Lock()
        # The next event's id, drawn after the previous event went out rather than on the way
        # to the sink: right after an idle wait a random draw costs tens of microseconds.
        self._next_id = str(uuid.uuid4())

    def observe(
        self, key: str, value: str, observed_at: datetime, seen: float, first: bool
    ) -> None:
        """Record `value` of `key`, and its event when it is a transition."""
        with self._lock:
            stored = key in self.values
            transition = classify(key, self.values.get(key, KEYS[key].baseline), value)
            if transition is None:
                if not stored:  # remember the first value, for `status` and the next start
                    self._persist(None, (key, value, rfc3339(observed_at)))
                    self.values[key] = value
                return
            # The first answer after a start: the value may have changed long before. Only a key
            # with a stored value can prove it changed while the bridge was not running; on a
            # first-ever start the baseline is the documented default, not something we saw.
            event = self._build(
                transition, observed_at, at_startup=first, happened_while_down=first and stored
            )
            finish = self._commit(event, seen, (key, value, rfc3339(observed_at)))
            self.values[key] = value
        _log_recorded(event, transition)
        self._after(event, finish)

    def heartbeat(self, now: datetime, seen: float) -> None:
        with self._lock:
            event = self._build(HEARTBEAT, now, at_startup=False, happened_while_down=False)
            finish = self._commit(event, seen, None)
        self.metrics.events.labels(event.kind).inc()
        if finish is not None:
            finish()
        self._draw_id()

    def _build(
        self,
        transition: Transition,
        observed_at: datetime,
        *,
        at_startup: bool,
        happened_while_down: bool,
    ) -> Event:
        return build_event(
            transition,
            event_id=self._take_id(),
            sequence=self.next_sequence,
            observed_at=observed_at,
            instance=self.instance,
            scheduling=self.scheduling,
            happened_while_down=happened_while_down,
            notice_seconds=notice_seconds(transition),
            type_prefix=self.config.type_prefix,
            at_startup=at_startup,
            stream_id=self.stream_id,
        )

    def _take_id(self) -> str:
        taken, self._next_id = self._next_id, ""
        return taken or str(uuid.uuid4())

    def _commit(
        self, event: Event, seen: float, state: tuple[str, str, str] | None
    ) -> Callable[[], None] | None:
        """Store, number and send; returns what is left of retiring it (see Relay.enqueue)."""
        dropped = self._persist(event, state)
        self.next_sequence += 1
        return self.relay.enqueue(event.data.sequence, event, seen, dropped, retire_later=True)

    def _persist(self, event: Event | None, state: tuple[str, str, str] | None) -> list[int]:
        try:
            dropped = self.store.record(event, state)
        except sqlite3.Error as exc:
            self.metrics.store_errors.inc()
            if not self.health.store_error:
                log.critical(
                    "state store %s not writable (%s): publishing from memory only; "
                    "a restart now would lose what is not yet published",
                    self.store.path,
                    exc,
                )
            self.health.store_failed(str(exc))
            return []
        if self.health.store_error:
            log.warning("state store writable again")
            self.health.store_ok()
        return dropped

    def _after(self, event: Event, finish: Callable[[], None] | None) -> None:
        """Off the path to the sink: counted, handed to the hooks, retired if it was at once
        (after the recorded line, so that the log reads recorded, then published)."""
        self.metrics.events.labels(event.kind).inc()
        self.metrics.last_change.set_to_current_time()
        try:
            self.hooks.dispatch(event)
        finally:
            if finish is not None:
                finish()
            self._draw_id()

    def _draw_id(self) -> None:
        fresh = str(uuid.uuid4())
        with self._lock:
            self._next_id = self._next_id or fresh


def _log_recorded(event: Event, transition: Transition) -> None:
    log.info(
        "%s: %s -> %s (event %s, sequence %d%s)",
        event.kind,
        transition.previous or "(nothing)",
        transition.current or "(nothing)",
        event.id,
        event.data.sequence,
        ", happened while the bridge was down"
        if event.data.happened_while_down
        else ", already on at start"
        if event.data.at_startup
        else "",
        extra={"event_id": event.id, "kind": event.kind},
    )
