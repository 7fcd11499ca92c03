"""Verified origin: check that the VM which signed an event's identity token is the VM the
event speaks for.

Standard library only, because it is vendored into every function's zip (and into any
consumer) next to bridge/events.py: RS256 is checked with `pow` against the RSA key of Google's
PEM certificates (`oauth2/v1/certs`, `{kid: PEM}`), which are fetched once and cached.

The contract (docs/events.md, "Verified origin"), the same in every content mode and sink:
- the token travels in the extension attributes `attestation1`, `attestation2`, ... (pieces of
  at most `PIECE` characters, joined in order: a `format=full` token is about 1.2 KB, over
  Pub/Sub's 1024-byte limit on one attribute value); no such attribute: unattested;
- its audience binds it to one event (`binding_of`): `AUDIENCE_PREFIX` + the hex SHA-256 of the
  canonical JSON (keys sorted, no spaces, non-ASCII escaped) of the structured event without its
  `attestation*` members and `datacontenttype`, so a token replayed on another event, or an event
  whose payload or attributes were altered, fails the audience check;
- a bridge's event is signed by its VM: the token's `google.compute_engine` instance, project
  and zone equal the event's (extensions and data); a cloud's event (`data.origin` "cloud") is
  signed by the system-events function's service account (`Policy.cloud_identity`, the token's
  `email`), which no VM can get a token for;
- validity is judged when the message was published (Pub/Sub's publishTime), not when it is
  read, so a redelivery hours later still verifies.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import threading
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from bridge.events import Event

ISSUERS = ("https://accounts.google.com", "accounts.google.com")
GOOGLE_CERTS_URL = "https://www.googleapis.com/oauth2/v1/certs"
AUDIENCE_PREFIX = "maintenance-bridge:v1:"
# How far the event's time may lie outside the token's [iat, exp] (clock skew between hosts).
SKEW = 300
CERTS_TTL = 3600.0
_SHA256_INFO = bytes.fromhex("3031300d060960864801650304020105000420")
# The token is carried in pieces of at most this many characters (ASCII), at most MAX_PIECES.
PIECE = 1000
MAX_PIECES = 8
_PIECE_NAME = re.compile(r"attestation([1-9][0-9]*)")


class Forged(Exception):
    """The token does not prove the event's origin; the message says which check failed."""


def canonical(obj: Any) -> bytes:
    """The one serialisation the binding digests; Node and Go consumers rebuild it from the
    parsed JSON (keys sorted by code point, `,` and `:` without spaces, every character outside
    printable ASCII escaped as lowercase `\\uXXXX`, control characters as JSON's short forms)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def binding(obj: Any) -> str:
    """The audience that ties a token to what `obj` says: a digest of it."""
    return AUDIENCE_PREFIX + hashlib.sha256(canonical(obj)).hexdigest()


def signed_part(event: Event) -> dict[str, Any]:
    """What a token vouches for: the structured event without the token itself and without
    `datacontenttype` (a binding detail: binary mode carries it as `content-type`)."""
    return _unsigned_removed(event.to_structured())


def signed_part_of_message(attributes: Mapping[str, str], data: bytes | str) -> dict[str, Any]:
    """`signed_part` of an event as it was published (a Pub/Sub message's attributes and
    payload, either content mode), not as this decoder rebuilt it: a field added by a newer
    bridge, which this decoder drops, is still digested, so the audience still matches. Call
    it on a message that decoded (ValueError on a payload that is not JSON)."""
    payload = json.loads(data)
    content_type = attributes.get("content-type", attributes.get("Content-Type", ""))
    if content_type.lower().startswith("application/cloudevents"):
        return _unsigned_removed(payload)
    said = {name[3:]: value for name, value in attributes.items() if name.startswith("ce-")}
    return _unsigned_removed({**said, "data": payload})


def _unsigned_removed(structured: Mapping[str, Any]) -> dict[str, Any]:
    return {
        name: value
        for name, value in structured.items()
        if name != "datacontenttype" and not _PIECE_NAME.fullmatch(name)
    }


def binding_of(event: Event) -> str:
    """The audience a token for this event must carry."""
    return binding(signed_part(event))


def with_token(event: Event, token: str) -> Event:
    """The event carrying `token` in its `attestation1..N` extensions (ValueError if it would
    need more than MAX_PIECES)."""
    pieces = [token[i : i + PIECE] for i in range(0, len(token), PIECE)]
    if not pieces or len(pieces) > MAX_PIECES:
        raise ValueError(f"a token of {len(token)} characters does not fit {MAX_PIECES} pieces")
    extensions = {k: v for k, v in event.extensions.items() if not _PIECE_NAME.fullmatch(k)}
    extensions.update({f"attestation{n}": piece for n, piece in enumerate(pieces, 1)})
    return replace(event, extensions=extensions)


def token_of(event: Event) -> str | None:
    """The token an event carries, its pieces joined in order; None when unattested. Pieces
    that do not run 1..N without a gap make a malformed token (Forged when verified)."""
    pieces = {}
    for name, value in event.extensions.items():
        match = _PIECE_NAME.fullmatch(name)
        if match:
            pieces[int(match.group(1))] = value
    if not pieces:
        return None
    if sorted(pieces) != list(range(1, len(pieces) + 1)):
        return "."  # a gap: no token can be rebuilt, and verify says it is malformed
    return "".join(pieces[n] for n in sorted(pieces))


def verify(
    token: str,
    *,
    audience: str,
    at: float,
    certs: Mapping[str, str],
) -> dict[str, Any]:
    """The token's claims if it is Google-signed, bound to `audience` and valid at `at` (epoch
    seconds: when the message was published); else raises Forged. Whose token it is, is
    `check`'s business."""
    try:
        head_b64, body_b64, sig_b64 = token.split(".")
        header = json.loads(_unb64(head_b64))
        claims = json.loads(_unb64(body_b64))
        signature = _unb64(sig_b64)
    except (ValueError, binascii.Error) as exc:
        raise Forged(f"malformed token: {exc}") from exc
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise Forged("malformed token: header or claims not an object")
    if header.get("alg") != "RS256":
        raise Forged(f"algorithm {header.get('alg')!r} is not RS256")
    pem = certs.get(str(header.get("kid")))
    if pem is None:
        raise Forged(f"unknown key id {header.get('kid')!r}")
    n, e = _rsa_key(pem)
    if not _rs256_ok(f"{head_b64}.{body_b64}".encode(), signature, n, e):
        raise Forged("signature does not verify")
    if claims.get("iss") not in ISSUERS:
        raise Forged(f"issuer {claims.get('iss')!r}")
    if claims.get("aud") != audience:
        raise Forged("audience does not bind this event")
    iat, exp = claims.get("iat"), claims.get("exp")
    if not isinstance(iat, int) or not isinstance(exp, int):
        raise Forged("token has no iat/exp")
    if not iat - SKEW <= at <= exp + SKEW:
        raise Forged("token was not valid when the event was published")
    return claims


