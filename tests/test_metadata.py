"""The metadata client against the simulator: long polls, ETags and every error class."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from support.bridge import BridgeProcess
from support.harness import enrichment_under, wait_for

from bridge.events import Scheduling
from bridge.keys import MAINTENANCE as KEY
from bridge.metadata import MetadataClient, MetadataError
from bridge.simulator import Simulator


@pytest.fixture
def client(sim: Simulator):
    c = MetadataClient(sim.url)
    yield c
    c.close()


def test_value_and_etag(client: MetadataClient) -> None:
    reading = client.get(KEY)
    assert reading.value == "NONE"
    assert reading.etag and len(reading.etag) == 16


def test_hanging_poll_returns_on_change(client: MetadataClient, sim: Simulator) -> None:
    etag = client.get(KEY).etag
    threading.Timer(0.2, sim.set_value, (KEY, "MIGRATE_ON_HOST_MAINTENANCE")).start()
    began = time.monotonic()
    reading = client.watch(KEY, etag, 30)
    assert time.monotonic() - began > 0.15  # it hung until the change (timeout_sec is 30)
    assert reading.value == "MIGRATE_ON_HOST_MAINTENANCE"
    assert reading.etag != etag


def test_timeout_sec_returns_same_value(client: MetadataClient) -> None:
    etag = client.get(KEY).etag
    reading = client.watch(KEY, etag, 1)
    assert (reading.value, reading.etag) == ("NONE", etag)


def test_etag_is_content_derived_so_never_an_id(client: MetadataClient, sim: Simulator) -> None:
    first = client.get(KEY).etag
    sim.set_value(KEY, "MIGRATE_ON_HOST_MAINTENANCE")
    sim.set_value(KEY, "NONE")
    assert client.get(KEY).etag == first  # A -> B -> A: the old ETag is back


def test_absent_keys(client: MetadataClient, sim: Simulator) -> None:
    assert client.get("instance/upcoming-maintenance").absent  # the 'no notifications' 503
    sim.delete_value("instance/preempted")
    assert client.get("instance/preempted").absent  # 404


@pytest.mark.parametrize(
    ("kind", "params", "failure_class"),
    [
        ("status", {"status": 503}, "http_5xx"),
        ("status", {"status": 500}, "http_5xx"),
        ("status", {"status": 504}, "http_5xx"),
        ("status", {"status": 429}, "http_429"),
        ("status", {"status": 403}, "http_4xx"),
        ("drop", {}, "connection"),
        ("reset", {}, "connection"),
        ("no_flavor", {}, "protocol"),
        ("redirect", {}, "protocol"),
        ("malformed", {}, "protocol"),
        ("huge", {}, "protocol"),
        ("invalid_utf8", {}, "protocol"),
    ],
)
def test_failures_are_classified(
    client: MetadataClient, sim: Simulator, kind: str, params: dict, failure_class: str
) -> None:
    sim.inject(kind, **params)
    with pytest.raises(MetadataError) as caught:
        client.get(KEY)
    assert caught.value.failure_class == failure_class
    assert client.get(KEY).value == "NONE"  # and the next request is fine


def test_redirect_is_never_followed(client: MetadataClient, sim: Simulator) -> None:
    sim.inject("redirect")
    with pytest.raises(MetadataError, match="redirect"):
        client.get(KEY)
    assert sim.stats()[KEY] == 1


def test_slow_answer_times_out(client: MetadataClient, sim: Simulator) -> None:
    sim.inject("delay", seconds=2)
    with pytest.raises(MetadataError) as caught:
        client.get(KEY, timeout=0.3)
    assert caught.value.failure_class == "timeout"


def test_refused_connection() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = MetadataClient(f"http://127.0.0.1:{port}/computeMetadata/v1/")
    with pytest.raises(MetadataError) as caught:
        client.get(KEY)
    assert caught.value.failure_class == "connection"


def test_identity_is_what_names_the_source(client: MetadataClient) -> None:
    instance = client.identity()
    assert (instance.id, instance.name, instance.zone, instance.project_id) == (
        "4520031799277579481",
        "demo-vm",
        "us-central1-a",
        "demo-project",
    )
    assert instance.project_number == "123456789012"


def test_identity_without_a_name_is_an_error_to_retry(
    client: MetadataClient, sim: Simulator
) -> None:
    sim.delete_value("instance/name")
    with pytest.raises(MetadataError, match="instance/name"):
        client.identity()


@pytest.mark.parametrize("rendering", ["string", "raw"])
def test_plain_values_read_the_same_whatever_alt_json_does(rendering: str) -> None:
    """Plain keys are asked with no alt, as Google's sample does; JSON-looking text is unwrapped
    too, so NONE and "NONE" read alike."""
    with Simulator(plain_alt_json=rendering) as sim:
        sim.start()
        client = MetadataClient(sim.url)
        try:
            assert client.get(KEY).value == "NONE"
            assert client.identity().name == "demo-vm"
            sim.set_value(KEY, '"MIGRATE_ON_HOST_MAINTENANCE"')  # a JSON string, served as text
            assert client.get(KEY).value == "MIGRATE_ON_HOST_MAINTENANCE"
            sim.set_value(KEY, "{odd")  # text that only looks like JSON stays what it is
            assert client.get(KEY).value == "{odd"
        finally:
            client.close()


def test_alt_json_raw_plain_value_reads_as_the_word() -> None:
    """Asked with alt=json, a server that renders a plain value raw answers `NONE`, which is
    not JSON: a bare upper-case word reads as itself; other text that is not JSON is refused."""
    with Simulator(plain_alt_json="raw") as sim:
        sim.start()
        client = MetadataClient(sim.url)
        try:
            assert client.get(KEY, alt="json").value == "NONE"
            sim.set_value(KEY, "{odd")
            with pytest.raises(MetadataError, match="not valid JSON"):
                client.get(KEY, alt="json")
        finally:
            client.close()


def test_enrichment(client: MetadataClient) -> None:
    hostname, scheduling, problems = client.enrichment()
    assert hostname == "demo-vm.us-central1-a.c.demo-project.internal"
    assert scheduling.on_host_maintenance == "MIGRATE"
    assert scheduling.automatic_restart == "TRUE"
    assert scheduling.provisioning_model == "STANDARD"
    assert problems == []


@pytest.mark.parametrize(
    ("mode", "problem"), [("text", "not valid JSON"), ("404", "not found"), ("broken", "JSON")]
)
def test_unreadable_scheduling_leaves_its_fields_empty(mode: str, problem: str) -> None:
    hostname, scheduling, problems = enrichment_under(mode)
    assert hostname.startswith("demo-vm.")
    assert scheduling == Scheduling()
    assert len(problems) == 1 and "instance/scheduling/" in problems[0]
    assert problem in problems[0]


def test_enrichment_never_raises(client: MetadataClient, sim: Simulator) -> None:
    sim.delete_value("instance/hostname")
    sim.inject("status", path="instance/scheduling/", status=503)
    hostname, scheduling, problems = client.enrichment()
    assert (hostname, scheduling) == ("", Scheduling())
    assert [p.split(":")[0] for p in problems] == ["instance/hostname", "instance/scheduling/"]


def test_watcher_errors_are_retried_fast_and_never_fatal(sim: Simulator, tmp_path) -> None:
    """A burst of 503s during a notice delays it by milliseconds, not the sample's seconds."""
    bridge = BridgeProcess(sim.url, tmp_path / "state")
    try:
        wait_for("a long poll", lambda: sim.stats().get(KEY, 0) >= 2)
        # The poll already hanging answers the first change; the faults hit the polls after it.
        sim.inject("status", count=5, path=KEY, status=503)
        sim.inject("reset", count=2, path=KEY)
        before = sim.stats()[KEY]
        sim.set_value(KEY, "MIGRATE_ON_HOST_MAINTENANCE")
        bridge.next_event(timeout=10)
        # 7 faulted answers, then a hanging poll again: retried every 25-50 ms, well under 8 s.
        wait_for("the retries through 7 faults", lambda: sim.stats()[KEY] >= before + 8, 8.0)
        sim.set_value(KEY, "NONE")
        _, event = bridge.next_event(timeout=10)
        assert event["data"]["current"] == "NONE"
        lines = [r["message"] for r in bridge.logs() if "metadata " in r.get("message", "")]
        assert sum("http_5xx" in m for m in lines) == 1, lines  # one line per failure class
    finally:
        assert bridge.terminate() == 0


