"""The Pub/Sub sink: google-cloud-pubsub, binary or structured content mode, message ordering
on with one ordering key per instance.

Its options (`--topic`, `--content-mode`, `--publish-latency`), failure classes and operator
hints live here; the library is imported only when the client is created or a failure is
classified, never at start-up (see `PubSubSink`).
"""

from __future__ import annotations

import re
import threading
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from bridge.events import Event
from bridge.options import ConfigError, Option
from bridge.sinks import SinkType, register

if TYPE_CHECKING:
    from bridge.config import Config

_TOPIC = re.compile(
    r"^projects/(?P<project>[a-z][-a-z0-9.:]{4,62}[a-z0-9])/topics/(?P<topic>[A-Za-z][\w.~+%-]{2,254})$"
)

OPTIONS = (
    Option("topic", "Pub/Sub topic, projects/P/topics/T (selects the pubsub sink)", default=""),
    Option(
        "content_mode",
        "CloudEvents content mode on Pub/Sub and HTTP",
        choices=("binary", "structured"),
        default="binary",
    ),
    # 0: commit each publish at once (batches still form behind one in flight, per ordering key).
    Option("publish_latency", "Pub/Sub batch max_latency, seconds", parse=float, default=0.0),
)


class PubSubSink:
    """The client is created on first use: importing the library and building the client cost
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


FAILURE_CLASSES = ("not_found", "permission", "paused", "unavailable")


def classify(exc: BaseException) -> str:
    """Publish failures by the library's exception types (imported here, after a failure:
    never on the start-up path)."""
    import concurrent.futures

    from google.api_core import exceptions as api
    from google.cloud.pubsub_v1.publisher.exceptions import PublishToPausedOrderingKeyException

    if isinstance(exc, api.NotFound):
        return "not_found"
    if isinstance(
        exc, (api.PermissionDenied, api.Forbidden, api.Unauthenticated, api.Unauthorized)
    ):
        return "permission"
    if isinstance(exc, PublishToPausedOrderingKeyException):
        return "paused"
    # The ordered sequencer stopped by an earlier failure raises a bare RuntimeError.
    if isinstance(exc, RuntimeError) and "publish error" in str(exc):
        return "paused"
    if isinstance(
        exc,
        (
            api.ServiceUnavailable,
            api.DeadlineExceeded,
            api.GatewayTimeout,
            api.InternalServerError,
            api.Aborted,
            api.ResourceExhausted,
            api.Cancelled,
            api.RetryError,
            TimeoutError,
            concurrent.futures.TimeoutError,  # not TimeoutError before Python 3.11
        ),
    ):
        return "unavailable"
    return "other"


def hint(failure_class: str, config: Config) -> str:
    """What to check, naming the topic: the log line must say what to fix."""
    return {
        "not_found": f" (does the topic {config.topic} exist? events wait in the outbox)",
        "permission": f" (grant roles/pubsub.publisher on the topic {config.topic}; events wait)",
        "paused": " (ordering key paused by an earlier failure; resumed, events wait)",
    }.get(failure_class, "")


def check(config: Config) -> None:
    if config.topic and not _TOPIC.match(config.topic):
        raise ConfigError(
            f"--topic: {config.topic!r} is not a topic path like projects/PROJECT/topics/TOPIC"
        )
    if config.sink == PubSubSink.name and not config.topic:
        raise ConfigError("--sink pubsub needs --topic projects/P/topics/T")
    if config.publish_latency < 0:
        raise ConfigError("--publish-latency: must be >= 0")


def _topic(config: Config) -> str:
    return str(config.topic)


register(
    SinkType(
        name=PubSubSink.name,
        factory=PubSubSink,
        options=OPTIONS,
        selected_by="topic",
        check=check,
        failure_classes=FAILURE_CLASSES,
        classify=classify,
        hint=hint,
        # A paused key (or a sequencer stopped by the error) follows a failure already told.
        follow_ups=frozenset({"paused"}),
        target=_topic,
    )
)
