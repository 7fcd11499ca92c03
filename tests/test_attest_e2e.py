"""`maintenance-bridge run --attest on`, end to end: a real bridge subprocess against the
simulator (whose identity endpoint signs format=full tokens with a test key) publishes to the
official Pub/Sub emulator, both transports and both content modes, or POSTs to a loopback
receiver; every event that arrives, decoded as a consumer decodes it, verifies with
`origin.check` at its publish (or receipt) time, and every Pub/Sub attribute value stays within
the 1024-byte limit. With the identity endpoint silent, events still go out promptly,
unattested, counted on /metrics and logged once."""

from __future__ import annotations

import itertools
import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote
from urllib.request import urlopen

import pytest
from support.bridge import BridgeProcess
from support.harness import free_port, wait_for
from support.pubsub import PubSubAdmin, PubSubServer, admin

from bridge.attestation import IDENTITY_PATH
from bridge.cli import parser
from bridge.config import build
from bridge.events import Event, decode_pubsub, decode_structured
from bridge.keys import MAINTENANCE
from bridge.origin import check, signed_part_of_message
from bridge.simulator import Simulator
from bridge.sinks.pubsub import TRANSPORTS

ATTRIBUTE_LIMIT = 1024  # bytes, Pub/Sub's limit on one attribute value
VALUES = ["MIGRATE_ON_HOST_MAINTENANCE", "NONE", "TERMINATE_ON_HOST_MAINTENANCE", "NONE"]


@pytest.fixture
def adm(pubsub: PubSubServer) -> Iterator[PubSubAdmin]:
    with admin(pubsub) as a:
        yield a


def flip_all(sim: Simulator, bridge: BridgeProcess) -> None:
    """Each of VALUES in turn, each recorded before the next."""
    for i, value in enumerate(VALUES, start=1):
        sim.set_value(MAINTENANCE, value)
        wait_for(
            f"transition {i} recorded",
            lambda i=i: sum(r["message"].startswith("maintenance.") for r in bridge.logs()) >= i,
            timeout=15,
            detail=lambda: bridge.logs()[-5:],
        )


@pytest.mark.parametrize(
    ("flags", "env", "attest"),
    [((), {}, False), (("--attest", "on"), {}, True), ((), {"BRIDGE_ATTEST": "on"}, True)],
)
def test_attest_is_off_by_default_and_on_by_flag_or_variable(
    flags: tuple[str, ...], env: dict[str, str], attest: bool
) -> None:
    args = parser().parse_args(["run", *flags])
    assert build(args, env, check_dirs=False).attest is attest


def test_a_bad_attest_value_exits_2_with_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "run", "--state-dir", str(tmp_path), "--attest", "maybe"],
        capture_output=True,
        text=True,
        timeout=30,
        env={k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")},
    )
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and "--attest" in result.stderr, result.stderr


def verified(
    sim: Simulator, event: Event, at: float, message: tuple[dict[str, str], bytes] | None = None
) -> None:
    """Verified as the decoded event and, given the message as published (attributes and
    payload), as the consumers digest it (`signed_part_of_message`)."""
    certs = sim.identity.certs()
    verdict = check(event, at=at, certs=certs)
    assert verdict.verified, (event.id, verdict.reason)
    if message is not None:
        verdict = check(event, at=at, certs=certs, signed=signed_part_of_message(*message))
        assert verdict.verified, (event.id, "as published", verdict.reason)


@pytest.mark.parametrize("mode", ["binary", "structured"])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_every_published_event_verifies_within_pubsubs_limits(
    pubsub: PubSubServer, adm: PubSubAdmin, tmp_path: Path, transport: str, mode: str
) -> None:
    suffix = uuid.uuid4().hex[:10]
    topic = adm.create_topic(f"attest-{suffix}")
    sub = adm.create_subscription(topic, f"attest-sub-{suffix}", ordering=True)
    with Simulator().start() as sim:
        bridge = BridgeProcess(
            sim.url, tmp_path / "state", "--topic", topic, "--pubsub-transport", transport,
            "--content-mode", mode, "--keys", MAINTENANCE, "--attest", "on",
            env=pubsub.env(),
        )  # fmt: skip
        try:
            wait_for("the first long-poll", lambda: sim.stats().get(MAINTENANCE, 0) >= 1)
            flip_all(sim, bridge)
            got = adm.pull_until(sub, len(VALUES), timeout=30, same=lambda m: m.message_id)
        finally:
            assert bridge.terminate() == 0, bridge.logs()[-5:]
        events = [(m, decode_pubsub(m.attributes, m.data)) for m in got]
        assert [e.data.current for _, e in events] == VALUES
        for message, event in events:
            at = message.publish_time.timestamp()
            verified(sim, event, at, (message.attributes, message.data))
            sizes = [len(v.encode()) for v in message.attributes.values()]
            assert max(sizes) <= ATTRIBUTE_LIMIT, sizes
            pieces = [k for k in message.attributes if "attestation" in k]
            assert len(pieces) == (2 if mode == "binary" else 0), message.attributes
    assert not [r for r in bridge.logs() if "unattested" in r.get("message", "")]


