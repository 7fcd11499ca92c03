"""One long-poll loop per watched key.

Each loop hangs on its own key (`wait_for_change` + `last_etag`), so a change is seen the moment
the server answers, and querying `instance/maintenance-event` itself on every round keeps the
60 s migration warning armed (the server skips it unless the key was queried since the last
event). Errors are retried every few tens of milliseconds at first, then with back-off
(bridge/retry.py); a key that answers at once instead of hanging (404, the 'no notifications'
503, a missing ETag) is asked again only after a pause, never in a tight loop.

While any watched key says a notice is on (`NoticeBoard`), every watcher asks with a short
`timeout_sec` and a client deadline just above it: a poll the server took and will never answer
(its request lost in a migration) then costs seconds, not the minute a calm poll waits. In calm
each key is asked once a minute (`poll_timeout`), and the moment a notice comes on the other
watchers' calm polls are cut short so that they re-ask at the short pace at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timezone

import tenacity

from bridge.config import Config
from bridge.health import Health
from bridge.keys import KEYS
from bridge.metadata import CLIENT_SLACK, MetadataClient, MetadataError, Reading
from bridge.metrics import Metrics
from bridge.outage import Outage
from bridge.retry import metadata_policy
from bridge.supervise import supervised_thread
from bridge.transitions import is_notice

log = logging.getLogger("bridge.watcher")

# observe(key, canonical value, wall-clock time of the answer, monotonic time, first reading)
Observer = Callable[[str, str, datetime, float, bool], None]
NO_ETAG_PAUSE = 1.0
# While a notice is on: the server's timeout_sec and how much longer the client waits. A frozen
# poll then blinds a key for NOTICE_POLL + NOTICE_SLACK = 13 s at most (the target is 15 s).
NOTICE_POLL = 10
NOTICE_SLACK = 3.0


class NoticeBoard:
    """Which watched keys say a disruption is near, from the values the watchers read; one
    shared by all the watchers of a bridge (the daemon makes it), so that each can pace its
    polls by every key's news without reaching into the recorder."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._on: set[str] = set()
        self._watchers: list[Watcher] = []

    @property
    def on(self) -> bool:
        with self._lock:
            return bool(self._on)

    def join(self, watcher: Watcher) -> None:
        with self._lock:
            self._watchers.append(watcher)

    def update(self, key: str, value: str) -> None:
        """`key` now reads (canonical) `value`: when that turns the first notice on, the other
        watchers re-ask at once with the short timeout instead of finishing a calm poll."""
        with self._lock:
            was = bool(self._on)
            if is_notice(key, value):
                self._on.add(key)
            else:
                self._on.discard(key)
            hurry = [w for w in self._watchers if w.key != key] if self._on and not was else []
        for watcher in hurry:
            watcher.hurry()


class _Stopped(Exception):
    """Raised from the back-off sleep when the bridge is shutting down."""


