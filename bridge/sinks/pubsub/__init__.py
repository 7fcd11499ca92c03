"""The Pub/Sub sink: binary or structured content mode, message ordering on with one ordering
key per instance, over one of two transports behind the same small interface (`Transport`):

- `rest` (the default, `rest.py`): the REST API through the standard library and the metadata
  server's access token. No gRPC, protobuf or google-cloud-pubsub on the VM: the bridge idles
  in about half the memory.
- `grpc` (`grpc.py`): google-cloud-pubsub, for sites that want the library
  (`maintenance-bridge[grpc]`).

Both pause an ordering key after a failed publish until `resume`, so the relay's recovery and
the failure classes, hints and outage lines are the same on either. Its options, failure
classes and operator hints live here.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

from bridge.events import Event
from bridge.options import ConfigError, Option
from bridge.sinks import SinkType, register
from bridge.sinks.pubsub.rest import KeyPaused, MetadataTokens, PublishFailed, RestTransport

_TOPIC = re.compile(
    r"^projects/(?P<project>[a-z][-a-z0-9.:]{4,62}[a-z0-9])/topics/(?P<topic>[A-Za-z][\w.~+%-]{2,254})$"
)
_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?(:[0-9]{1,5})?$")
GLOBAL_ENDPOINT = "pubsub.googleapis.com"
GRPC_EXTRA = "pip install 'maintenance-bridge[grpc]'"
TRANSPORTS = ("rest", "grpc")

OPTIONS = (
    Option("topic", "Pub/Sub topic, projects/P/topics/T (selects the pubsub sink)", default=""),
    Option(
        "content_mode",
        "CloudEvents content mode on Pub/Sub and HTTP",
        choices=("binary", "structured"),
        default="binary",
    ),
    # 0: commit each publish at once (batches still form behind one in flight, per ordering key).
    Option(
        "publish_latency",
        "gRPC transport: the client library's batch max_latency, seconds (REST publishes each "
        "event at once)",
        parse=float,
        default=0.0,
    ),
    Option(
        "pubsub_transport",
        "Pub/Sub transport: rest (standard library) or grpc (needs maintenance-bridge[grpc])",
        choices=TRANSPORTS,
        default="rest",
    ),
    Option(
        "pubsub_endpoint",
        f"Pub/Sub API host[:port], e.g. a regional us-east1-{GLOBAL_ENDPOINT} "
        f"(default {GLOBAL_ENDPOINT})",
        default="",
    ),
    Option(
        "pubsub_emulator_host",
        "host:port of a Pub/Sub emulator: plain HTTP, no token (default from PUBSUB_EMULATOR_HOST)",
        default="",
        fallback_env="PUBSUB_EMULATOR_HOST",
    ),
)


@dataclass(frozen=True)
class PubSubOptions:
    """What the Pub/Sub sink is given (filled from the `Config` by bridge/sinks/). The
    metadata URL is the general option's: the REST transport asks it for access tokens."""

    topic: str = ""
    content_mode: str = "binary"
    publish_latency: float = 0.0
    pubsub_transport: str = "rest"
    pubsub_endpoint: str = ""
    pubsub_emulator_host: str = ""
    metadata_url: str = "http://metadata.google.internal/computeMetadata/v1/"


class Transport(Protocol):
    """How messages reach the topic: a publish's future resolves to the message id; a failure
    pauses `key` (later publishes on it fail) until `resume(key)`."""

    def publish(self, key: str, attributes: dict[str, str], data: bytes) -> Any: ...

    def resume(self, key: str) -> None: ...

    def close(self) -> None: ...


def new_transport(options: PubSubOptions) -> Transport:
    """The configured transport, imported only when chosen (gRPC never on the default path)."""
    if options.pubsub_transport == "grpc":
        from bridge.sinks.pubsub.grpc import GrpcTransport

        return GrpcTransport(
            options.topic,
            endpoint=options.pubsub_endpoint,
            emulator_host=options.pubsub_emulator_host,
            max_latency=options.publish_latency,
        )
    if options.pubsub_emulator_host:
        return RestTransport(
            options.topic,
            options.pubsub_emulator_host,
            secure=False,
            tokens=None,
        )
    return RestTransport(
        options.topic,
        options.pubsub_endpoint or GLOBAL_ENDPOINT,
        secure=True,
        tokens=MetadataTokens(options.metadata_url),
    )


