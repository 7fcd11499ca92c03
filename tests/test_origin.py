"""The attestation contract of bridge/origin.py, function by function (issue 26).

Tokens are signed here by a key of the test's own (a self-signed certificate served as Google's
`oauth2/v1/certs` would serve it), so that every claim and header can be set, wrong ones
included; the bridge's real path (the simulator's metadata server, the functions) is held in
tests/test_attestation.py and tests/test_functions.py.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import pytest

from bridge import origin
from bridge.events import Event, decode_pubsub, decode_structured
from bridge.simulator.identity import self_signed
from bridge.simulator.state import Simulator

REPO = Path(__file__).resolve().parents[1]
GOLDEN = sorted(
    p
    for p in (REPO / "schemas" / "examples").glob("*.json")
    if not p.name.endswith(".pubsub.json") and not p.name.startswith(("logentry.", "envelope."))
)
NOW = 1_900_000_000


class Signer:
    """An RSA key, its certificate under a key id, and RS256 tokens of any claims."""

    def __init__(self) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from google.auth import crypt

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        cert = self_signed(key, "test-origin", days=2)
        self.kid = "test-key-1"
        self.certs = {self.kid: cert.public_bytes(serialization.Encoding.PEM).decode()}
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self._signer = crypt.RSASigner.from_string(pem, key_id=self.kid)

    def token(self, claims: dict[str, Any], **header: Any) -> str:
        from google.auth import jwt

        return jwt.encode(self._signer, claims, header=header or None).decode()


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer()


def golden(name: str) -> Event:
    return decode_structured(json.loads((REPO / "schemas" / "examples" / name).read_text()))


def vm_claims(event: Event, **over: Any) -> dict[str, Any]:
    """The claims of the event's own VM's format=full token, bound to the event."""
    inst = event.data.instance
    compute = {"instance_id": inst.id, "project_id": inst.project_id, "zone": inst.zone}
    claims: dict[str, Any] = {
        "iss": "https://accounts.google.com",
        "aud": origin.binding_of(event),
        "iat": NOW,
        "exp": NOW + 3600,
        "email": "123-compute@developer.gserviceaccount.com",
        "email_verified": True,
        "google": {"compute_engine": compute},
    }
    claims.update(over)
    return claims


STARTED = "maintenance.started.json"


def b64(obj: Any) -> str:
    """A JWT segment of `obj` (base64url, no padding)."""
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")


# --- canonical, binding, signed_part, binding_of ----------------------------------------------


def test_canonical_is_sorted_compact_ascii_json() -> None:
    obj = {"b": [1, {"z": None, "a": True}], "a": "é\n\u2028", "é": 1.5}
    assert origin.canonical(obj) == (
        b'{"a":"\\u00e9\\n\\u2028","b":[1,{"a":true,"z":null}],"\\u00e9":1.5}'
    )


def test_binding_is_the_prefixed_sha256_of_the_canonical_form() -> None:
    obj = {"id": "e-1", "data": {"k": "v"}}
    digest = hashlib.sha256(b'{"data":{"k":"v"},"id":"e-1"}').hexdigest()
    assert origin.binding(obj) == "maintenance-bridge:v1:" + digest
    assert origin.binding({**obj, "id": "e-2"}) != origin.binding(obj)


def test_signed_part_leaves_out_the_token_and_the_content_type_only() -> None:
    event = origin.with_token(golden(STARTED), "a.b.c")
    part = origin.signed_part(event)
    structured = event.to_structured()
    assert "attestation1" in structured and "datacontenttype" in structured
    assert set(structured) - set(part) == {"attestation1", "datacontenttype"}
    assert {"instanceid", "zone", "project", "id", "source", "data"} <= set(part)
    assert origin.binding_of(event) == origin.binding(part)
    # The token does not change what it signs: attested or not, the same audience.
    assert origin.binding_of(event) == origin.binding_of(golden(STARTED))


@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: p.stem)
def test_the_binding_survives_every_transport_of_every_golden_event(path: Path) -> None:
    """What a consumer decodes, in either content mode, binds as what the producer signed."""
    event = decode_structured(json.loads(path.read_text()))
    expected = origin.binding_of(event)
    token = "h." + "x" * 1500 + ".s"  # two pieces
    attested = origin.with_token(event, token)
    for mode in ("binary", "structured"):
        attributes, payload = attested.to_pubsub(mode)
        assert all(len(v.encode()) <= 1024 for v in attributes.values()), mode
        decoded = decode_pubsub(attributes, payload)
        assert origin.binding_of(decoded) == expected, mode
        assert origin.token_of(decoded) == token, mode
    again = decode_structured(json.loads(json.dumps(attested.to_structured())))
    assert origin.binding_of(again) == expected and origin.token_of(again) == token


# --- with_token, token_of ---------------------------------------------------------------------


def test_pieces_round_trip_in_order_within_the_attribute_limit() -> None:
    event = golden(STARTED)
    assert origin.token_of(event) is None
    for length in (1, origin.PIECE, origin.PIECE + 1, 1188, origin.PIECE * origin.MAX_PIECES):
        token = "".join(chr(ord("a") + i % 26) for i in range(length))
        attested = origin.with_token(event, token)
        pieces = {k: v for k, v in attested.extensions.items() if k.startswith("attestation")}
        assert len(pieces) == -(-length // origin.PIECE)
        assert all(len(v) <= origin.PIECE for v in pieces.values())
        assert origin.token_of(attested) == token
    # Attested again with a shorter token: no piece of the old one is left behind.
    long = origin.with_token(event, "x" * (3 * origin.PIECE))
    short = origin.with_token(long, "y")
    assert "attestation2" not in short.extensions and origin.token_of(short) == "y"


def test_an_empty_or_oversized_token_is_refused() -> None:
    with pytest.raises(ValueError):
        origin.with_token(golden(STARTED), "")
    with pytest.raises(ValueError):
        origin.with_token(golden(STARTED), "x" * (origin.PIECE * origin.MAX_PIECES + 1))


def test_pieces_with_a_gap_are_a_malformed_token(signer: Signer) -> None:
    event = origin.with_token(golden(STARTED), "x" * (3 * origin.PIECE))
    extensions = {k: v for k, v in event.extensions.items() if k != "attestation2"}
    gapped = dataclasses.replace(event, extensions=extensions)
    assert origin.token_of(gapped) == "."
    verdict = origin.check(gapped, at=NOW, certs=signer.certs)
    assert verdict == origin.Verdict(False, True, verdict.reason)
    assert verdict.reason.startswith("malformed token")
    starts_at_two = dataclasses.replace(event, extensions={"attestation2": "x", "zone": "z"})
    assert origin.token_of(starts_at_two) == "."


# --- verify -----------------------------------------------------------------------------------


def test_a_genuine_token_gives_its_claims(signer: Signer) -> None:
    event = golden(STARTED)
    claims = vm_claims(event)
    token = signer.token(claims)
    audience = origin.binding_of(event)
    assert origin.verify(token, audience=audience, at=NOW, certs=signer.certs) == claims
    legacy = signer.token(vm_claims(event, iss="accounts.google.com"))
    assert origin.verify(legacy, audience=audience, at=NOW, certs=signer.certs)["iss"]


def _refused(signer: Signer, token: str, match: str, **over: Any) -> None:
    args: dict[str, Any] = {
        "audience": origin.binding_of(golden(STARTED)),
        "at": NOW,
        "certs": signer.certs,
    }
    args.update(over)
    with pytest.raises(origin.Forged, match=match):
        origin.verify(token, **args)


def test_malformed_tokens_are_forged(signer: Signer) -> None:
    for token in ("", "a.b", "a.b.c.d", "!!.??.**", "e30.e30"):
        _refused(signer, token, "malformed")
    good = signer.token(vm_claims(golden(STARTED)))
    head, _, sig = good.split(".")
    _refused(signer, f"{head}.{b64([1])}.{sig}", "not an object")


def test_only_rs256_under_a_known_key_with_a_valid_signature(signer: Signer) -> None:
    claims = vm_claims(golden(STARTED))
    token = signer.token(claims)
    head, body, sig = token.split(".")
    none_head = b64({"alg": "none", "kid": signer.kid})
    _refused(signer, f"{none_head}.{body}.", "algorithm 'none'")
    _refused(signer, token, "unknown key id", certs={"other": next(iter(signer.certs.values()))})
    other = Signer()
    _refused(signer, token, "signature", certs={signer.kid: other.certs[other.kid]})
    _refused(signer, f"{head}.{body}.{sig[:-4]}AAAA", "signature")
    forged_body = signer.token({**claims, "aud": "else"}).split(".")[1]
    _refused(signer, f"{head}.{forged_body}.{sig}", "signature")


def test_issuer_audience_and_times_are_checked(signer: Signer) -> None:
    event = golden(STARTED)
    _refused(signer, signer.token(vm_claims(event, iss="https://evil.example")), "issuer")
    _refused(signer, signer.token(vm_claims(event, aud="maintenance-bridge:v1:00")), "audience")
    no_exp = {k: v for k, v in vm_claims(event).items() if k != "exp"}
    _refused(signer, signer.token(no_exp), "iat/exp")
    _refused(signer, signer.token(vm_claims(event, iat="now")), "iat/exp")


def test_validity_is_judged_at_the_publish_time_with_the_skew(signer: Signer) -> None:
    event = golden(STARTED)
    token = signer.token(vm_claims(event))
    audience = origin.binding_of(event)
    lo, hi = NOW - origin.SKEW, NOW + 3600 + origin.SKEW
    for at in (lo, NOW, hi):
        origin.verify(token, audience=audience, at=at, certs=signer.certs)
    for at in (lo - 1, hi + 1, time.time()):
        _refused(signer, token, "not valid", at=at)


# --- vouches_for, check -----------------------------------------------------------------------


def _moved(event: Event, where: str, claim: str) -> Event:
    """The event saying another `claim` in its extensions or in its data."""
    if where == "extensions":
        name = {"instance_id": "instanceid", "project_id": "project", "zone": "zone"}[claim]
        return dataclasses.replace(event, extensions={**event.extensions, name: "other"})
    field = {"instance_id": "id", "project_id": "project_id", "zone": "zone"}[claim]
    instance = dataclasses.replace(event.data.instance, **{field: "other"})
    return dataclasses.replace(event, data=dataclasses.replace(event.data, instance=instance))


@pytest.mark.parametrize("where", ["extensions", "data"])
@pytest.mark.parametrize("claim", ["instance_id", "project_id", "zone"])
def test_a_vm_vouches_only_for_its_own_instance_project_and_zone(claim: str, where: str) -> None:
    event = golden(STARTED)
    claims = vm_claims(event)
    origin.vouches_for(claims, event)
    with pytest.raises(origin.Forged, match=claim):
        origin.vouches_for(claims, _moved(event, where, claim))


def test_a_token_without_compute_engine_claims_vouches_for_no_vm() -> None:
    event = golden(STARTED)
    for google in (None, {}, {"compute_engine": "x"}):
        claims = {k: v for k, v in vm_claims(event).items() if k != "google"}
        if google is not None:
            claims["google"] = google
        with pytest.raises(origin.Forged, match="compute_engine"):
            origin.vouches_for(claims, event)


def test_a_cloud_event_is_vouched_for_by_the_cloud_identity_only() -> None:
    event = golden("cloud.host_error.json")
    assert event.data.origin == "cloud"
    identity = "sysev@p.iam.gserviceaccount.com"
    claims = {"email": identity, "email_verified": True}
    origin.vouches_for(claims, event, cloud_identity=identity)
    with pytest.raises(origin.Forged, match="no cloud identity"):
        origin.vouches_for(claims, event)
    with pytest.raises(origin.Forged, match="not 'other@"):
        origin.vouches_for(claims, event, cloud_identity="other@p.iam.gserviceaccount.com")
    with pytest.raises(origin.Forged, match="signed by"):
        origin.vouches_for({**claims, "email_verified": False}, event, cloud_identity=identity)
    # The VM the event names cannot speak as the cloud, with its format=full token.
    vm = vm_claims(event)
    with pytest.raises(origin.Forged, match="signed by"):
        origin.vouches_for(vm, event, cloud_identity=identity)


def test_check_gives_the_verdict_and_never_raises_for_a_bad_token(signer: Signer) -> None:
    event = golden(STARTED)
    assert origin.check(event, at=NOW, certs={}) == origin.Verdict(False, False, "unattested")
    genuine = origin.with_token(event, signer.token(vm_claims(event)))
    assert origin.check(genuine, at=NOW, certs=signer.certs) == origin.Verdict(True, True)
    other_vm = origin.with_token(
        _moved(event, "data", "instance_id"), signer.token(vm_claims(event))
    )
    verdict = origin.check(other_vm, at=NOW, certs=signer.certs)
    assert (verdict.verified, verdict.attested) == (False, True) and verdict.reason
    cloud = golden("cloud.host_error.json")
    identity = "sysev@p.iam.gserviceaccount.com"
    claims = {**vm_claims(cloud), "email": identity}
    attested = origin.with_token(cloud, signer.token(claims))
    assert origin.check(attested, at=NOW, certs=signer.certs, cloud_identity=identity).verified
    assert not origin.check(attested, at=NOW, certs=signer.certs).verified


# --- Policy, Certs ----------------------------------------------------------------------------


def test_policy_from_the_environment() -> None:
    default = origin.Policy.from_env({})
    assert default == origin.Policy(True, origin.GOOGLE_CERTS_URL, "")
    cases = (
        ("false", False),
        (" OFF ", False),
        ("0", False),
        ("yes", True),
        ("", True),
        (" ", True),
    )
    for raw, wanted in cases:
        assert origin.Policy.from_env({"REQUIRE_ATTESTATION": raw}).require_attestation is wanted
    env = {
        "REQUIRE_ATTESTATION": "true",
        "ATTESTATION_CERTS_URL": "http://127.0.0.1:1/certs",
        "CLOUD_EVENTS_IDENTITY": "sysev@p.iam.gserviceaccount.com",
    }
    assert origin.Policy.from_env(env) == origin.Policy(
        True, "http://127.0.0.1:1/certs", "sysev@p.iam.gserviceaccount.com"
    )
    assert origin.Policy.from_env({"ATTESTATION_CERTS_URL": ""}).certs_url == (
        origin.GOOGLE_CERTS_URL
    )
    for bad in ("maybe", "2", "enabled"):
        with pytest.raises(ValueError, match="REQUIRE_ATTESTATION"):
            origin.Policy.from_env({"REQUIRE_ATTESTATION": bad})


def test_certs_are_fetched_once_per_ttl_and_a_failure_raises(sim: Simulator) -> None:
    url = f"http://{sim.host_port}/simulator/v1/identity/certs"
    cached = origin.Certs(url)
    assert cached.get() == sim.identity.certs()
    sim.stop()
    assert cached.get() == sim.identity.certs()  # within the ttl: no fetch
    with pytest.raises(OSError):
        origin.Certs(url, ttl=0).get()


def test_a_key_id_the_cache_lacks_fetches_the_certificates_again_at_most_once_a_minute(
    sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key that came in since the last fetch (Google rotates them) is not a forgery: the
    certificates are fetched again for it, but a made-up key id costs one fetch a minute."""
    url = f"http://{sim.host_port}/simulator/v1/identity/certs"
    fetches: list[str] = []
    real = origin.urllib.request.urlopen

    def counted(*args: object, **kwargs: object) -> object:
        fetches.append(url)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(origin.urllib.request, "urlopen", counted)
    certs = origin.Certs(url)
    kid = next(iter(sim.identity.certs()))
    assert kid in certs.get("made-up")  # the first fetch
    assert len(fetches) == 1
    certs.get("made-up")  # unknown, but fetched less than REFETCH ago
    certs.get(kid)
    assert len(fetches) == 1
    monkeypatch.setattr(certs, "REFETCH", 0.0)
    certs.get(kid)  # known: no fetch
    assert len(fetches) == 1
    certs.get("rotated-in")
    assert len(fetches) == 2


def test_the_key_id_is_read_from_the_header_or_none() -> None:
    header = base64.urlsafe_b64encode(b'{"alg":"RS256","kid":"k1"}').decode().rstrip("=")
    assert origin.key_id(f"{header}.e30.c2ln") == "k1"
    assert origin.key_id("not a token") is None
    assert origin.key_id(".") is None