def vouches_for(claims: Mapping[str, Any], event: Event, *, cloud_identity: str = "") -> None:
    """Raises Forged unless the token's owner may speak for `event`: for a bridge's event, the
    VM itself (instance id, project and zone of the token equal the event's, in its extensions
    and its data); for a cloud's event, the system-events function's service account."""
    if event.data.origin == "cloud":
        if not cloud_identity:
            raise Forged("a cloud event, and no cloud identity is configured to check it by")
        if claims.get("email") != cloud_identity or claims.get("email_verified") is not True:
            raise Forged(f"cloud event signed by {claims.get('email')!r}, not {cloud_identity!r}")
        return
    google = claims.get("google")
    compute = google.get("compute_engine") if isinstance(google, dict) else None
    if not isinstance(compute, dict):
        raise Forged("token has no compute_engine claims (not a VM's format=full token)")
    said = event.data.instance
    for claim, values in (
        ("instance_id", (event.extensions.get("instanceid"), said.id)),
        ("project_id", (event.extensions.get("project"), said.project_id)),
        ("zone", (event.extensions.get("zone"), said.zone)),
    ):
        signed = str(compute.get(claim, ""))
        for value in values:
            if value != signed:
                raise Forged(f"token of {claim} {signed!r}, event of {value!r}")


@dataclass(frozen=True)
class Verdict:
    """What a consumer learns of an event's origin: `verified`, or why not (`reason`;
    `attested` False when the event carried no token at all)."""

    verified: bool
    attested: bool
    reason: str = ""


@dataclass(frozen=True)
class Policy:
    """How a consumer treats origin (the functions build it from their environment):
    `require_attestation` refuses to act on an event that is not verified (drain) or marks it
    (ledger, board); `certs_url` is where the signing certificates are fetched from;
    `cloud_identity` is the service account email of the system-events function."""

    require_attestation: bool = True
    certs_url: str = GOOGLE_CERTS_URL
    cloud_identity: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Policy:
        """From REQUIRE_ATTESTATION (true/false, default true: unset or empty, as a deploy tool
        leaves a variable it was given no value for), ATTESTATION_CERTS_URL and
        CLOUD_EVENTS_IDENTITY; anything else for REQUIRE_ATTESTATION is a ValueError."""
        raw = env.get("REQUIRE_ATTESTATION", "").strip().lower() or "true"
        if raw not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            raise ValueError(f"REQUIRE_ATTESTATION must be true or false, not {raw!r}")
        return cls(
            require_attestation=raw in ("true", "1", "yes", "on"),
            certs_url=env.get("ATTESTATION_CERTS_URL", "") or GOOGLE_CERTS_URL,
            cloud_identity=env.get("CLOUD_EVENTS_IDENTITY", ""),
        )


