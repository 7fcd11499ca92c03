"""From an observed value to a recorded event: compare, build, store, hand on.

The one place where the stream meets the store. It keeps the last value of every key and the
next sequence number in memory (loaded from the store at start), so that if the disk fails the
bridge still publishes from memory, loudly, rather than stop telling the fleet.
"""

from __future__ import annotations

import logging
import threading
import uuid
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
STORE_RETRY = 1.0  # seconds between attempts to write what the store refused
State = tuple[str, str, str]  # (key, value, observed_at) as the store keeps it
HEARTBEAT = Transition(key=HEARTBEAT_KEY, previous="", current="", kind=HEARTBEAT_KIND)


class Recorder:
    """Serialises observations from every watcher (one lock), so sequence numbers are total.

    The lock covers the store write and the bookkeeping of values and sequence numbers, and
    the hand-off to the relay's queue (an append: the queue's order is the sequence order);
    never a send, a hook or a log line. What could not be written while the store refused
    (a full disk) is kept and written as soon as a write succeeds: `retry_store`, on a timer.
    """

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
        # Published from memory, not yet in the store: events by seq, values by key.
        self._unwritten: dict[int, Event] = {}
        self._unwritten_states: dict[str, State] = {}

    def observe(
        self, key: str, value: str, observed_at: datetime, seen: float, first: bool
    ) -> None:
        """Record `value` of `key`, and its event when it is a transition."""
        value = storable(value)
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
            self._commit(event, seen, (key, value, rfc3339(observed_at)))
            self.values[key] = value
        self.relay.handed(event.data.sequence)  # the send first, then the rest of the work
        _log_recorded(event, transition)
        self.metrics.last_change.set_to_current_time()
        self._after(event)

    def heartbeat(self, now: datetime, seen: float) -> None:
        with self._lock:
            event = self._build(HEARTBEAT, now, at_startup=False, happened_while_down=False)
            self._commit(event, seen, None)
        self.metrics.events.labels(event.kind).inc()  # counted; no hook runs for a heartbeat
        self._draw_id()

    def retry_store(self) -> None:
        """Write what the store refused earlier, if anything (the daemon calls this on a
        timer): health turns green the moment the store takes it, without a new transition."""
        if not self.health.store_error and not self._unwritten and not self._unwritten_states:
            return
        with self._lock:
            self._rewrite()

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

    def _commit(self, event: Event, seen: float, state: State | None) -> None:
        """Store, number and hand to the relay (which sends and retires it, on its thread)."""
        dropped = self._persist(event, state)
        self.next_sequence += 1
        self.relay.enqueue(event.data.sequence, event, seen, dropped)

    def _persist(self, event: Event | None, state: State | None) -> list[int]:
        try:
            dropped = self.store.record(event, state)
        except Exception as exc:  # sqlite3.Error, or a value the store cannot take
            self._unwritable(exc)
            if event is not None:
                self._unwritten[event.data.sequence] = event
            if state is not None:
                self._unwritten_states[state[0]] = state
            return []
        if state is not None:  # newer than what waits to be written for the key
            self._unwritten_states.pop(state[0], None)
        if self.health.store_error or self._unwritten or self._unwritten_states:
            self._rewrite()
        return dropped

    def _rewrite(self) -> None:
        """Under the lock: what was published from memory goes into the store, each event
        under its own seq and id (only those still waiting for the sink: one already
        published must not go out again after a restart), with the values and the counter."""
        waiting = self.relay.queued(sorted(self._unwritten))
        # Those published meanwhile need no row: forgotten now, so that a long outage of the
        # disk holds in memory only what the sink has not taken either.
        self._unwritten = {seq: self._unwritten[seq] for seq in waiting}
        try:
            self.store.rewrite(
                [self._unwritten[seq] for seq in waiting],
                list(self._unwritten_states.values()),
                self.next_sequence,
            )
            # Published while being written: its row goes again (the relay's retirement may
            # have come before the row).
            still = set(self.relay.queued(waiting))
            gone = [seq for seq in waiting if seq not in still]
            self.store.forget(gone)
        except Exception as exc:
            self._unwritable(exc)
            return
        values = len(self._unwritten_states)
        self._unwritten.clear()
        self._unwritten_states.clear()
        if self.health.store_error:
            log.warning(
                "state store writable again: %d values and %d events still waiting for the "
                "sink written",
                values,
                len(waiting),
            )
            self.health.store_ok()

    def _unwritable(self, exc: Exception) -> None:
        self.metrics.store_errors.inc()
        if not self.health.store_error:
            log.critical(
                "state store %s not writable (%s): publishing from memory only, writing it "
                "again every %.0f s; a restart now would lose what is not yet published",
                self.store.path,
                exc,
                STORE_RETRY,
            )
        self.health.store_failed(str(exc) or type(exc).__name__)

    def _after(self, event: Event) -> None:
        """Off the lock and off the path to the sink: counted, handed to the hooks."""
        self.metrics.events.labels(event.kind).inc()
        try:
            self.hooks.dispatch(event)
        finally:
            self._draw_id()

    def _draw_id(self) -> None:
        fresh = str(uuid.uuid4())
        with self._lock:
            self._next_id = self._next_id or fresh


def storable(value: str) -> str:
    """`value` as the store and every sink can hold it: a lone surrogate (JSON `"\\ud800"`
    decodes to one) cannot be encoded as UTF-8, so it is kept backslash-escaped (`\\ud800`,
    as the server wrote it), in memory, in the store and in the event alike."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode()
    return value


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
