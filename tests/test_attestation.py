"""Verified origin, bridge side to verifier: tokens fetched from the simulated metadata server
(signed by its test key, claims as Compute Engine's) are accepted only on the event of the VM
that signed them, bound to that event, under the key that signed them."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator

import pytest

from bridge.attestation import Attestor
from bridge.metadata import MetadataClient
from bridge.origin import Certs, Forged, binding, verify
from bridge.simulator.state import Simulator

INSTANCE = "4520031799277579481"
PROJECT = "demo-project"
EVENT = {"id": "e-1", "type": "maintenance.started", "instance": INSTANCE, "data": "abc"}
# Pub/Sub's limit on one attribute value, in bytes.
ATTRIBUTE_LIMIT = 1024


@pytest.fixture
def attestor(sim: Simulator) -> Iterator[Attestor]:
    client = MetadataClient(sim.url)
    try:
        yield Attestor(client)
    finally:
        client.close()


def check(sim: Simulator, token: str, fields: dict[str, str], **over: object) -> dict:
    args: dict = {
        "audience": binding(fields),
        "instance_id": INSTANCE,
        "project_id": PROJECT,
        "at": time.time(),
        "certs": sim.identity.certs(),
    }
    args.update(over)
    return verify(token, **args)


def test_a_genuine_token_verifies_and_its_size_is_measured(sim: Simulator, attestor: Attestor):
    token = attestor.token(EVENT)
    assert token is not None
    claims = check(sim, token, EVENT)
    assert claims["google"]["compute_engine"]["instance_id"] == INSTANCE
    # A format=full token (the simulator mirrors the real claims) against the attribute limit.
    # Measured 1188 bytes: over one attribute, so it travels split in two attributes or in
    # the body, never whole in one attribute value.
    size = len(token.encode())
    print(f"format=full token: {size} bytes")
    assert ATTRIBUTE_LIMIT < size <= 2 * ATTRIBUTE_LIMIT


def test_another_instances_token_is_refused(sim: Simulator, attestor: Attestor):
    sim.set_value("instance/id", "999")
    token = attestor.token(EVENT)
    assert token is not None
    with pytest.raises(Forged, match="instance"):
        check(sim, token, EVENT)


def test_a_replayed_token_on_a_new_event_is_refused(sim: Simulator, attestor: Attestor):
    token = attestor.token(EVENT)
    assert token is not None
    with pytest.raises(Forged, match="audience"):
        check(sim, token, {**EVENT, "id": "e-2"})


def test_a_tampered_payload_is_refused(sim: Simulator, attestor: Attestor):
    token = attestor.token(EVENT)
    assert token is not None
    with pytest.raises(Forged, match="audience"):
        check(sim, token, {**EVENT, "data": "abd"})
    # The claims re-written to bind the altered event, the signature kept: refused.
    head, body, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims["aud"] = binding({**EVENT, "data": "abd"})
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    with pytest.raises(Forged, match="signature"):
        check(sim, f"{head}.{forged}.{sig}", {**EVENT, "data": "abd"})


def test_a_token_under_another_key_is_refused(sim: Simulator, attestor: Attestor):
    token = attestor.token(EVENT)
    assert token is not None
    other = Simulator()
    certs = other.identity.certs()
    with pytest.raises(Forged, match="key id"):
        check(sim, token, EVENT, certs=certs)
    # The other key's certificate under this token's key id: the signature decides.
    kid = next(iter(sim.identity.certs()))
    with pytest.raises(Forged, match="signature"):
        check(sim, token, EVENT, certs={kid: next(iter(certs.values()))})


def test_expiry_is_judged_at_the_events_time(sim: Simulator, attestor: Attestor):
    token = attestor.token(EVENT)
    assert token is not None
    issued = time.time()
    hours_later = issued + 5 * 3600
    check(sim, token, EVENT, at=issued)  # redelivered later, judged when it was issued
    with pytest.raises(Forged, match="not valid"):
        check(sim, token, EVENT, at=hours_later)


def test_no_token_means_unattested_promptly_counted_and_logged_once(
    sim: Simulator, caplog: pytest.LogCaptureFixture
):
    client = MetadataClient("http://127.0.0.1:9/computeMetadata/v1/", connect_timeout=0.5)
    attestor = Attestor(client, timeout=0.5)
    try:
        started = time.monotonic()
        assert attestor.token(EVENT) is None
        assert attestor.token({**EVENT, "id": "e-2"}) is None
        assert time.monotonic() - started < 3.0
    finally:
        client.close()
    assert attestor.unattested == 2
    assert sum("unattested" in r.getMessage() for r in caplog.records) == 1


def test_certs_are_fetched_from_the_configured_url_and_cached(sim: Simulator, attestor: Attestor):
    token = attestor.token(EVENT)
    assert token is not None
    certs = Certs(f"http://{sim.host_port}/simulator/v1/identity/certs")
    check(sim, token, EVENT, certs=certs.get())
    sim.stop()  # a cached set answers without the server
    assert certs.get() == sim.identity.certs()