def check(
    event: Event,
    *,
    at: float,
    certs: Mapping[str, str],
    cloud_identity: str = "",
    signed: Mapping[str, Any] | None = None,
) -> Verdict:
    """The origin verdict for a decoded event published at `at` (epoch seconds); `signed` is
    the event as it was published (`signed_part_of_message`), when the caller has it, else the
    decoded event is digested. Never raises for a bad token (that is the verdict); fetching
    `certs` is the caller's, so that a network fault there stays a retryable error and not a
    forgery."""
    token = token_of(event)
    if token is None:
        return Verdict(False, False, "unattested")
    audience = binding(_unsigned_removed(signed)) if signed is not None else binding_of(event)
    try:
        claims = verify(token, audience=audience, at=at, certs=certs)
        vouches_for(claims, event, cloud_identity=cloud_identity)
    except Forged as exc:
        return Verdict(False, True, str(exc))
    return Verdict(True, True)


class Certs:
    """Google's signing certificates from `url`, fetched on first use and kept `ttl` seconds
    (they rotate over days; a per-message fetch would add a round trip to every event). A
    token under a key id the cached set lacks (a key that came in since) fetches them again,
    at most once per `REFETCH` seconds, so that a rotation is not read as a forgery and a flood
    of made-up key ids cannot turn into a flood of fetches."""

    REFETCH = 60.0

    def __init__(self, url: str = GOOGLE_CERTS_URL, ttl: float = CERTS_TTL) -> None:
        self.url = url
        self.ttl = ttl
        self._lock = threading.Lock()
        self._certs: dict[str, str] = {}
        self._fetched = float("-inf")

    def get(self, kid: str | None = None) -> dict[str, str]:
        """The certificates; with `kid`, fetched again first if that key id is unknown. A
        network fault or an answer that is not a `{kid: PEM}` object raises OSError (the
        caller's retryable error), never a verdict."""
        with self._lock:
            age = time.monotonic() - self._fetched
            unknown = kid is not None and kid not in self._certs and age > self.REFETCH
            if age > self.ttl or unknown:
                with urllib.request.urlopen(self.url, timeout=10) as reply:
                    answer = json.load(reply)
                if not isinstance(answer, dict):
                    raise OSError(f"{self.url}: not a JSON object of certificates")
                self._certs = {str(k): str(v) for k, v in answer.items()}
                self._fetched = time.monotonic()
            return self._certs


def key_id(token: str) -> str | None:
    """The `kid` of a token's header, read without verifying (to know which certificate
    `Certs.get` must have); None when there is none to read."""
    kid = _unverified(token, 0).get("kid")
    return str(kid) if kid is not None else None


def unverified_claims(token: str) -> dict[str, Any]:
    """A token's claims read without verifying, {} when there are none to read: for the
    bridge, which reads the expiry of a token its own metadata server just gave it."""
    return _unverified(token, 1)


def _unverified(token: str, part: int) -> dict[str, Any]:
    """Header (0) or claims (1) of a JWT, unverified; {} for anything not a JSON object."""
    try:
        obj = json.loads(_unb64(token.split(".")[part]))
    except (IndexError, ValueError, binascii.Error):
        return {}
    return obj if isinstance(obj, dict) else {}


def _unb64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _rs256_ok(message: bytes, signature: bytes, n: int, e: int) -> bool:
    """RSASSA-PKCS1-v1_5 with SHA-256 (RFC 8017 8.2.2), by re-encoding and comparing."""
    k = (n.bit_length() + 7) // 8
    if len(signature) != k:
        return False
    em = pow(int.from_bytes(signature, "big"), e, n).to_bytes(k, "big")
    t = _SHA256_INFO + hashlib.sha256(message).digest()
    expected = b"\x00\x01" + b"\xff" * (k - len(t) - 3) + b"\x00" + t
    return em == expected


def _rsa_key(pem: str) -> tuple[int, int]:
    """The RSA modulus and exponent of a PEM X.509 certificate (a minimal DER walk)."""
    body = "".join(line for line in pem.strip().splitlines() if not line.startswith("-----"))
    der = base64.b64decode(body)
    cert, _ = _tlv(der, 0)
    tbs, _ = _tlv(cert, 0)
    pos = 0
    fields = []
    while pos < len(tbs):
        tag = tbs[pos]
        value, pos = _tlv(tbs, pos)
        fields.append((tag, value))
    if fields and fields[0][0] == 0xA0:  # explicit version
        fields = fields[1:]
    spki = fields[5][1]  # serial, signature alg, issuer, validity, subject, SPKI
    _, after_alg = _tlv(spki, 0)
    bits, _ = _tlv(spki, after_alg)
    rsa_key, _ = _tlv(bits[1:], 0)
    n_bytes, pos = _tlv(rsa_key, 0)
    e_bytes, _ = _tlv(rsa_key, pos)
    return int.from_bytes(n_bytes, "big"), int.from_bytes(e_bytes, "big")


def _tlv(data: bytes, pos: int) -> tuple[bytes, int]:
    """The value of the DER element at `pos`, and the position after it."""
    length = data[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    return data[pos : pos + length], pos + length
