"""`maintenance-bridge listen`: print the events a topic or a subscription carries.

It must never steal a consumer's messages. On `--topic` it reads through a subscription of its
own, created for the session and deleted on exit (Ctrl+C and SIGTERM included; after a kill -9
it expires when a day unused). On `--subscription` it acknowledges only with `--ack`; otherwise
it gives every message back when it exits (ack deadline 0), so the subscription's consumer gets
them all; each one it saw counts as a delivery attempt towards a dead-letter policy.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

from bridge.config import ConfigError
from bridge.events import DecodeError, Event, decode_pubsub
from bridge.signals import on_stop_signals

TEMPORARY_TTL_SECONDS = 86400  # the shortest expiration Pub/Sub accepts


def describe(event: Event) -> str:
    """One readable line per event."""
    data = event.data
    notice = f" notice {data.notice_seconds}s" if data.notice_seconds is not None else ""
    down = " (happened while the bridge was down)" if data.happened_while_down else ""
    change = f"{data.previous or '(nothing)'} -> {data.current or '(nothing)'}"
    if data.upcoming is not None:
        up = data.upcoming
        change = (
            f"{up.type} {up.maintenance_status} window {up.window_start_time} .. "
            f"{up.window_end_time}"
        )
    if event.kind == "bridge.heartbeat":
        change = "alive"
    return (
        f"{event.time}  {event.kind:<20} {data.instance.name} ({data.instance.zone})  "
        f"{change}{notice}  seq={data.sequence} id={event.id}{down}"
    )


def listen(
    *,
    topic: str | None,
    subscription: str | None,
    ack: bool,
    count: int,
    timeout: float,
    as_json: bool,
) -> int:
    """`maintenance-bridge listen`: the exit code."""
    if topic is None:
        assert subscription is not None
        pull(subscription, count=count, timeout=timeout, as_json=as_json, ack=ack)
        return 0
    try:
        with _stop_signals_interrupt(), temporary_subscription(topic) as own:
            pull(own, count=count, timeout=timeout, as_json=as_json, ack=True)  # nobody else's
    except KeyboardInterrupt:  # before pull's own handler: the subscription is deleted all the same
        pass
    return 0


@contextlib.contextmanager
def _stop_signals_interrupt() -> Iterator[None]:
    """`timeout`, systemd and kill stop a process with SIGTERM: clean up as on Ctrl+C."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    restore = on_stop_signals(interrupt)
    try:
        yield
    finally:
        restore()


def _need_library() -> None:
    """`listen` reads through google-cloud-pubsub, which the default install leaves out."""
    from bridge.sinks.pubsub import GRPC_EXTRA, grpc_installed

    if not grpc_installed():
        raise ConfigError(f"listen needs google-cloud-pubsub: {GRPC_EXTRA}")


@contextlib.contextmanager
def temporary_subscription(topic: str) -> Any:
    """A subscription of our own on `topic`, deleted when the block ends however it ends."""
    _need_library()
    from google.api_core import exceptions
    from google.cloud import pubsub_v1

    project, sep, _ = topic.removeprefix("projects/").partition("/topics/")
    if not topic.startswith("projects/") or not sep or not project:
        raise ConfigError(f"--topic: {topic!r} is not a topic path like projects/P/topics/T")
    name = f"projects/{project}/subscriptions/maintenance-bridge-listen-{uuid.uuid4().hex[:12]}"
    client = pubsub_v1.SubscriberClient()
    try:
        try:
            client.create_subscription(
                request={
                    "name": name,
                    "topic": topic,
                    "ack_deadline_seconds": 10,
                    "enable_message_ordering": True,
                    "expiration_policy": {"ttl": {"seconds": TEMPORARY_TTL_SECONDS}},
                }
            )
        except exceptions.NotFound:
            raise ConfigError(f"--topic: {topic} does not exist") from None
        try:
            yield name
        finally:
            with contextlib.suppress(exceptions.NotFound):
                client.delete_subscription(request={"subscription": name})
    finally:
        client.close()


def pull(subscription: str, *, count: int, timeout: float, as_json: bool, ack: bool) -> int:
    """Pull, decode (both content modes) and print; returns how many were printed.

    Without `ack`, messages are held until the end and then handed back at once; one seen
    again after its ack deadline passed is not printed twice.
    """
    _need_library()
    from google.api_core import exceptions
    from google.cloud import pubsub_v1

    client = pubsub_v1.SubscriberClient()
    seen: set[str] = set()
    held: list[str] = []  # ack ids to give back on exit
    deadline = time.monotonic() + timeout if timeout else None
    try:
        while (not count or len(seen) < count) and (
            deadline is None or time.monotonic() < deadline
        ):
            # Never pull more than --count still wants (the rest would be held for nothing),
            # nor wait past --timeout (a quiet subscription holds a pull for its whole timeout).
            wanted = min(10, count - len(seen)) if count else 10
            wait = 10.0 if deadline is None else min(10.0, deadline - time.monotonic())
            try:
                response = client.pull(
                    request={"subscription": subscription, "max_messages": wanted},
                    timeout=max(0.1, wait),
                )
            except exceptions.DeadlineExceeded:
                continue
            except exceptions.NotFound:
                raise ConfigError(f"--subscription: {subscription} does not exist") from None
            fresh = [r for r in response.received_messages if r.message.message_id not in seen]
            ack_ids = [r.ack_id for r in response.received_messages]
            for received in fresh:
                message = received.message
                seen.add(message.message_id)
                _show(dict(message.attributes), bytes(message.data), message.ordering_key, as_json)
            if ack and ack_ids:
                client.acknowledge(request={"subscription": subscription, "ack_ids": ack_ids})
            else:
                held += ack_ids
            if not fresh:  # an early empty answer (or only repeats): pause, do not spin
                left = 0.2 if deadline is None else deadline - time.monotonic()
                time.sleep(max(0.0, min(0.2, left)))
    except KeyboardInterrupt:
        pass
    finally:
        if held:  # back to the subscription's consumer now, not at the end of the deadline
            with contextlib.suppress(exceptions.GoogleAPICallError):
                client.modify_ack_deadline(
                    request={
                        "subscription": subscription,
                        "ack_ids": held,
                        "ack_deadline_seconds": 0,
                    }
                )
        client.close()
    return len(seen)


def _show(attributes: dict[str, str], data: bytes, ordering_key: str, as_json: bool) -> None:
    try:
        event = decode_pubsub(attributes, data)
    except DecodeError as exc:
        print(f"not a maintenance-bridge event ({exc}); skipped", file=sys.stderr)
        return
    if as_json:
        out: dict[str, Any] = event.to_structured()
        out["orderingkey"] = ordering_key
        print(json.dumps(out, ensure_ascii=False), flush=True)
    else:
        print(describe(event), flush=True)
