"""One long-poll loop per watched key.

Each loop hangs on its own key (`wait_for_change` + `last_etag`), so a change is seen the moment
the server answers, and querying `instance/maintenance-event` itself on every round keeps the
60 s migration warning armed (the server skips it unless the key was queried since the last
event). Errors are retried every few tens of milliseconds at first, then with back-off
(bridge/retry.py); a key that answers at once instead of hanging (404, the 'no notifications'
503, a missing ETag) is asked again only after a pause, never in a tight loop.
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

log = logging.getLogger("bridge.watcher")

# observe(key, canonical value, wall-clock time of the answer, monotonic time, first reading)
Observer = Callable[[str, str, datetime, float, bool], None]
NO_ETAG_PAUSE = 1.0


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
    ) -> None:
        """`first`: the answer to a first round asked before the watcher existed (the daemon
        arms maintenance-event before anything slow); used instead of asking again."""
        self.key = key
        self.spec = KEYS[key]  # how the key is asked, read and what its absence means
        self.config = config
        self.observe = observe
        self.stop = stop
        self.health = health
        self.metrics = metrics
        self.thread = threading.Thread(target=self._run, name=f"watch {key}", daemon=True)
        self.answered = threading.Event()  # the first round is done: the watch is armed
        self._outage = Outage(log, f"metadata {key} answering again")
        self._absent = Outage(log)  # said once while the key is missing, again if it returns
        self._no_etag = Outage(log)
        self._policy = metadata_policy(config.retry_cap)
        self._retrying = self._policy.retrying(self._sleep, self._on_failure, already_failed=1)
        self._last_poll = metrics.last_poll.labels(key)
        self._first = first
        # How long a round may take before health calls the watcher stuck: the long-poll, the
        # client's slack over it, and the longest back-off before the next try.
        self._patience = config.poll_timeout + CLIENT_SLACK + config.retry_cap

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        client = MetadataClient(self.config.metadata_url)
        etag = "0"  # never matches: the first round answers at once with the current value
        first = True
        try:
            while not self.stop.is_set():
                timeout = self.config.poll_timeout
                self.health.expect(self.key, self._patience)
                reading, self._first = self._first, None
                if reading is None:
                    reading = self._round(client, etag, timeout)
                self._last_poll.set_to_current_time()
                self._outage.recovered()
                pause = self._handle(reading, first)
                self.answered.set()
                first = False
                etag = reading.etag or "0"
                if pause:
                    self.health.expect(self.key, pause)
                    self._sleep(pause)
        except _Stopped:
            pass
        except Exception:  # a bug must not silently end the watch: log it, health goes red
            log.exception("watcher for %s died", self.key)
        finally:
            client.close()

    def _round(self, client: MetadataClient, etag: str, timeout: int) -> Reading:
        """One long-poll, asked directly: only a failure enters the retry loop, whose machinery
        cost ~50 us on every change (more than deciding what the change means)."""
        try:
            return client.watch(self.key, etag, timeout, self.spec.alt)
        except MetadataError as exc:
            self._failed(exc)
            self._sleep(self._policy.delay(1, exc.failure_class))
        return self._retrying(client.watch, self.key, etag, timeout, self.spec.alt)

    def _handle(self, reading: Reading, first: bool) -> float:
        """Pass the value on; return how long to pause before the next round (0: none)."""
        now = datetime.now(timezone.utc)
        if self.stop.is_set():  # shutting down: the store may already be closed
            return 0.0
        if reading.absent:
            if self.spec.absent_is_baseline:
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
        self.observe(self.key, self.spec.canonical(reading.value), now, reading.received, first)
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

    def _failed(self, exc: BaseException | None) -> None:
        if self.stop.is_set():  # the server went away because we are shutting down
            raise _Stopped
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
