"""The bridge's side of verified origin: each event goes out carrying an identity token of
this VM bound to it (the contract is bridge/origin.py's).

`instance/service-accounts/default/identity?audience=A&format=full` answers a Google-signed
JWT naming this VM (instance id, zone, project); the audience is `origin.binding_of(event)`, a
digest of the event, so each event needs its own token and only a resend of the same event can
reuse one. `AttestingSink` wraps the configured sink and adds the token on the relay's thread,
after the event was recorded: the store never holds a token, and a restart fetches a new one
(validity is judged at publish time, so an old event with a fresh token verifies).

A token is never worth holding an event back for long: a failed fetch is retried once at once,
then the event goes out unattested (counted, logged once per outage). While that outage lasts,
each event gets one quick attempt only, so a metadata server that does not answer costs each
event `QUICK` seconds at most, not the retried `TIMEOUT`s; one event per `PROBE` seconds gets
a full `TIMEOUT` instead, so that a server merely slower than `QUICK` ends the outage.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from bridge.events import Event
from bridge.metadata import MetadataClient, MetadataError
from bridge.origin import MAX_PIECES, PIECE, binding_of, unverified_claims, with_token
from bridge.outage import Outage
from bridge.sinks import Sink

IDENTITY_PATH = "instance/service-accounts/default/identity"
TIMEOUT = 0.75  # seconds, each of the two attempts while tokens come (both < relay.SEND_STUCK)
QUICK = 0.25  # seconds, the one attempt per event while tokens do not come
PROBE = 30.0  # seconds between full attempts while tokens do not come
CACHED = 4096  # tokens kept for resends (a resend comes after a sink failure: the last few)
REUSE_MARGIN = 300  # seconds a cached token must still be valid for to be sent again
LOG = logging.getLogger(__name__)


class Attestor:
    """Fetches tokens on the relay thread's own metadata connection (`client`, closed by
    `close`); `count` is called once per event that goes out unattested (the daemon's metric)."""

    def __init__(self, client: MetadataClient, count: Callable[[], object]) -> None:
        self.client = client
        self.count = count
        self._probe_at = 0.0  # monotonic: the outage's next full attempt
        self._outage = Outage(LOG, "identity tokens available again; events are attested")
        self._tokens: OrderedDict[str, tuple[str, int]] = OrderedDict()  # audience -> (jwt, exp)

    def token(self, audience: str) -> str | None:
        """A token for `audience` (the cached one while it has more than REUSE_MARGIN left),
        or None: counted, and the first failure of each class in an outage logged."""
        cached = self._tokens.get(audience)
        if cached is not None and cached[1] - time.time() > REUSE_MARGIN:
            return cached[0]
        outage = self._outage.failures > 0
        full = not outage or time.monotonic() >= self._probe_at
        tries = 1 if outage else 2
        while True:
            tries -= 1
            try:
                token, expires = self._fetch(audience, TIMEOUT if full else QUICK)
                break
            except MetadataError as exc:
                if tries:
                    continue
                if full:
                    self._probe_at = time.monotonic() + PROBE
                self.count()
                self._outage.failed(
                    exc.failure_class, "no identity token (%s); events go out unattested", exc
                )
                return None
        self._outage.recovered()
        self._tokens[audience] = (token, expires)
        if len(self._tokens) > CACHED:
            self._tokens.popitem(last=False)
        return token

    def _fetch(self, audience: str, timeout: float) -> tuple[str, int]:
        """One request; a token that could not travel (over MAX_PIECES pieces) or whose expiry
        cannot be read is a protocol failure, like any malformed answer."""
        params = {"audience": audience, "format": "full"}
        reading = self.client.get(IDENTITY_PATH, params=params, timeout=timeout)
        token = reading.value
        if reading.absent or not isinstance(token, str):
            raise MetadataError("http_4xx", f"{IDENTITY_PATH}: no token")
        token = token.strip()
        if len(token) > PIECE * MAX_PIECES:
            raise MetadataError("protocol", f"{IDENTITY_PATH}: a {len(token)}-character token")
        return token, _expiry(token)

    def close(self) -> None:
        self.client.close()


def _expiry(token: str) -> int:
    """The token's `exp` (epoch seconds), read without verifying: it is our own server's."""
    claims = unverified_claims(token)
    if "exp" not in claims:
        raise MetadataError("protocol", f"{IDENTITY_PATH}: not a JWT with an exp")
    expires = claims["exp"]
    if not isinstance(expires, int):
        raise MetadataError("protocol", f"{IDENTITY_PATH}: exp {expires!r} is not a number")
    return expires


class AttestingSink:
    """A `Sink` that sends each event with its token (`origin.with_token`), or as it is when
    none could be had. Named as the wrapped sink, so the registry's failure classes and hints
    still apply; `recover` and `close` are the wrapped sink's (`close` also closes the
    attestor's connection)."""

    def __init__(self, sink: Sink, attestor: Attestor) -> None:
        self.sink = sink
        self.attestor = attestor
        self.name = sink.name

    def send(self, event: Event) -> Any:
        token = self.attestor.token(binding_of(event))
        return self.sink.send(event if token is None else with_token(event, token))

    def recover(self, event: Event) -> None:
        self.sink.recover(event)

    def close(self) -> None:
        try:
            self.sink.close()
        finally:
            self.attestor.close()
