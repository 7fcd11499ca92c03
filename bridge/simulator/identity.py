"""The simulated VM's service-account identity: Google-shaped ID tokens signed by a test key.

`instance/service-accounts/<account>/identity?audience=AUD[&format=full]` answers a JWT
(RS256) with the claims Compute Engine puts in one, so that a client's token path (google-auth's
`IDTokenCredentials` with the metadata identity endpoint) and a receiver's verification
(signature, audience, expiry: `google.oauth2.id_token.verify_token`) are tested offline. The key
is made on first use, never written anywhere; its certificate is served, like Google's
`oauth2/v1/certs`, as `{kid: PEM}` on the control API (`GET identity/certs`). `lifetime`
(control API `POST identity`, seconds, default 3600 like the real tokens) makes short-lived or
already expired tokens.
"""

from __future__ import annotations

import datetime
import json
import threading
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs

from bridge.simulator.wire import JSON, TEXT, Reply

ISSUER = "https://accounts.google.com"
PREFIX = "instance/service-accounts/"
SUFFIX = "/identity"


class Identity:
    """The signing key (made lazily: RSA generation takes tens of ms) and the token lifetime."""

    def __init__(self, lifetime: int = 3600) -> None:
        self.lifetime = lifetime
        self._lock = threading.Lock()
        self._signer: Any = None
        self._certs: dict[str, str] = {}

    @staticmethod
    def handles(rel: str) -> bool:
        return rel.startswith(PREFIX) and rel.endswith(SUFFIX)

    def configure(self, lifetime: int) -> None:
        if not isinstance(lifetime, int):
            raise TypeError("lifetime is whole seconds")
        self.lifetime = lifetime

    def certs(self) -> dict[str, str]:
        """The verification certificates by key id, as Google's certs endpoint serves them."""
        self._key()
        return dict(self._certs)

    def certs_reply(self) -> Reply:
        return Reply(200, json.dumps(self.certs()).encode(), JSON)

    def reply(self, rel: str, query: str, values: Mapping[str, str]) -> Reply:
        """The identity endpoint's answer: a token, or the real server's 400 without audience."""
        q = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
        audience = q.get("audience", "")
        if not audience:
            return Reply(400, b"non-empty audience parameter required")
        account = rel.removeprefix(PREFIX).removesuffix(SUFFIX)
        number = values.get("project/numeric-project-id", "0")
        if account == "default":
            account = f"{number}-compute@developer.gserviceaccount.com"
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "aud": audience,
            "azp": "117605711420724299222",
            "sub": "117605711420724299222",
            "email": account,
            "email_verified": True,
            "iat": now,
            "exp": now + self.lifetime,
        }
        if q.get("format") == "full":
            zone = values.get("instance/zone", "")
            claims["google"] = {
                "compute_engine": {
                    "instance_creation_timestamp": now - 86400,
                    "instance_id": values.get("instance/id", ""),
                    "instance_name": values.get("instance/name", ""),
                    "project_id": values.get("project/project-id", ""),
                    "project_number": int(number) if number.isdigit() else number,
                    "zone": zone.rsplit("/", 1)[-1],
                }
            }
        from google.auth import jwt

        return Reply(200, jwt.encode(self._key(), claims), TEXT)

    def _key(self) -> Any:
        """The signer, made once; its self-signed certificate goes into `certs`."""
        with self._lock:
            if self._signer is None:
                self._signer = self._make_key()
            return self._signer

    def _make_key(self) -> Any:
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from google.auth import crypt

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        cert = self_signed(key, "simulated-metadata-identity", days=30)
        kid = cert.fingerprint(hashes.SHA256()).hex()[:40]
        self._certs[kid] = cert.public_bytes(serialization.Encoding.PEM).decode()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return crypt.RSASigner.from_string(pem, key_id=kid)


def self_signed(key: Any, name: str, *, days: int, host: str | None = None) -> Any:
    """A certificate for `key` signed by itself, valid from yesterday for `days`; with `host`, a
    CA certificate naming it (a TLS receiver's own trust anchor, in tests)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
    )
    if host is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False
        ).add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    return builder.sign(key, hashes.SHA256())