class PubSubSink:
    """The transport is created on first use. Over gRPC, importing the library and building
    its client cost about 0.2 s, which must not delay the first long-poll: the daemon calls
    `connect` in the background once the watch is armed, and an event sent meanwhile waits for
    the transport (and in the outbox) as it would during an outage. The REST transport costs
    nothing to create: it is made by the first `send`, on the relay's thread, and every publish
    is made there.
    """

    name = "pubsub"

    def __init__(self, options: PubSubOptions) -> None:
        self.options = options
        self.topic = options.topic
        self.mode = options.content_mode
        self._transport: Transport | None = None
        self._lock = threading.Lock()  # guards _connecting and _waiting, never held for long
        self._creating = threading.Lock()
        self._connecting = False
        self._waiting: list[tuple[Event, Future[str]]] = []

    @property
    def transport(self) -> Transport:
        with self._creating:
            if self._transport is None:
                self._transport = new_transport(self.options)
            return self._transport

    def start_connecting(self) -> None:
        """From now until `connect` ends, `send` does not block on creating the (gRPC)
        transport."""
        with self._lock:
            self._connecting = self._transport is None and self.options.pubsub_transport == "grpc"

    def connect(self) -> None:
        """Create the transport, then publish in order what waited for it; raises what creating
        it raised (those waiting fail with it and are sent again by the relay)."""
        try:
            transport = self.transport
        except Exception as exc:
            with self._lock:
                waiting, self._waiting, self._connecting = self._waiting, [], False
            for _, future in waiting:
                future.set_exception(exc)
            raise
        with self._lock:
            for event, future in self._waiting:
                _chain(self._publish(transport, event), future)
            self._waiting, self._connecting = [], False

    def send(self, event: Event) -> Any:
        with self._lock:
            if self._connecting:
                future: Future[str] = Future()
                self._waiting.append((event, future))
                return future
        return self._publish(self.transport, event)

    def _publish(self, transport: Transport, event: Event) -> Any:
        attributes, data = event.to_pubsub(self.mode)
        return transport.publish(event.extensions.get("instanceid", ""), attributes, data)

    def recover(self, event: Event) -> None:
        self.transport.resume(event.extensions.get("instanceid", ""))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


def _chain(source: Any, target: Future[str]) -> None:
    """Resolve `target` as the transport's publish future `source` resolves."""

    def done(f: Any) -> None:
        exc = f.exception()
        if exc is None:
            target.set_result(f.result())
        else:
            target.set_exception(exc)

    source.add_done_callback(done)


FAILURE_CLASSES = ("not_found", "permission", "paused", "unavailable")


def classify(exc: BaseException) -> str:
    """The REST transport's failures carry their class; the gRPC library's are told by its
    exception types, asked only if the library is loaded (an exception of a library never
    imported cannot have been raised, and classifying must not import it)."""
    if isinstance(exc, PublishFailed):
        return exc.failure_class
    if isinstance(exc, KeyPaused):
        return "paused"
    if "google.api_core" in sys.modules:
        from bridge.sinks.pubsub.grpc import classify as library_classify

        return library_classify(exc)
    if isinstance(exc, TimeoutError):
        return "unavailable"
    return "other"


def hint(failure_class: str, options: PubSubOptions) -> str:
    """What to check, naming the topic: the log line must say what to fix."""
    return {
        "not_found": f" (does the topic {options.topic} exist? events wait in the outbox)",
        "permission": f" (grant roles/pubsub.publisher on the topic {options.topic}; events wait)",
        "paused": " (ordering key paused by an earlier failure; resumed, events wait)",
    }.get(failure_class, "")


def check(options: PubSubOptions, chosen: bool) -> None:
    if options.topic and not _TOPIC.match(options.topic):
        raise ConfigError(
            f"--topic: {options.topic!r} is not a topic path like projects/PROJECT/topics/TOPIC"
        )
    if chosen and not options.topic:
        raise ConfigError("--sink pubsub needs --topic projects/P/topics/T")
    if options.publish_latency < 0:
        raise ConfigError("--publish-latency: must be >= 0")
    for flag, value in (
        ("--pubsub-endpoint", options.pubsub_endpoint),
        ("--pubsub-emulator-host / PUBSUB_EMULATOR_HOST", options.pubsub_emulator_host),
    ):
        if value and not _HOST.match(value):
            raise ConfigError(f"{flag}: {value!r} is not a host or host:port (no scheme, no path)")
    if chosen and options.pubsub_transport == "grpc" and not grpc_installed():
        raise ConfigError(f"--pubsub-transport grpc needs google-cloud-pubsub: {GRPC_EXTRA}")


def grpc_installed() -> bool:
    """Whether google-cloud-pubsub is installed (found, not imported: start-up stays light)."""
    try:
        return importlib.util.find_spec("google.cloud.pubsub_v1") is not None
    except ModuleNotFoundError:  # not even the google.cloud namespace
        return False


def _topic(options: PubSubOptions) -> str:
    return options.topic


register(
    SinkType(
        name=PubSubSink.name,
        factory=PubSubSink,
        settings=PubSubOptions,
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
