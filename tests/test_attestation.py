"""Verified origin, bridge side: the tokens `Attestor` fetches from the simulated metadata server
(signed by its test key, claims as Compute Engine's) and `AttestingSink` puts on events verify
with `origin.check` only on the event of the VM that signed them, bound to that event, under the
key that signed them; when no token can be had, events go out at once, unattested, counted,
and logged once per outage."""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client import Counter
from support.memory_sink import MemorySink

from bridge import attestation
from bridge.attestation import IDENTITY_PATH, QUICK, TIMEOUT, AttestingSink, Attestor
from bridge.events import MAINTENANCE, Event, Scheduling, Transition, build_event
from bridge.metadata import MetadataClient
from bridge.metrics import Metrics
from bridge.origin import PIECE, Certs, Verdict, binding, binding_of, check, signed_part, with_token
from bridge.simulator.state import Simulator

# Pub/Sub's limit on one attribute value, in bytes.
ATTRIBUTE_LIMIT = 1024


@pytest.fixture
def counter() -> Counter:
    """The daemon's count of unattested events (registered with --attest on)."""
    return Metrics().unattested()


@pytest.fixture
def attestor(sim: Simulator, counter: Counter) -> Iterator[Attestor]:
    made = Attestor(MetadataClient(sim.url), counter.inc)
    try:
        yield made
    finally:
        made.close()


def unattested(counter: Counter) -> float:
    return counter._value.get()


def identity_requests(sim: Simulator) -> int:
    return sim.stats().get(IDENTITY_PATH, 0)


def event_of(sim: Simulator, sequence: int = 1) -> Event:
    """An event as the bridge builds it for the simulated VM (its identity read from it)."""
    client = MetadataClient(sim.url)
    try:
        instance = client.identity()
    finally:
        client.close()
    return build_event(
        Transition(MAINTENANCE, "NONE", "MIGRATE_ON_HOST_MAINTENANCE", "maintenance.started"),
        event_id=f"e-{sequence}",
        sequence=sequence,
        observed_at=datetime.now(timezone.utc),
        instance=instance,
        scheduling=Scheduling(),
        happened_while_down=False,
        notice_seconds=60,
    )


def attested(sim: Simulator, attestor: Attestor, event: Event) -> Event:
    token = attestor.token(binding_of(event))
    assert token is not None
    return with_token(event, token)


def verdict(sim: Simulator, event: Event, **over: object) -> Verdict:
    args: dict = {"at": time.time(), "certs": sim.identity.certs()}
    args.update(over)
    return check(event, **args)


def test_a_genuine_token_verifies_and_fits_pubsubs_attribute_limit(
    sim: Simulator, attestor: Attestor
):
    event = attested(sim, attestor, event_of(sim))
    assert verdict(sim, event).verified
    # A format=full token (the simulator mirrors the real claims): measured 1188 bytes,
    # over one attribute value, so it travels in pieces; every binary-mode attribute fits.
    token = "".join(v for k, v in event.extensions.items() if k.startswith("attestation"))
    print(f"format=full token: {len(token.encode())} bytes")
    assert len(token.encode()) > ATTRIBUTE_LIMIT
    attributes, _ = event.to_pubsub("binary")
    assert {"ce-attestation1", "ce-attestation2"} <= set(attributes)
    assert max(len(v.encode()) for v in attributes.values()) <= PIECE <= ATTRIBUTE_LIMIT


def test_another_instances_token_is_refused(sim: Simulator, attestor: Attestor):
    event = event_of(sim)
    sim.set_value("instance/id", "999")  # the token now names another VM
    forged = attested(sim, attestor, event)
    got = verdict(sim, forged)
    assert not got.verified and "instance_id" in got.reason


def test_a_replayed_token_on_a_new_event_is_refused(sim: Simulator, attestor: Attestor):
    first = attested(sim, attestor, event_of(sim, 1))
    second = event_of(sim, 2)
    replayed = with_token(
        second, first.extensions["attestation1"] + first.extensions["attestation2"]
    )
    got = verdict(sim, replayed)
    assert not got.verified and "audience" in got.reason


def test_a_tampered_payload_is_refused(sim: Simulator, attestor: Attestor):
    original = event_of(sim)
    event = attested(sim, attestor, original)
    data = replace(original.data, current="TERMINATE_ON_HOST_MAINTENANCE")
    tampered = replace(original, data=data)
    token = event.extensions["attestation1"] + event.extensions["attestation2"]
    got = verdict(sim, with_token(tampered, token))
    assert not got.verified and "audience" in got.reason
    # The claims re-written to bind the altered event, the signature kept: refused.
    head, body, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims["aud"] = binding(signed_part(tampered))
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    got = verdict(sim, with_token(tampered, f"{head}.{forged}.{sig}"))
    assert not got.verified and "signature" in got.reason


def test_a_token_under_another_key_is_refused(sim: Simulator, attestor: Attestor):
    event = attested(sim, attestor, event_of(sim))
    certs = Simulator().identity.certs()
    assert "key id" in verdict(sim, event, certs=certs).reason
    # The other key's certificate under this token's key id: the signature decides.
    kid = next(iter(sim.identity.certs()))
    assert "signature" in verdict(sim, event, certs={kid: next(iter(certs.values()))}).reason


def test_expiry_is_judged_at_the_events_time(sim: Simulator, attestor: Attestor):
    event = attested(sim, attestor, event_of(sim))
    issued = time.time()
    assert verdict(sim, event, at=issued).verified  # redelivered later, judged when published
    assert "not valid" in verdict(sim, event, at=issued + 5 * 3600).reason


