"""Where events go: Pub/Sub (binary or structured content mode) or stdout (JSON lines).

A sink's `send` returns a future that resolves once the event is acknowledged (by Pub/Sub,
or written and flushed); only then does the event leave the outbox.
"""

from __future__ import annotations

import sys
import threading
from concurrent.futures import Future
from typing import IO, Any, Protocol

from bridge.config import Config
from bridge.events import Event, dumps


class Sink(Protocol):
    name: str

    def send(self, event: Event) -> Any:
        """A future whose `result(timeout)` returns once the event is acknowledged."""

    def recover(self, event: Event) -> None:
        """Make the sink accept `event` again after a failure (e.g. resume an ordering key)."""

    def close(self) -> None: ...


class StdoutSink:
    """One structured-mode CloudEvent per line, flushed at once; logs go to stderr."""

    name = "stdout"

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stdout

    def send(self, event: Event) -> Future[str]:
        future: Future[str] = Future()
        try:
            self.stream.write(dumps(event.to_structured()).decode() + "\n")
            self.stream.flush()
        except (OSError, ValueError) as exc:  # closed or broken pipe: keep it in the outbox
            future.set_exception(exc)
        else:
            future.set_result(event.id)
        return future

    def recover(self, event: Event) -> None:
        return None

    def close(self) -> None:
        return None


class PubSubSink:
    """google-cloud-pubsub with message ordering on, one ordering key per instance.

    The client is created on first use: importing the library and building the client cost
    about 0.2 s, which must not delay the first long-poll. The daemon calls `connect` in the
    background once the watch is armed; an event sent meanwhile waits for the client (and in
    the outbox) as it would during an outage. `PUBSUB_EMULATOR_HOST` is honoured by the library.
    """

    name = "pubsub"

    def __init__(self, config: Config) -> None:
        self.topic = config.topic
        self.mode = config.content_mode
        self.publish_latency = config.publish_latency
        self._client: Any = None
        self._lock = threading.Lock()  # guards _connecting and _waiting, never held for long
        self._creating = threading.Lock()
        self._connecting = False
        self._waiting: list[tuple[Event, Future[str]]] = []
        # One attempt per publish, no retry inside the client: with message ordering on, the
        # library stretches any retry deadline to 2**32 s, so during an outage a publish would
        # never fail (no log line) and the relay would re-send it every ACK_TIMEOUT, piling up
        # copies in the client. The outbox and the relay own retries and log each outage once.
        self.retry = None
        self.timeout = 20.0

    @property
    def client(self) -> Any:
        with self._creating:
            if self._client is None:
                self._client = self._new_client()
            return self._client

    def _new_client(self) -> Any:
        from google.cloud import pubsub_v1

        return pubsub_v1.PublisherClient(
            batch_settings=pubsub_v1.types.BatchSettings(
                max_messages=100, max_bytes=1 << 20, max_latency=self.publish_latency
            ),
            publisher_options=pubsub_v1.types.PublisherOptions(enable_message_ordering=True),
        )

    def start_connecting(self) -> None:
        """From now until `connect` ends, `send` does not block on creating the client."""
        with self._lock:
            self._connecting = self._client is None

    def connect(self) -> None:
        """Create the client, then publish in order what waited for it; raises what creating
        it raised (those waiting fail with it and are sent again by the relay)."""
        try:
            client = self.client
        except Exception as exc:
            with self._lock:
                waiting, self._waiting, self._connecting = self._waiting, [], False
            for _, future in waiting:
                future.set_exception(exc)
            raise
        with self._lock:
            for event, future in self._waiting:
                _chain(self._publish(client, event), future)
            self._waiting, self._connecting = [], False

    def send(self, event: Event) -> Any:
        with self._lock:
            if self._connecting:
                future: Future[str] = Future()
                self._waiting.append((event, future))
                return future
        return self._publish(self.client, event)

    def _publish(self, client: Any, event: Event) -> Any:
        attributes, data = event.to_pubsub(self.mode)
        return client.publish(
            self.topic,
            data,
            ordering_key=event.extensions.get("instanceid", ""),
            retry=self.retry,
            timeout=self.timeout,
            **attributes,
        )

    def recover(self, event: Event) -> None:
        self.client.resume_publish(self.topic, event.extensions.get("instanceid", ""))

    def close(self) -> None:
        if self._client is not None:
            self._client.stop()


def _chain(source: Any, target: Future[str]) -> None:
    """Resolve `target` as the client's publish future `source` resolves."""

    def done(f: Any) -> None:
        exc = f.exception()
        if exc is None:
            target.set_result(f.result())
        else:
            target.set_exception(exc)

    source.add_done_callback(done)


def make_sink(config: Config) -> Sink:
    return PubSubSink(config) if config.sink == "pubsub" else StdoutSink()


def failure_class(exc: BaseException) -> str:
    """Publish failures sorted into the fixed set of metric labels."""
    name = type(exc).__name__
    if name == "NotFound":
        return "not_found"
    if name in ("PermissionDenied", "Forbidden", "Unauthenticated", "Unauthorized"):
        return "permission"
    if name == "PublishToPausedOrderingKeyException":
        return "paused"
    if name == "RuntimeError" and "publish error" in str(exc):  # ordered sequencer after an error
        return "paused"
    if name in (
        "ServiceUnavailable",
        "DeadlineExceeded",
        "RetryError",
        "TimeoutError",
        "InternalServerError",
        "Aborted",
        "ResourceExhausted",
        "Cancelled",
    ):
        return "unavailable"
    return "other"
