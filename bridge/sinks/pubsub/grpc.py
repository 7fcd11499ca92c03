"""google-cloud-pubsub over gRPC: `--pubsub-transport grpc` (the extra
`maintenance-bridge[grpc]` installs the library).

The library is imported when the transport is created (in the background, after the watch is
armed: importing it and building the client cost about 0.2 s) and when one of its failures is
classified, never on the default path.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any


class GrpcTransport:
    """`PublisherClient` with message ordering on; one attempt per publish."""

    def __init__(
        self, topic: str, *, endpoint: str, emulator_host: str, max_latency: float
    ) -> None:
        from google.cloud import pubsub_v1

        self.topic = topic
        kwargs: dict[str, Any] = {}
        if emulator_host:  # the Config's value, not the library's own reading of the variable
            import grpc
            from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport

            channel = grpc.insecure_channel(emulator_host)
            kwargs["transport"] = PublisherGrpcTransport(channel=channel)  # no credentials
        elif endpoint:
            kwargs["client_options"] = {"api_endpoint": endpoint}
        self.client = pubsub_v1.PublisherClient(
            batch_settings=pubsub_v1.types.BatchSettings(
                max_messages=100, max_bytes=1 << 20, max_latency=max_latency
            ),
            publisher_options=pubsub_v1.types.PublisherOptions(enable_message_ordering=True),
            **kwargs,
        )
        # No retry inside the client: with message ordering on, the library stretches any
        # retry deadline to 2**32 s, so during an outage a publish would never fail (no log
        # line) and the relay would re-send it every ACK_TIMEOUT, piling up copies in the
        # client. The outbox and the relay own retries and log each outage once.
        self.retry = None
        self.timeout = 20.0

    def publish(self, key: str, attributes: dict[str, str], data: bytes) -> Any:
        return self.client.publish(
            self.topic,
            data,
            ordering_key=key,
            retry=self.retry,
            timeout=self.timeout,
            **attributes,
        )

    def resume(self, key: str) -> None:
        self.client.resume_publish(self.topic, key)

    def close(self) -> None:
        self.client.stop()


def classify(exc: BaseException) -> str:
    """The library's failures by its exception types (imported here only once the library is
    loaded: bridge/sinks/pubsub/__init__.py asks only then)."""
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
    # The ordered sequencer stopped by an earlier failure raises a bare RuntimeError, and a
    # publish that reaches the failed batch before the key is paused trips the batch's
    # `assert` ("Publish after stop() or publish error."): both follow the failure already told.
    if isinstance(exc, (RuntimeError, AssertionError)) and "publish error" in str(exc):
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
