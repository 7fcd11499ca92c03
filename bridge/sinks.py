"""Where events go: Pub/Sub (binary or structured content mode) or stdout (JSON lines).

A sink's `send` returns a future that resolves once the event is acknowledged (by Pub/Sub,
or written and flushed); only then does the event leave the outbox.
"""

from __future__ import annotations

import sys
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

    `PUBSUB_EMULATOR_HOST` is honoured by the client library itself.
    """

    name = "pubsub"

    def __init__(self, config: Config) -> None:
        from google.cloud import pubsub_v1

        self.topic = config.topic
        self.mode = config.content_mode
        self.client = pubsub_v1.PublisherClient(
            batch_settings=pubsub_v1.types.BatchSettings(
                max_messages=100, max_bytes=1 << 20, max_latency=config.publish_latency
            ),
            publisher_options=pubsub_v1.types.PublisherOptions(enable_message_ordering=True),
        )
        # One attempt per publish, no retry inside the client: with message ordering on, the
        # library stretches any retry deadline to 2**32 s, so during an outage a publish would
        # never fail (no log line) and the relay would re-send it every ACK_TIMEOUT, piling up
        # copies in the client. The outbox and the relay own retries and log each outage once.
        self.retry = None
        self.timeout = 20.0

    def send(self, event: Event) -> Any:
        attributes, data = event.to_pubsub(self.mode)
        return self.client.publish(
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
        self.client.stop()


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