class Watcher:
    """Watches one key until `stop` is set; runs in its own thread."""

    def __init__(
        self,
        key: str,
        config: Config,
        observe: Observer,
        stop: threading.Event,
        health: Health,
        metrics: Metrics,
        first: Reading | None = None,
        board: NoticeBoard | None = None,
    ) -> None:
        """`first`: the answer to a first round asked before the watcher existed (the daemon
        arms maintenance-event before anything slow); used instead of asking again. `board`:
        shared with the other watchers (alone, a watcher paces itself by its own key only)."""
        self.key = key
        self.spec = KEYS[key]  # how the key is asked, read and what its absence means
        self.config = config
        self.observe = observe
        self.stop = stop
        self.health = health
        self.metrics = metrics
        # Supervised (bridge/supervise.py): a bug in a round is logged once, shown on /healthz
        # and the watch starts again after a back-off, instead of ending for good.
        self.thread = supervised_thread(
            f"watch {key}", self._run, health, finished=stop.is_set, stop=stop
        )
        self.answered = threading.Event()  # the first round is done: the watch is armed
        self._outage = Outage(log, f"metadata {key} answering again")
        self._absent = Outage(log)  # said once while the key is missing, again if it returns
        self._no_etag = Outage(log)
        self._policy = metadata_policy(config.retry_cap)
        self._retrying = self._policy.retrying(self._sleep, self._on_failure, already_failed=1)
        self._last_poll = metrics.last_poll.labels(key)
        self._first = first
        self.board = board or NoticeBoard()
        self.board.join(self)
        self._client: MetadataClient | None = None
        self._hurried = threading.Event()  # its poll was cut short on purpose: not an outage
        # How long a round may take before health calls the watcher stuck: the long-poll, the
        # client's slack over it, and the longest back-off before the next try.
        self._patience = config.poll_timeout + CLIENT_SLACK + config.retry_cap

    def start(self) -> None:
        self.thread.start()

    def hurry(self) -> None:
        """Cut the calm poll in flight short (from another thread): the next round is asked at
        once, at the pace of a notice."""
        client = self._client
        if client is not None:
            self._hurried.set()
            client.connection.interrupt()

    def _run(self) -> None:
        client = self._client = MetadataClient(self.config.metadata_url)
        etag = "0"  # never matches: the first round answers at once with the current value
        first = True
        try:
            while not self.stop.is_set():
                self.health.expect(self.key, self._patience)
                reading, self._first = self._first, None
                if reading is None:
                    reading = self._round(client, etag)
                self._hurried.clear()
                self._last_poll.set_to_current_time()
                self._outage.recovered()
                pause = self._handle(reading, first)
                self.answered.set()
                first = False
                etag = reading.etag or "0"
                if pause and self.board.on:  # an absent key too is asked at a notice's pace
                    pause = min(pause, NOTICE_POLL)
                if pause:
                    self.health.expect(self.key, pause)
                    self._sleep(pause)
        except _Stopped:
            pass
        finally:
            client.close()

    def _round(self, client: MetadataClient, etag: str) -> Reading:
        """One long-poll, asked directly: only a failure enters the retry loop, whose machinery
        cost ~50 us on every change (more than deciding what the change means)."""
        try:
            return self._poll(client, etag)
        except MetadataError as exc:
            if self._failed(exc):
                self._sleep(self._policy.delay(1, exc.failure_class))
        return self._retrying(self._poll, client, etag)

    def _poll(self, client: MetadataClient, etag: str) -> Reading:
        """A long-poll at the pace of the moment: short while any key says a notice is on."""
        if self.board.on:
            timeout = min(self.config.poll_timeout, NOTICE_POLL)
            return client.watch(self.key, etag, timeout, self.spec.alt, slack=NOTICE_SLACK)
        return client.watch(self.key, etag, self.config.poll_timeout, self.spec.alt)

    def _handle(self, reading: Reading, first: bool) -> float:
        """Pass the value on; return how long to pause before the next round (0: none)."""
        now = datetime.now(timezone.utc)
        if self.stop.is_set():  # shutting down: the store may already be closed
            return 0.0
        if reading.absent:
            if self.spec.absent_is_baseline:
                self.board.update(self.key, self.spec.baseline)
                self.observe(self.key, self.spec.baseline, now, reading.received, first)
            else:
                self._absent.failed(
                    "absent",
                    "%s does not exist on this VM; asking again every %.0f s",
                    self.key,
                    self.config.absent_interval,
                )
            return self.config.absent_interval
        self._absent.recovered()
        value = self.spec.canonical(reading.value)
        self.board.update(self.key, value)
        self.observe(self.key, value, now, reading.received, first)
        if reading.etag is None:
            self._no_etag.failed(
                "no_etag",
                "%s answered without an ETag; asking again every %.0f s",
                self.key,
                NO_ETAG_PAUSE,
            )
            return NO_ETAG_PAUSE
        self._no_etag.recovered()
        return 0.0

    def _sleep(self, seconds: float) -> None:
        if self.stop.wait(seconds):
            raise _Stopped

    def _on_failure(self, state: tenacity.RetryCallState) -> None:
        self._failed(state.outcome.exception() if state.outcome else None)

    def _failed(self, exc: BaseException | None) -> bool:
        """Count and log a failed round; False when it was only `hurry` cutting it short."""
        if self.stop.is_set():  # the server went away because we are shutting down
            raise _Stopped
        if self._hurried.is_set():
            self._hurried.clear()
            return False
        cls = getattr(exc, "failure_class", "other")
        self.metrics.metadata_errors.labels(cls).inc()
        self._outage.failed(
            cls,
            "metadata %s on %s: %s (retrying at once, then backing off to %.1f s)",
            cls,
            self.key,
            exc,
            self.config.retry_cap,
        )
        self.health.expect(self.key, self._patience)
        return True
