"""The outbox relay: sends recorded events to the sink in order and retires the acknowledged.

Events are sent in sequence order, several in flight at once; they leave the outbox only in
that order and only once acknowledged. On a failure the relay stops at the first unacknowledged
event, lets the sink recover (Pub/Sub pauses an ordering key after a failed publish) and sends
again from there after a short back-off, so order per instance holds and an id is never
replaced: a retry may deliver an event twice, always under the same id. An event the sink
refuses for good (`Permanent`) is parked in the store instead, and the queue goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime, timezone
from functools import partial
from typing import Any

from bridge.events import Event, rfc3339
from bridge.metrics import Metrics
from bridge.outage import Outage
from bridge.retry import publish_policy
from bridge.sinks import UNCLASSIFIED, Failures, Permanent, Sink
from bridge.store import Store

log = logging.getLogger("bridge.relay")
WINDOW = 100
ACK_TIMEOUT = 60.0


class Relay:
    """Owns the in-memory copy of the outbox; runs in its own thread. `failures`: how the
    sink's failures are classified and explained (bridge/sinks/)."""

    def __init__(
        self,
        sink: Sink,
        store: Store,
        metrics: Metrics,
        *,
        retry_cap: float = 2.0,
        failures: Failures = UNCLASSIFIED,
    ) -> None:
        self.sink = sink
        self.store = store
        self.metrics = metrics
        self.failures = failures
        self.retry = publish_policy(retry_cap)
        # (seq, event, monotonic time the change was seen, or None when restored from disk)
        self._queue: deque[tuple[int, Event, float | None]] = deque()
        lock = threading.RLock()
        self._cond = threading.Condition(lock)  # work for the relay thread, or stopping
        self._settled = threading.Condition(lock)  # an event left the queue (for `drain`)
        self._stopping = False
        self._publishing = Outage(log, f"sink {sink.name} accepting again", logging.ERROR)
        self._full = Outage(log, level=logging.ERROR)  # ends with the publishing outage
        self._retiring = Outage(log, level=logging.ERROR)  # a store that cannot retire events
        self._busy = False  # the relay thread is sending a batch
        self._early: tuple[int, Any] | None = None  # (seq, future) sent by enqueue itself
        self._since: dict[int, float] = {}  # seq -> monotonic time it entered the outbox
        self.last_failure = ""  # why the sink refused, for /readyz; "" while it accepts
        self._clear_error = True  # the store may hold an error from an earlier run or outage
        self.thread = threading.Thread(target=self._run, name="relay", daemon=True)

    # -- producer side -------------------------------------------------------------------------

    def enqueue(
        self,
        seq: int,
        event: Event,
        seen: float | None,
        dropped: list[int],
        *,
        since: float | None = None,
        retire_later: bool = False,
    ) -> Callable[[], None] | None:
        """Queue a recorded event; `seen` times its latency, `since` (default: `seen` or now)
        its age in the outbox.

        An event the sink acknowledged within `send` (stdout) has left the queue when this
        returns, and this thread retires it too: waking the relay thread for it cost more CPU,
        in hand-offs of the GIL, than the work itself. `retire_later`: the rest of retiring it
        (its log line, its removal from the store) is returned instead, for the caller to run
        once its own work is done."""
        finish = self._queue_and_send(seq, event, seen, dropped, since)
        if finish is None or retire_later:
            return finish
        finish()
        return None

    def _queue_and_send(
        self,
        seq: int,
        event: Event,
        seen: float | None,
        dropped: list[int],
        since: float | None,
    ) -> Callable[[], None] | None:
        with self._cond:
            self._since[seq] = since if since is not None else seen or time.monotonic()
            if dropped:
                gone = set(dropped)
                kept = [item for item in self._queue if item[0] not in gone]
                for seq_gone in gone:
                    self._since.pop(seq_gone, None)
                self._queue.clear()
                self._queue.extend(kept)
                self.metrics.dropped.inc(len(dropped))
                self._full.failed(
                    "full",
                    "outbox full: dropped %d lower-priority events, oldest first; further "
                    "drops are counted in maintenance_bridge_outbox_dropped_total",
                    len(dropped),
                )
            if seq not in set(dropped):
                # Nothing queued or in flight: send it from this thread right away rather than
                # wait for the relay thread to be scheduled (~0.7 ms on a busy machine); the
                # relay still awaits the acknowledgement and retires the event, in order.
                idle = not self._queue and not self._busy and self._early is None
                self._queue.append((seq, event, seen))
                if idle and not self._publishing.failures and not self._stopping:
                    try:
                        future = self.sink.send(event)
                    except Exception:  # the relay sends it again and handles the failure
                        future = None
                    if future is not None and future.done() and future.exception() is None:
                        now = time.monotonic()
                        since = self._dequeue(seq)
                        return partial(self._retired, seq, event, seen, since, now)
                    self._early = (seq, future) if future is not None else None
            self._cond.notify()
        return None

    def depth(self) -> int:
        return len(self._queue)

    def oldest_seen(self) -> float | None:
        with self._cond:
            return self._since.get(self._queue[0][0]) if self._queue else None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def drain(self, timeout: float) -> bool:
        """Wait up to `timeout` for the outbox to empty, then stop; True when it emptied."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue and time.monotonic() < deadline:
                self._settled.wait(min(0.05, max(0.0, deadline - time.monotonic())))
            emptied = not self._queue
            self._stopping = True
            self._cond.notify_all()
        self.thread.join(timeout=1.0)
        return emptied

    # -- the loop -------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                batch = list(self._queue)[:WINDOW]
                self._busy = True
            sent = self._send(batch)
            with self._cond:
                self._busy = False
            if not sent:
                self._backoff()

    def _send(self, batch: list[tuple[int, Event, float | None]]) -> bool:
        """Send a batch and retire its acknowledged prefix; False on the first failure."""
        futures = []
        for seq, event, seen in batch:
            try:
                early, self._early = self._early, None
                future = early[1] if early and early[0] == seq else self.sink.send(event)
                futures.append((seq, event, seen, future))
            except Exception as exc:  # the client refused it outright
                self._failed(event, exc)
                return False
        for seq, event, seen, future in futures:
            try:
                future.result(timeout=ACK_TIMEOUT)
            except Permanent as exc:
                self._park(seq, event, exc)
                return True  # the queue goes on from the next event
            except Exception as exc:
                self._failed(event, exc)
                return False
            self._retire(seq, event, seen)
        return True

    def _retire(self, seq: int, event: Event, seen: float | None) -> None:
        now = time.monotonic()
        self._retired(seq, event, seen, self._dequeue(seq), now)

    def _dequeue(self, seq: int) -> float | None:
        """The acknowledged head leaves the queue; returns when it entered the outbox."""
        with self._cond:
            if self._queue and self._queue[0][0] == seq:
                self._queue.popleft()
            self._settled.notify_all()
            return self._since.pop(seq, None)

    def _retired(
        self, seq: int, event: Event, seen: float | None, since: float | None, now: float
    ) -> None:
        """Count, log and forget an event acknowledged at `now` (monotonic)."""
        if seen is not None:
            self.metrics.latency.observe(now - seen)
        self.metrics.published.inc()
        # One line per event with its id and kind as fields, so logs can be joined with what
        # subscribers saw; latency from the change (or, restored from disk, from recording).
        start = seen if seen is not None else since
        log.log(
            logging.DEBUG if event.kind == "bridge.heartbeat" else logging.INFO,
            "published %s event %s (sequence %d)",
            event.kind,
            event.id,
            event.data.sequence,
            extra={
                "event_id": event.id,
                "kind": event.kind,
                "latency_ms": None if start is None else round((now - start) * 1000, 1),
            },
        )
        if self._publishing.recovered():
            self._full.recovered()
            self.last_failure = ""
            self._clear_error = True
        try:
            self.store.ack(
                seq, event.id, rfc3339(datetime.now(timezone.utc)), clear_error=self._clear_error
            )
        except Exception as exc:  # already published: a later restart may send it again
            self._retiring.failed(
                "store", "could not retire event %s from the outbox: %s", event.id, exc
            )
        else:
            self._retiring.recovered()
            self._clear_error = False

    def _park(self, seq: int, event: Event, exc: Permanent) -> None:
        """Out of the queue and into the store's parked table: every parked event is news."""
        cls = self.failures.class_of(exc)
        self.metrics.publish_failures.labels(cls).inc()
        log.error(
            "parked event %s (%s, sequence %d): %s%s",
            event.id,
            event.kind,
            event.data.sequence,
            exc,
            self.failures.hint(cls),
            extra={"event_id": event.id, "kind": event.kind},
        )
        with self._cond:
            if self._queue and self._queue[0][0] == seq:
                self._queue.popleft()
            self._since.pop(seq, None)
            self._settled.notify_all()
        try:
            self.store.park(seq, exc.status, str(exc), rfc3339(datetime.now(timezone.utc)))
        except Exception as sexc:  # it stays in the outbox: the next start sends it again
            log.error("could not park event %s in the store: %s", event.id, sexc)
        self._recover(event)

    def _failed(self, event: Event, exc: BaseException) -> None:
        cls = self.failures.class_of(exc)
        self.metrics.publish_failures.labels(cls).inc()
        self.last_failure = f"publish {cls}: {exc}"[:500]
        # One line per cause and outage; a follow-up (a paused ordering key) of a failure
        # already logged is not news.
        news = not (cls in self.failures.follow_ups and self._publishing.told)
        told = self._publishing.failed(
            cls,
            "publish of %s failed: %s: %s%s",
            event.id,
            cls,
            exc,
            self.failures.hint(cls),
            news=news,
        )
        if told:
            try:
                self.store.note_error(self.last_failure, rfc3339(datetime.now(timezone.utc)))
            except Exception:
                log.debug("could not note the error in the store", exc_info=True)
        self._recover(event)

    def _recover(self, event: Event) -> None:
        try:
            self.sink.recover(event)
        except Exception as rexc:
            log.warning("sink recovery failed: %s", rexc)

    def _backoff(self) -> None:
        delay = self.retry.delay(self._publishing.failures)
        with self._cond:
            if not self._stopping:
                self._cond.wait(delay)