def test_a_resend_reuses_its_token_while_it_has_five_minutes_left(
    sim: Simulator, attestor: Attestor, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(attestation, "CACHED", 1)  # bounded: room for one token here
    first, second = event_of(sim, 1), event_of(sim, 2)
    token = attestor.token(binding_of(first))
    assert attestor.token(binding_of(first)) == token
    assert identity_requests(sim) == 1, "the resend asked for no new token"
    assert attestor.token(binding_of(second)) != token
    assert identity_requests(sim) == 2, "another event, another token"
    attestor.token(binding_of(first))
    assert identity_requests(sim) == 3, "the first token was forgotten for the second"
    # A token with less than 5 minutes left is not sent again: a new one is fetched.
    sim.identity.configure(lifetime=299)
    third = event_of(sim, 3)
    attestor.token(binding_of(third))
    attestor.token(binding_of(third))
    assert identity_requests(sim) == 5


def test_no_token_means_unattested_promptly_counted_and_logged_once(
    counter: Counter, caplog: pytest.LogCaptureFixture
):
    attestor = Attestor(MetadataClient("http://127.0.0.1:9/computeMetadata/v1/"), counter.inc)
    try:
        started = time.monotonic()
        assert attestor.token("a") is None
        assert attestor.token("b") is None
        assert time.monotonic() - started < 1.0, "a refused connection fails at once"
    finally:
        attestor.close()
    assert unattested(counter) == 2
    assert sum("unattested" in r.getMessage() for r in caplog.records) == 1


def test_a_silent_identity_endpoint_holds_each_event_briefly_then_recovers(
    sim: Simulator, attestor: Attestor, counter: Counter, caplog: pytest.LogCaptureFixture
):
    """The endpoint takes requests and answers none in time: the first event of the outage
    waits for two attempts, every later one for one quick attempt; once it answers again the
    next event is attested and the recovery logged once."""
    caplog.set_level(logging.INFO, logger=attestation.LOG.name)
    sim.inject("delay", count=100, path=IDENTITY_PATH, seconds=3.0)
    started = time.monotonic()
    assert attestor.token("first") is None
    first = time.monotonic() - started
    assert first < 2 * TIMEOUT + 0.5, first
    held = []
    for n in range(5):
        started = time.monotonic()
        assert attestor.token(f"next-{n}") is None
        held.append(time.monotonic() - started)
    assert max(held) < QUICK + 0.3, held
    assert unattested(counter) == 6
    sim.clear_faults()
    deadline = time.monotonic() + 10
    while attestor.token("again") is None:  # a delayed request may still hold the connection
        assert time.monotonic() < deadline
    messages = [r.getMessage() for r in caplog.records]
    assert sum("unattested" in m for m in messages) == 1, messages
    assert sum("available again" in m for m in messages) == 1, messages


def test_a_server_slower_than_the_quick_attempt_still_ends_the_outage(
    sim: Simulator, attestor: Attestor, counter: Counter, monkeypatch: pytest.MonkeyPatch
):
    """Two failures open an outage; the server then answers, but slower than a quick attempt
    waits: the next full attempt (PROBE seconds on) gets the token and ends the outage."""
    monkeypatch.setattr(attestation, "PROBE", 1.0)
    sim.inject("status", count=2, path=IDENTITY_PATH, status=503)
    sim.inject("delay", count=100, path=IDENTITY_PATH, seconds=QUICK + 0.3)
    assert attestor.token("first") is None
    assert attestor.token("quick") is None, "a quick attempt gives up on the slow server"
    time.sleep(1.0)
    assert attestor.token("probe") is not None
    assert attestor.token("after") is not None, "the outage is over: full attempts again"
    assert unattested(counter) == 2


class _Garbling(BaseHTTPRequestHandler):
    """A metadata server whose identity endpoint answers 200 with something not a JWT."""

    def do_GET(self) -> None:
        body = b"not-a-jwt"
        self.send_response(200)
        self.send_header("Metadata-Flavor", "Google")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return None


def test_an_answer_that_is_no_token_means_unattested(counter: Counter):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Garbling)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/computeMetadata/v1/"
    attestor = Attestor(MetadataClient(url), counter.inc)
    try:
        assert attestor.token("a") is None
    finally:
        attestor.close()
        server.shutdown()
        server.server_close()
    assert unattested(counter) == 1


def test_the_sink_sends_the_event_with_its_token_or_as_it_is(sim: Simulator, counter: Counter):
    inner = MemorySink()
    sink = AttestingSink(inner, Attestor(MetadataClient(sim.url), counter.inc))
    assert sink.name == inner.name, "the registry's failure classes still apply"
    event = event_of(sim)
    assert sink.send(event).result(1) == event.id
    sent = inner.sends[-1].event
    assert sent.id == event.id and verdict(sim, sent).verified
    assert "attestation1" not in event.extensions, "the caller's (stored) event is untouched"
    sink.recover(event)
    assert inner.recovered == [event.id]
    sim.inject("status", count=2, path=IDENTITY_PATH, status=503)
    other = event_of(sim, 2)
    sink.send(other).result(1)
    assert inner.sends[-1].event == other, "no token: the event as it is"
    assert unattested(counter) == 1
    sink.close()


def test_certs_are_fetched_from_the_configured_url_and_cached(sim: Simulator, attestor: Attestor):
    event = attested(sim, attestor, event_of(sim))
    certs = Certs(f"http://{sim.host_port}/simulator/v1/identity/certs")
    assert verdict(sim, event, certs=certs.get()).verified
    sim.stop()  # a cached set answers without the server
    assert certs.get() == sim.identity.certs()
