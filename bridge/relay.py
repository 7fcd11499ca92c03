"""The outbox relay: sends recorded events to the sink in order and retires the acknowledged.

One thread, the relay's own, calls the sink and retires: the recorder only appends to the
queue and wakes it (a Condition), so a sink that blocks (stdout into a full pipe) delays
delivery and nothing else, and which thread does what never depends on timing. The relay's
lock is held for queue bookkeeping only, never across a send, a wait or a store write.

Events are sent in sequence order, several in flight at once; they leave the outbox only in
that order and only once acknowledged. On a failure the relay stops at the first unacknowledged
event, lets the sink recover (Pub/Sub pauses an ordering key after a failed publish) and sends
again from there after a short back-off, so order per instance holds and an id is never
replaced: a retry may deliver an event twice, always under the same id. An event the sink
refuses for good (`Permanent`) is parked in the store instead, and the queue goes on.
Heartbeats left waiting behind a newer one (after an outage) are coalesced: only the newest
goes out.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from datetime import datetime, timezone

from bridge.events import Event, rfc3339
from bridge.keys import HEARTBEAT_KIND
from bridge.metrics import Metrics
from bridge.outage import Outage
from bridge.retry import publish_policy
from bridge.sinks import UNCLASSIFIED, Failures, Permanent, Sink
from bridge.store import Store

log = logging.getLogger("bridge.relay")
WINDOW = 100
ACK_TIMEOUT = 60.0
SEND_STUCK = 2.0  # a `send` (not its acknowledgement) taking longer is a blocked sink
RETIRE_RETRY = 1.0  # how often retirements the store refused are tried again
HANDOFF_WAIT = 0.002  # the longest the recording thread lets the relay thread go first
AWAIT_SLICE = 0.1  # an acknowledgement is awaited in slices this long, to see a drain end

Item = tuple[int, Event, float | None]  # (seq, event, monotonic time the change was seen)


class _DrainOver(Exception):
    """The drain's deadline passed with this acknowledgement still awaited."""


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
        self._queue: deque[Item] = deque()
        lock = threading.Lock()
        self._cond = threading.Condition(lock)  # work for the relay thread, or stopping
        self._settled = threading.Condition(lock)  # an event left the queue (for `drain`)
        self._taken = threading.Condition(lock)  # the relay thread called send (`handed`)
        self._idle = False  # the relay thread waits for work
        self._sent_upto = 0  # the highest seq whose send was called
        self._stopping = False
        self._deadline = float("inf")  # monotonic: while stopping, no ack is awaited past it
        self._heartbeats = 0  # heartbeats in the queue: more than one, and the older go
        self._since: dict[int, float] = {}  # seq -> monotonic time it entered the outbox
        # Touched by the relay thread only (the failure bookkeeping needs no lock).
        self._publishing = Outage(log, f"sink {sink.name} accepting again", logging.ERROR)
        self._full = Outage(log, level=logging.ERROR)  # ends with the publishing outage
        self._retiring = Outage(log, level=logging.ERROR)  # a store that cannot retire events
        self._unretired: list[tuple[int, str]] = []  # acknowledged, the store refused to retire
        self._clear_error = True  # the store may hold an error from an earlier run or outage
        self._sending_since: float | None = None  # monotonic start of a `send` in progress
        self.last_failure = ""  # why the sink refused, for /readyz; "" while it accepts
        self.parked = 0  # events parked in the store (the daemon sets it from the store)
        self.thread = threading.Thread(target=self.run, name="relay", daemon=True)

    # -- producer side -------------------------------------------------------------------------

    def enqueue(
        self,
        seq: int,
        event: Event,
        seen: float | None,
        dropped: list[int],
        *,
        since: float | None = None,
    ) -> None:
        """Queue a recorded event and wake the relay thread; never blocks on the sink.
        `seen` times its latency, `since` (default: `seen` or now) its age in the outbox;
        `dropped`: outbox seqs the store dropped to keep within its bound."""
        with self._cond:
            if dropped:
                self._forget(set(dropped))
                self.metrics.dropped.inc(len(dropped))
                self._full.failed(
                    "full",
                    "outbox full: dropped %d lower-priority events, oldest first; further "
                    "drops are counted in maintenance_bridge_outbox_dropped_total",
                    len(dropped),
                )
                if seq in dropped:
                    return
            self._since[seq] = since if since is not None else seen or time.monotonic()
            self._queue.append((seq, event, seen))
            if event.kind == HEARTBEAT_KIND:
                self._heartbeats += 1
            self._cond.notify()

    def handed(self, seq: int) -> None:
        """Let the relay thread run first: if it is about to send `seq` (it was idle, or
        `seq` heads the queue), wait until it has called send, at most HANDOFF_WAIT.

        Without this pause the recording thread goes on (its log line, the hooks, the next
        long-poll) holding the GIL while the woken relay thread waits for it: 0.4-0.6 ms
        more per change at p50, measured. Only the pause depends on timing, never who sends;
        a sink blocked in send or backing off costs no pause (`seq` is not at the head). A
        sink whose send is the whole exchange (REST Pub/Sub, a token fetched first with
        --attest on) holds the recording thread the full HANDOFF_WAIT: its hooks and next
        long-poll start 2 ms later, and the exchange has the GIL to itself meanwhile."""
        with self._cond:
            if self._idle or (self._sent_upto < seq and self._queue and self._queue[0][0] == seq):
                self._taken.wait_for(lambda: self._sent_upto >= seq or self._stopping, HANDOFF_WAIT)

    def depth(self) -> int:
        return len(self._queue)

    def oldest_seen(self) -> float | None:
        with self._cond:
            return self._since.get(self._queue[0][0]) if self._queue else None

    def queued(self, seqs: list[int]) -> list[int]:
        """Those of `seqs` still waiting for the sink."""
        with self._cond:
            waiting = {item[0] for item in self._queue}
        return [seq for seq in seqs if seq in waiting]

    def stuck(self, now: float) -> str:
        """Why the sink takes nothing at all, for /readyz: its `send` blocking (stdout into a
        pipe nobody reads) for more than SEND_STUCK; "" when it is not."""
        since = self._sending_since
        if since is None or now - since < SEND_STUCK:
            return ""
        return f"sink {self.sink.name} blocked in send for {now - since:.0f} s"

    def unparked(self, count: int) -> None:
        """`count` parked events went back into the outbox (redrive)."""
        with self._cond:
            self.parked = max(0, self.parked - count)

    @property
    def stopping(self) -> bool:
        return self._stopping

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def drain(self, timeout: float) -> bool:
        """Wait up to `timeout` for the outbox to empty, then stop: acknowledgements that
        came by then are retired by the relay thread before it ends; True when it emptied."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._deadline = deadline
            while self._queue and time.monotonic() < deadline:
                self._settled.wait(min(0.05, max(0.0, deadline - time.monotonic())))
            emptied = not self._queue
            self._stopping = True
            self._cond.notify_all()
        # A relay blocked in `send` cannot be interrupted: the caller goes on without it.
        if self.thread.is_alive():
            self.thread.join(timeout=max(0.0, deadline - time.monotonic()) + 1.0)
        return emptied

    @property
    def stopped(self) -> bool:
        """True once the relay thread has ended (or never started)."""
        return not self.thread.is_alive()

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> None:
        """The relay thread's loop, until `drain`; an unexpected exception propagates (the
        daemon's supervisor logs it and calls this again)."""
        while True:
            with self._cond:
                while not self._stopping and not self._queue:
                    self._idle = True
                    self._cond.wait(RETIRE_RETRY if self._unretired else None)
                    if self._unretired:
                        break
                self._idle = False
                if self._stopping:
                    break
                stale = self._stale_heartbeats() if self._heartbeats > 1 else set()
                batch = [] if stale else list(itertools.islice(self._queue, WINDOW))
            if stale:
                self._coalesce(stale)
                continue
            self._retry_retirements()
            if batch and not self._send(batch):
                self._backoff()
        # A retirement the store refused (a full disk, freed since) is tried once more: left
        # in the outbox, the acknowledged event would go out again at the next start.
        self._retry_retirements()

    def _send(self, batch: list[Item]) -> bool:
        """Send a batch and retire its acknowledged prefix; False on the first failure."""
        futures: list[tuple[int, Event, float | None, Future[str]]] = []
        for seq, event, seen in batch:
            self._sending_since = time.monotonic()
            try:
                futures.append((seq, event, seen, self.sink.send(event)))
            except Exception as exc:  # the client refused it outright
                self._failed(event, exc)
                return False
            finally:
                self._sending_since = None
            if seq > self._sent_upto:
                with self._cond:
                    self._sent_upto = seq
                    self._taken.notify_all()
        for seq, event, seen, future in futures:
            try:
                self._await(future)
            except Permanent as exc:
                self._park(seq, event, exc)
                return True  # the queue goes on from the next event
            except _DrainOver:  # not acknowledged within --drain-timeout: the next start's
                return False
            except Exception as exc:
                self._failed(event, exc)
                return False
            self._retire(seq, event, seen)
        return True

    def _await(self, future: Future[str]) -> None:
        """The acknowledgement, within ACK_TIMEOUT; looked at in short slices so that a drain
        that runs out is seen at once (_DrainOver)."""
        end = time.monotonic() + ACK_TIMEOUT
        while True:
            now = time.monotonic()
            if now >= self._deadline and not future.done():
                raise _DrainOver
            try:
                future.result(timeout=max(0.0, min(AWAIT_SLICE, end - now)))
                return
            except TimeoutError:
                if future.done() or time.monotonic() >= end:
                    raise

    def _retire(self, seq: int, event: Event, seen: float | None) -> None:
        """Count, log and forget an acknowledged event; its outbox row goes too."""
        now = time.monotonic()
        with self._cond:
            if self._queue and self._queue[0][0] == seq:
                self._queue.popleft()
                if event.kind == HEARTBEAT_KIND:
                    self._heartbeats -= 1
            since = self._since.pop(seq, None)
            self._settled.notify_all()
        if seen is not None:
            self.metrics.latency.observe(now - seen)
        self.metrics.published.inc()
        # One line per event with its id and kind as fields, so logs can be joined with what
        # subscribers saw; latency from the change (or, restored from disk, from recording).
        start = seen if seen is not None else since
        log.log(
            logging.DEBUG if event.kind == HEARTBEAT_KIND else logging.INFO,
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
        if self._ack(seq, event.id):
            self._clear_error = False
        else:
            self._unretired.append((seq, event.id))

    def _ack(self, seq: int, event_id: str) -> bool:
        try:
            self.store.ack(
                seq, event_id, rfc3339(datetime.now(timezone.utc)), clear_error=self._clear_error
            )
        except Exception as exc:  # already published: retried, else a restart sends it again
            self._retiring.failed(
                "store", "could not retire event %s from the outbox: %s", event_id, exc
            )
            return False
        if self._retiring.recovered():
            log.warning("retiring events from the outbox again")
        return True

    def _retry_retirements(self) -> None:
        """Retire, in order, what the store refused to retire earlier (a full disk)."""
        while self._unretired and self._ack(*self._unretired[0]):
            self._unretired.pop(0)

    def _stale_heartbeats(self) -> set[int]:
        """Under the lock: every queued heartbeat but the newest."""
        beats = [seq for seq, event, _ in self._queue if event.kind == HEARTBEAT_KIND]
        return set(beats[:-1])

    def _coalesce(self, stale: set[int]) -> None:
        """Stale heartbeats leave the outbox, then the queue: after an outage a backlog of
        them would only hold up the rest (a notice above all)."""
        try:
            self.store.forget(sorted(stale))
        except Exception as exc:  # they stay, and go out: better than a store out of step
            log.warning("could not coalesce %d stale heartbeats: %s", len(stale), exc)
            with self._cond:
                self._heartbeats = 1  # not tried again until the next heartbeat
            return
        with self._cond:
            self._forget(stale)
        log.info("coalesced %d stale heartbeats into the newest", len(stale))

    def _forget(self, gone: set[int]) -> None:
        """Under the lock: these seqs leave the in-memory queue."""
        kept = [item for item in self._queue if item[0] not in gone]
        self._heartbeats = sum(1 for _, event, _ in kept if event.kind == HEARTBEAT_KIND)
        for seq in gone:
            self._since.pop(seq, None)
        self._queue.clear()
        self._queue.extend(kept)
        self._settled.notify_all()

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
            self._forget({seq})
            self.parked += 1
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