class _Receiver(ThreadingHTTPServer):
    """Loopback CloudEvents receiver: (receipt time, headers, body) of each POST, answered 200."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.daemon_threads = True
        self.got: queue.Queue[tuple[float, dict[str, str], bytes]] = queue.Queue()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.got.put((time.time(), dict(self.headers.items()), body))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        return None


def attributes_of(headers: dict[str, str]) -> dict[str, str]:
    """A POST's `ce-*` headers (percent-encoded values) and Content-Type, named as the Pub/Sub
    binding's attributes: what a receiver decodes and digests."""
    attributes = {k.lower(): unquote(v) for k, v in headers.items() if k.lower().startswith("ce-")}
    attributes["content-type"] = headers.get("Content-Type", "")
    return attributes


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_every_event_posted_by_the_http_sink_verifies(tmp_path: Path, mode: str) -> None:
    receiver = _Receiver()
    serving = threading.Thread(target=receiver.serve_forever, args=(0.05,), daemon=True)
    serving.start()
    url = f"http://127.0.0.1:{receiver.server_address[1]}/events"
    try:
        with Simulator().start() as sim:
            bridge = BridgeProcess(
                sim.url, tmp_path / "state", "--sink", "http", "--http-url", url,
                "--content-mode", mode, "--keys", MAINTENANCE, "--attest", "on",
            )  # fmt: skip
            try:
                wait_for("the first long-poll", lambda: sim.stats().get(MAINTENANCE, 0) >= 1)
                flip_all(sim, bridge)
                posts = [receiver.got.get(timeout=15) for _ in VALUES]
            finally:
                assert bridge.terminate() == 0, bridge.logs()[-5:]
            messages = [(at, attributes_of(headers), body) for at, headers, body in posts]
            events = [(at, decode_pubsub(a, body), (a, body)) for at, a, body in messages]
            assert [e.data.current for _, e, _ in events] == VALUES
            for at, event, message in events:
                verified(sim, event, at, message)
    finally:
        receiver.shutdown()
        receiver.server_close()
        serving.join(5)


def unattested_total(port: int) -> float:
    with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith("maintenance_bridge_events_unattested_total "):
                return float(line.split()[1])
    raise AssertionError("no maintenance_bridge_events_unattested_total on /metrics")


def test_a_silent_identity_endpoint_delays_no_event_for_long(tmp_path: Path) -> None:
    """The identity endpoint takes requests and never answers in time: every change still
    reaches stdout promptly, unattested, counted and logged once; once the endpoint answers
    again, the next event is attested."""
    port = free_port()
    with Simulator().start() as sim:
        sim.inject("delay", count=1000, path=IDENTITY_PATH, seconds=5.0)
        bridge = BridgeProcess(
            sim.url, tmp_path / "state", "--keys", MAINTENANCE, "--attest", "on",
            "--http-port", str(port),
        )  # fmt: skip
        try:
            wait_for("the first long-poll", lambda: sim.stats().get(MAINTENANCE, 0) >= 1)
            delays = []
            for value in VALUES:
                changed = time.monotonic()
                sim.set_value(MAINTENANCE, value)
                arrived, line = bridge.next_event(timeout=10)
                assert line["data"]["current"] == value
                assert not [k for k in line if k.startswith("attestation")], "unattested"
                delays.append(arrived - changed)
            # Two 0.75 s attempts for the outage's first event, one 0.25 s attempt for each later
            # one (plus the bridge's own path, on a loaded machine).
            print("change -> unattested stdout line, s:", [round(d, 3) for d in delays])
            assert delays[0] < 3.0 and max(delays[1:]) < 1.5, delays
            assert unattested_total(port) == len(VALUES)
            logged = [r for r in bridge.logs() if "unattested" in r.get("message", "")]
            assert len(logged) == 1, logged
            sim.clear_faults()
            deadline = time.monotonic() + 20
            for value in itertools.cycle(VALUES[:2]):  # an outage's request may still be delayed
                sim.set_value(MAINTENANCE, value)
                _, line = bridge.next_event(timeout=10)
                if "attestation1" in line:
                    break
                assert time.monotonic() < deadline, "never attested again"
            verified(sim, decode_structured(line), time.time())
        finally:
            assert bridge.terminate() == 0, bridge.logs()[-5:]