def _answer(value: bytes, etag: bytes) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nMetadata-Flavor: Google\r\nContent-Type: application/text\r\n"
        b"ETag: %s\r\nContent-Length: %d\r\n\r\n%s" % (etag, len(value), value)
    )


def test_a_server_answering_twice_in_one_write_gives_no_false_transition() -> None:
    """The first connection's server writes the answer and, behind it, an older value: the
    next poll must get the server's own answer (the new value), not the stale one left
    behind, which the bridge would publish as a transition back."""
    listener = socket.create_server(("127.0.0.1", 0))
    connections: list[int] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            connections.append(1)
            threading.Thread(target=answer, args=(conn, len(connections)), daemon=True).start()

    def answer(conn: socket.socket, index: int) -> None:
        with conn:
            while conn.recv(65536):
                if index == 1:
                    migrate = _answer(b"MIGRATE_ON_HOST_MAINTENANCE", b"bbbb")
                    conn.sendall(migrate + _answer(b"NONE", b"aaaa"))
                else:
                    conn.sendall(_answer(b"MIGRATE_ON_HOST_MAINTENANCE", b"bbbb"))

    threading.Thread(target=serve, daemon=True).start()
    client = MetadataClient(f"http://127.0.0.1:{listener.getsockname()[1]}/computeMetadata/v1/")
    try:
        first = client.watch(KEY, "0", 60)
        second = client.watch(KEY, first.etag or "0", 60)
        sock = client.connection._sock
        assert sock is not None and sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
    finally:
        client.close()
        listener.close()
    assert first.value == second.value == "MIGRATE_ON_HOST_MAINTENANCE"
    assert len(connections) == 2
