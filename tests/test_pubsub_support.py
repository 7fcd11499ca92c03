"""The Pub/Sub test support behaves like Pub/Sub where the bridge depends on it.

Every test runs against both the official emulator and the in-repo fake, so the fake stays
honest; the emulator cases skip (with the reason) where it is not installed. One server per
kind is shared by the module (the emulator takes 1-2 s to start); each test uses its own
topic and subscription names.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator

import pytest
from google.api_core.exceptions import NotFound
from google.cloud import pubsub_v1
from google.cloud.pubsub_v1.publisher.exceptions import PublishToPausedOrderingKeyException
from support.pubsub import PubSubAdmin, PubSubServer, admin, emulator_or_skip, start_pubsub


@pytest.fixture(scope="module", params=["emulator", "fake"], ids=["on_emulator", "on_fake"])
def server(request: pytest.FixtureRequest) -> Iterator[PubSubServer]:
    srv = emulator_or_skip() if request.param == "emulator" else start_pubsub(kind="fake")
    assert srv.kind == request.param
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def adm(server: PubSubServer) -> Iterator[PubSubAdmin]:
    with admin(server) as a:
        yield a


@pytest.fixture
def names() -> tuple[str, str]:
    suffix = uuid.uuid4().hex[:8]
    return f"topic-{suffix}", f"sub-{suffix}"


def env_publisher(
    server: PubSubServer, monkeypatch: pytest.MonkeyPatch
) -> pubsub_v1.PublisherClient:
    """A publisher built the way the bridge builds one: from PUBSUB_EMULATOR_HOST."""
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", server.host_port)
    return pubsub_v1.PublisherClient(
        batch_settings=pubsub_v1.types.BatchSettings(max_latency=0.001),
        publisher_options=pubsub_v1.types.PublisherOptions(enable_message_ordering=True),
    )


def test_ordered_publish_round_trip(server, adm, names, monkeypatch):
    topic = adm.create_topic(names[0])
    sub = adm.create_subscription(topic, names[1], ordering=True)
    publisher = env_publisher(server, monkeypatch)
    sent: dict[str, tuple[str, str, int]] = {}  # message id -> (key, ce-id, seq)
    try:
        futures = []
        for seq in range(10):
            for key in ("vm-a", "vm-b"):
                ce_id = f"{key}-{seq}"
                attrs = {"ce-id": ce_id, "ce-type": "com.example.maintenance.v1", "seq": str(seq)}
                fut = publisher.publish(topic, f"d{seq}".encode(), ordering_key=key, **attrs)
                futures.append((fut, key, ce_id, seq))
        for fut, key, ce_id, seq in futures:
            sent[fut.result(timeout=10)] = (key, ce_id, seq)
    finally:
        publisher.stop()
    assert len(sent) == 20, "message ids are assigned by the server and unique"

    got = adm.pull_until(sub, 20, timeout=15)
    assert {m.message_id for m in got} == set(sent)
    for key in ("vm-a", "vm-b"):
        mine = [m for m in got if m.ordering_key == key]
        assert [int(m.attributes["seq"]) for m in mine] == list(range(10)), "per-key order"
        for m in mine:
            k, ce_id, seq = sent[m.message_id]
            assert (m.ordering_key, m.data) == (k, f"d{seq}".encode())
            assert m.attributes == {
                "ce-id": ce_id,
                "ce-type": "com.example.maintenance.v1",
                "seq": str(seq),
            }
    assert adm.pull(sub, timeout=1.0) == [], "acked messages are gone"


def test_publish_to_missing_topic_is_not_found_and_pauses_the_key(server, monkeypatch):
    publisher = env_publisher(server, monkeypatch)
    topic = f"projects/{server.project}/topics/missing-{uuid.uuid4().hex[:8]}"
    try:
        with pytest.raises(NotFound):
            publisher.publish(topic, b"x", ordering_key="k").result(timeout=10)
        # With ordering on, a failed publish pauses its key until resume_publish. The
        # library (2.44) does not raise from publish(): the returned future has failed.
        with pytest.raises(PublishToPausedOrderingKeyException):
            publisher.publish(topic, b"y", ordering_key="k").result(timeout=10)
        publisher.resume_publish(topic, "k")
        with pytest.raises(NotFound):
            publisher.publish(topic, b"z", ordering_key="k").result(timeout=10)
    finally:
        publisher.stop()


def test_unacked_message_is_redelivered_after_nack(adm, names):
    topic = adm.create_topic(names[0])
    sub = adm.create_subscription(topic, names[1])
    publisher = adm.publisher()
    try:
        mid = publisher.publish(topic, b"once", ordering_key="k").result(timeout=10)
    finally:
        publisher.stop()
    first = adm.pull(sub, 1, ack=False)
    assert [m.message_id for m in first] == [mid]
    adm.subscriber_api.modify_ack_deadline(
        subscription=sub, ack_ids=[first[0].ack_id], ack_deadline_seconds=0
    )
    again = adm.pull_until(sub, 1, timeout=10)
    assert [m.message_id for m in again] == [mid]


def _port_open(host_port: str) -> bool:
    host, port = host_port.rsplit(":", 1)
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, int(port))) == 0


def test_kill_and_restart_on_same_port_loses_state(server, names):
    """A publisher connected before the kill must work again once the server is back."""
    with admin(server) as a:
        topic = a.create_topic(names[0])
        publisher = a.publisher()
    try:
        publisher.publish(topic, b"before", ordering_key="k").result(timeout=10)
        pid = server.pid
        server.kill()
        if pid is not None:  # the JVM itself is gone, not only a launcher
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        assert not _port_open(server.host_port)

        host_port = server.host_port
        server.restart()
        assert server.host_port == host_port
        assert _port_open(host_port)
        print(f"pubsub {server.kind}: restart ready in {server.start_seconds:.2f} s")
        with admin(server) as a:
            with pytest.raises(NotFound):  # state is lost, like the real emulator
                a.publisher_api.get_topic(topic=topic, timeout=10)
            a.create_topic(names[0])
            sub = a.create_subscription(topic, names[1])
            t0 = time.monotonic()
            mid = publisher.publish(topic, b"after", ordering_key="k").result(timeout=20)
            took = time.monotonic() - t0
            print(f"pubsub {server.kind}: old publisher's first publish after restart {took:.2f} s")
            assert [m.message_id for m in a.pull_until(sub, 1)] == [mid]
    finally:
        publisher.stop()
