"""The bridge's side of verified origin: an identity token per event from the metadata server.

`instance/service-accounts/default/identity?audience=A&format=full` answers a Google-signed
JWT naming this VM (instance id, zone, project). The audience is `bridge.origin.binding` of
the event's unchangeable fields, so each event needs its own token (no cache can serve two
events). A failed fetch is retried once promptly, then the event goes out unattested: an event
is never held back for a token; the outage is counted and logged once, not once per event.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from bridge.metadata import MetadataClient, MetadataError
from bridge.origin import binding
from bridge.outage import Outage

IDENTITY_PATH = "instance/service-accounts/default/identity"
LOG = logging.getLogger(__name__)


class Attestor:
    """Fetches tokens on the sending thread's own metadata connection (off the recording path);
    `unattested` counts the events that went out without one."""

    def __init__(self, client: MetadataClient, *, timeout: float = 2.0, attempts: int = 2) -> None:
        self.client = client
        self.timeout = timeout
        self.attempts = attempts
        self.unattested = 0
        self._outage = Outage(LOG, "identity tokens available again; events are attested")

    def token(self, fields: Mapping[str, str]) -> str | None:
        """A token bound to the event with these fields, or None (counted; the first failure of
        an outage is logged per failure class, and its end)."""
        params = {"audience": binding(fields), "format": "full"}
        error: MetadataError | None = None
        for _ in range(self.attempts):
            try:
                reading = self.client.get(IDENTITY_PATH, params=params, timeout=self.timeout)
            except MetadataError as exc:
                error = exc
                continue
            if reading.absent or not isinstance(reading.value, str):
                error = MetadataError("http_4xx", f"{IDENTITY_PATH}: no token")
                continue
            self._outage.recovered()
            return reading.value
        self.unattested += 1
        assert error is not None
        self._outage.failed(
            error.failure_class, "no identity token (%s); events go out unattested", error
        )
        return None
