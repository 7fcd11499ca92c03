"""Verified origin: check that the VM which signed an event's identity token is the VM the
event speaks for.

Standard library only, because it is vendored into every function's zip (and into any
consumer) next to bridge/events.py: RS256 is checked with `pow` against the RSA key of Google's
PEM certificates (`oauth2/v1/certs`, `{kid: PEM}`), which are fetched once and cached.

A token binds to its event through its audience (`binding`): a digest of the fields that must
not change, so a token replayed on another event, or an event whose payload was altered, fails
the audience check. Expiry is judged at the event's own time (the token must have been valid
when the event was issued), so an event redelivered hours later still verifies.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import threading
import time
import urllib.request
from collections.abc import Mapping
from typing import Any

ISSUERS = ("https://accounts.google.com", "accounts.google.com")
GOOGLE_CERTS_URL = "https://www.googleapis.com/oauth2/v1/certs"
AUDIENCE_PREFIX = "maintenance-bridge:v1:"
# How far the event's time may lie outside the token's [iat, exp] (clock skew between hosts).
SKEW = 300
CERTS_TTL = 3600.0
_SHA256_INFO = bytes.fromhex("3031300d060960864801650304020105000420")


class Forged(Exception):
    """The token does not prove the event's origin; the message says which check failed."""


def binding(fields: Mapping[str, str]) -> str:
    """The audience that ties a token to one event: a digest of what must not change."""
    canonical = json.dumps(dict(fields), sort_keys=True, separators=(",", ":"))
    return AUDIENCE_PREFIX + hashlib.sha256(canonical.encode()).hexdigest()


def verify(
    token: str,
    *,
    audience: str,
    instance_id: str,
    project_id: str,
    at: float,
    certs: Mapping[str, str],
) -> dict[str, Any]:
    """The token's claims if it is Google-signed, bound to `audience`, issued to the VM
    `instance_id` of `project_id` and valid at `at` (the event's time, epoch seconds);
    else raises Forged."""
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
        raise Forged("token was not valid when the event was issued")
    compute = (claims.get("google") or {}).get("compute_engine") or {}
    if str(compute.get("instance_id", "")) != instance_id:
        raise Forged(f"token of instance {compute.get('instance_id')!r}, event of {instance_id!r}")
    if compute.get("project_id") != project_id:
        raise Forged(f"token of project {compute.get('project_id')!r}, event of {project_id!r}")
    return claims


class Certs:
    """Google's signing certificates from `url`, fetched on first use and kept `ttl` seconds
    (they rotate over days; a per-message fetch would add a round trip to every event)."""

    def __init__(self, url: str = GOOGLE_CERTS_URL, ttl: float = CERTS_TTL) -> None:
        self.url = url
        self.ttl = ttl
        self._lock = threading.Lock()
        self._certs: dict[str, str] = {}
        self._fetched = float("-inf")

    def get(self) -> dict[str, str]:
        with self._lock:
            if time.monotonic() - self._fetched > self.ttl:
                with urllib.request.urlopen(self.url, timeout=10) as reply:
                    self._certs = {str(k): str(v) for k, v in json.load(reply).items()}
                self._fetched = time.monotonic()
            return self._certs


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
