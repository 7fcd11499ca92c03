"""The metadata server client: one HTTP edge, strict about what it accepts.

It always sends `Metadata-Flavor: Google`, follows no redirect, refuses a response without the
header, caps what it reads and sorts every failure into a small fixed set of classes (used for
logs and metric labels) so that callers retry what is transient and never crash on it.

Plain values (`maintenance-event`, `preempted`, the identity) are asked as Google's own sample
asks them, with no `alt`, and read as text: how the real server renders a plain value under
`alt=json` is not documented. A plain answer that comes as a JSON string (`"NONE"`) is
unwrapped, so both renderings read the same. Only JSON values (`upcoming-maintenance`, the
`scheduling/` directory) are asked with `alt=json`.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from bridge import __version__
from bridge.events import Instance, Scheduling
from bridge.http1 import Connection, ProtocolError, ReadTimeout, Response

MAX_BODY = 64 * 1024
NO_NOTIFICATIONS = "no notifications have been received yet"
# How much longer the client waits than the server promised: the server may not honour timeout_sec.
CLIENT_SLACK = 10
_JSON_OPENERS = ('"', "{", "[")
_BARE_WORD = re.compile(r"[A-Z][A-Z0-9_]*")  # NONE, TRUE: how a plain value may read as JSON
# Failure classes: the only label values metrics and logs ever use.
FAILURE_CLASSES = ("http_5xx", "http_429", "http_4xx", "timeout", "connection", "protocol")


class MetadataError(Exception):
    """A failed request; `failure_class` is one of FAILURE_CLASSES."""

    def __init__(self, failure_class: str, message: str) -> None:
        super().__init__(message)
        self.failure_class = failure_class


@dataclass(frozen=True)
class Reading:
    """One answer: the decoded value and its ETag, or `absent` (404, or the 503 that means
    'nothing scheduled yet' on upcoming-maintenance). `received` is a monotonic timestamp."""

    value: Any
    etag: str | None
    received: float
    absent: bool = False


class MetadataClient:
    """Requests against one metadata server; one instance per thread (one kept-alive connection,
    bridge/http1.py: neither requests nor urllib3, whose per-request work cost more CPU than the
    rest of handling an event). No proxy, no redirect followed, TCP_NODELAY, TCP keepalive (a
    connection the server forgot during a blackout fails about a second after the network is
    back, not at the long-poll's deadline). Each request has one deadline for the whole exchange
    (connecting, sending, reading the answer), however slowly a server trickles it."""

    def __init__(self, base_url: str, *, connect_timeout: float = 2.0) -> None:
        parts = urlsplit(base_url)
        self.base_url = base_url
        self.prefix = parts.path or "/"
        self.connection = Connection(
            parts.hostname or "",
            parts.port or 80,
            connect_timeout=connect_timeout,
            max_body=MAX_BODY,
            probe=True,
        )
        self._headers = (
            f" HTTP/1.1\r\nHost: {parts.netloc}\r\nMetadata-Flavor: Google\r\n"
            f"User-Agent: maintenance-bridge/{__version__}\r\n\r\n"
        ).encode("ascii")

    def close(self) -> None:
        self.connection.close()

    def get(
        self,
        path: str,
        *,
        params: dict[str, str] | None = None,
        timeout: float = 5.0,
        alt: str | None = None,
    ) -> Reading:
        """One GET of `path` (relative to the base URL), answered within `timeout` seconds;
        raises MetadataError.

        `alt=None` asks for the plain value as the sample does; "json" or "text" force one."""
        query = {"alt": alt, **(params or {})} if alt else params
        return self._get(path, urlencode(query) if query else "", timeout, alt)

    def watch(
        self,
        path: str,
        last_etag: str,
        timeout_sec: int,
        alt: str | None = None,
        slack: float = CLIENT_SLACK,
    ) -> Reading:
        """A hanging GET that returns when the value's ETag differs from `last_etag`; the whole
        request ends `slack` seconds after `timeout_sec` (MetadataError "timeout"), whether the
        server trickles, never answers, or the connection died silently."""
        # The query is built by hand: urlencode cost a tenth of the request's CPU.
        query = (
            f"{f'alt={alt}&' if alt else ''}wait_for_change=true"
            f"&last_etag={quote(last_etag, safe='')}&timeout_sec={int(timeout_sec)}"
        )
        # The client deadline outlives the server's: the server may not honour timeout_sec.
        return self._get(path, query, timeout_sec + slack, alt)

    def _get(self, path: str, query: str, timeout: float, alt: str | None) -> Reading:
        target = self.prefix + path + ("?" + query if query else "")
        try:  # the watcher owns retries; a redirect is returned, not followed
            response = self.connection.request(b"GET " + target.encode() + self._headers, timeout)
        except ReadTimeout as exc:
            raise MetadataError("timeout", f"{path}: no answer within {timeout:g} s") from exc
        except ProtocolError as exc:
            raise MetadataError("protocol", f"{path}: {exc}") from exc
        except OSError as exc:  # refused, reset, unresolvable, connect time-out
            raise MetadataError("connection", f"{path}: {_reason(exc)}") from exc
        return _reading(path, response, time.monotonic(), alt)

    def identity(self) -> Instance:
        """What names the event source (its `source`, ordering key and filter attributes).

        Raises MetadataError: without these nothing can be published, so the caller retries."""

        def text(path: str) -> str:
            reading = self.get(path)
            if reading.absent:
                raise MetadataError("http_4xx", f"{path}: not found on this metadata server")
            return str(reading.value).strip()

        return Instance(
            id=text("instance/id"),
            name=text("instance/name"),
            zone=text("instance/zone").rsplit("/", 1)[-1],
            project_id=text("project/project-id"),
            project_number=text("project/numeric-project-id"),
        )

    def enrichment(self) -> tuple[str, Scheduling, list[str]]:
        """The hostname and `instance/scheduling/`: one attempt each, never raises.

        They only enrich events, so a server that answers them oddly (a text listing, a 404,
        broken JSON) must not hold up watching: what cannot be read is left empty and named in
        the returned problems."""
        problems: list[str] = []
        hostname = ""
        try:
            reading = self.get("instance/hostname")
            if reading.absent:
                problems.append("instance/hostname: not found")
            else:
                hostname = str(reading.value).strip()
        except MetadataError as exc:
            problems.append(str(exc))
        raw: dict[str, Any] = {}
        path = "instance/scheduling/"
        try:
            reading = self.get(path, params={"recursive": "true"}, alt="json")
            if reading.absent:
                problems.append(f"{path}: not found")
            elif isinstance(reading.value, dict):
                raw = {_squash(k): v for k, v in reading.value.items()}
            else:
                problems.append(f"{path}: not a JSON object: {str(reading.value)[:80]!r}")
        except MetadataError as exc:
            problems.append(str(exc))
        scheduling = Scheduling(
            on_host_maintenance=_flag(raw.get("onhostmaintenance")),
            automatic_restart=_flag(raw.get("automaticrestart")),
            preemptible=_flag(raw.get("preemptible")),
            provisioning_model=_flag(raw.get("provisioningmodel")),
        )
        return hostname, scheduling, problems


def _reading(path: str, response: Response, received: float, alt: str | None) -> Reading:
    status = response.status
    if response.headers.get("metadata-flavor") != "Google":
        raise MetadataError(
            "protocol", f"{path}: HTTP {status} without 'Metadata-Flavor: Google' refused"
        )
    if 300 <= status < 400:
        location = response.headers.get("location", "?")
        raise MetadataError("protocol", f"{path}: redirect to {location} refused")
    body = response.body
    if status == 404:
        return Reading(None, None, received, absent=True)
    if status == 503 and NO_NOTIFICATIONS.encode() in body:
        return Reading(None, None, received, absent=True)
    if status == 429:
        raise MetadataError("http_429", f"{path}: HTTP 429 rate limited")
    if status >= 500:
        raise MetadataError("http_5xx", f"{path}: HTTP {status}")
    if status != 200:
        raise MetadataError("http_4xx", f"{path}: HTTP {status}: {body[:200]!r}")
    if len(body) > MAX_BODY:
        raise MetadataError("protocol", f"{path}: {len(body)} bytes is over the {MAX_BODY} cap")
    try:
        text = body.decode("utf-8")
        if alt == "json" and _BARE_WORD.fullmatch(text.strip()):
            value = text.strip()  # a plain value under alt=json, rendered raw (`NONE`)
        elif alt == "json":
            value = json.loads(text)
        elif alt is None and text[:1] in _JSON_OPENERS:
            value = _plain(text, response.headers.get("content-type", ""))
        else:
            value = text
    except UnicodeDecodeError:
        raise MetadataError("protocol", f"{path}: body is not valid UTF-8") from None
    except ValueError:
        raise MetadataError("protocol", f"{path}: body is not valid JSON: {body[:80]!r}") from None
    return Reading(value, response.headers.get("etag"), received)


def _plain(text: str, content_type: str) -> Any:
    """A plain value that looks like JSON: `"NONE"` reads as NONE. Text that is not JSON stays
    text, unless the server said it was JSON: then it is a broken body (ValueError)."""
    try:
        return json.loads(text)
    except ValueError:
        if content_type.startswith("application/json"):
            raise
        return text


def _squash(name: str) -> str:
    """`onHostMaintenance`, `on-host-maintenance` and `on_host_maintenance` alike."""
    return name.replace("-", "").replace("_", "").lower()


def _flag(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    return str(value)


def _reason(exc: BaseException) -> str:
    """The innermost cause, short: 'Connection refused', 'Connection reset by peer', ..."""
    cause: BaseException = exc
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__  # type: ignore[assignment]
    text = str(cause) or type(cause).__name__
    return text.split("] ")[-1][:160]
