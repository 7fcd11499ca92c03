"""The HTTP sink: each event POSTed to a CloudEvents receiver (Cloud Run, a gen2 function, a
Knative broker, a webhook) per the CloudEvents HTTP protocol binding, durably.

Binary content mode by default (`ce-*` headers, `Content-Type: application/json`, the data as
the body), `--content-mode structured` for `application/cloudevents+json`. The outbox semantics
are Pub/Sub's: recorded before sending, sent one at a time in order over one keep-alive
connection (urllib3 sets TCP_NODELAY, so a request written in two parts does not wait 40 ms
for a delayed ACK), retired only on a 2xx. Connection errors, time-outs, 408, 429 (its
`Retry-After` is honoured) and 5xx are retried by the relay under the same id; any other 4xx is
`Refused`: the relay parks the event (see `bridge.store.Store.park`) and the queue goes on.
Redirects are never followed. `--http-audience` adds the VM service account's ID token from the
metadata server (google-auth's `IDTokenCredentials`, refreshed before it expires); header
values and the token are never logged.
"""

from __future__ import annotations

import ipaddress
import re
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit, urlunsplit

from bridge.events import Event
from bridge.options import ConfigError, Option, boolean, positive
from bridge.sinks import Permanent, SinkType, register

if TYPE_CHECKING:
    import requests

    from bridge.config import Config

RESPONSE_KEPT = 1024  # characters of a refusal's body kept with the parked event
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an HTTP header name (RFC 9110 token)
_RESERVED = ("content-type", "content-length", "host", "connection", "transfer-encoding")
# The HTTP binding: a header value is percent-encoded outside printable ASCII, and for " % space.
_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"%')


@dataclass(frozen=True)
class Header:
    """A static header; its value stays out of every repr (and so out of logs)."""

    name: str
    value: str = field(repr=False)


def headers_from(specs: list[str], environ: Mapping[str, str]) -> tuple[Header, ...]:
    """`NAME=VALUE` (VALUE `env:VAR` reads VAR) into headers; ConfigError naming the NAME, never
    the value."""
    headers = []
    for spec in specs:
        name, sep, value = spec.partition("=")
        name = name.strip()
        if not sep or not _TOKEN.match(name):
            raise ConfigError("--http-header: give NAME=VALUE (NAME a header name), one per flag")
        if name.lower() in _RESERVED or name.lower().startswith("ce-"):
            raise ConfigError(f"--http-header: {name} is set by the bridge itself")
        if value.startswith("env:"):
            var = value.removeprefix("env:")
            if var not in environ:
                raise ConfigError(f"--http-header {name}: the variable {var} is not set")
            value = environ[var]
        if any(c in value for c in "\r\n\0"):
            raise ConfigError(f"--http-header {name}: the value holds a line break")
        headers.append(Header(name, value))
    return tuple(headers)


OPTIONS = (
    Option("http_url", "CloudEvents receiver URL (selects the http sink)", default=""),
    Option(
        "http_audience",
        "send the VM service account's ID token for this audience (Authorization: Bearer)",
        default="",
    ),
    Option(
        "http_header",
        "NAME=VALUE header on every POST (VALUE env:VAR reads the variable VAR); repeatable",
        repeat=True,
        default=(),
        resolve=headers_from,
    ),
    Option(
        "http_allow_insecure",
        "allow http:// to an address that is not loopback or private",
        parse=boolean,
        default=False,
    ),
    Option("http_connect_timeout", "connect time-out, seconds", parse=positive(float), default=3.0),
    Option("http_read_timeout", "response time-out, seconds", parse=positive(float), default=10.0),
)


class Refused(Permanent):
    """A 4xx other than 408 and 429: sending the same request again cannot succeed."""


class Retryable(Exception):
    """A failure worth retrying under the same id: `failure_class` says which kind."""

    def __init__(self, failure_class: str, message: str) -> None:
        super().__init__(message)
        self.failure_class = failure_class


class HttpSink:
    """One worker thread sends the events in the order given, so the receiver sees them in
    order; after a failure the sends already queued behind it fail unsent ("paused") until the
    relay calls `recover` and sends again from the failed event: nothing overtakes it."""

    name = "http"

    def __init__(self, config: Config) -> None:
        self.url = config.http_url
        self.where = _without_query(config.http_url)  # what messages name: no token in a query
        self.mode = config.content_mode
        self.timeout = (config.http_connect_timeout, config.http_read_timeout)
        self.headers = {header.name: header.value for header in config.http_header}
        self.audience = config.http_audience
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="http-sink")
        self._lock = threading.Lock()
        self._generation = 0  # bumped by `recover`: sends from before it are stale
        self._failed: int | None = None  # the generation a send failed in
        self._not_before = 0.0  # monotonic time a Retry-After asked to wait until
        self._session: requests.Session | None = None
        self._credentials: Any = None
        self._token_request: Any = None

    def send(self, event: Event) -> Future[str]:
        with self._lock:
            generation = self._generation
        return self._worker.submit(self._post, event, generation)

    def recover(self, event: Event) -> None:
        with self._lock:
            self._generation += 1
            self._failed = None

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)
        if self._session is not None:
            self._session.close()

    def _post(self, event: Event, generation: int) -> str:
        with self._lock:
            if generation != self._generation or self._failed == generation:
                raise Retryable("paused", "not sent: an earlier event failed first")
            wait = self._not_before - time.monotonic()
        try:
            if wait > 0:
                raise Retryable("throttled", f"the receiver asked to wait {wait:.1f} s more")
            return self._exchange(event)
        except Exception:
            with self._lock:
                self._failed = generation
            raise

    def _exchange(self, event: Event) -> str:
        import requests

        if self._session is None:
            self._session = requests.Session()
            self._session.trust_env = False  # no proxy from the environment: the URL is it
        wire, body = on_the_wire(event, self.mode)
        headers = {**self.headers, **wire}
        if self.audience:
            headers["Authorization"] = self._bearer()
        try:
            response = self._session.post(
                self.url, data=body, headers=headers, timeout=self.timeout, allow_redirects=False
            )
        except requests.Timeout as exc:
            raise Retryable(
                "timeout", f"no answer from {self.where}: {type(exc).__name__}"
            ) from None
        except requests.ConnectionError as exc:
            raise Retryable("connection", f"{self.where}: {_reason(exc)}") from None
        status = response.status_code
        if 200 <= status < 300:
            return event.id
        # Masked before it is cut: a secret cut in two would no longer be recognised.
        text = _scrub(response.content.decode("utf-8", "replace"), headers)[:RESPONSE_KEPT]
        if 300 <= status < 400:
            where = _without_query(response.headers.get("Location", "(no Location)"))
            raise Retryable(
                "redirect", f"HTTP {status} redirect to {where} not followed: set --http-url to it"
            )
        if status == 429:
            self._not_before = time.monotonic() + _retry_after(response.headers.get("Retry-After"))
            raise Retryable("throttled", f"HTTP 429 from {self.where}: {text}")
        if status == 408 or status >= 500:
            raise Retryable("server", f"HTTP {status} from {self.where}: {text}")
        raise Refused(status, f"HTTP {status} from {self.where}: {text}")

    def _bearer(self) -> str:
        """The ID token, fetched once and again only shortly before it expires (google-auth's
        `valid` leaves a margin of minutes)."""
        from google.auth import exceptions
        from google.auth.compute_engine import IDTokenCredentials
        from google.auth.transport.requests import Request

        if self._credentials is None:
            self._token_request = Request(self._session)
            self._credentials = IDTokenCredentials(
                None, self.audience, use_metadata_identity_endpoint=True
            )
        if not self._credentials.valid:
            try:
                self._credentials.refresh(self._token_request)
            except exceptions.GoogleAuthError as exc:
                raise Retryable("token", f"no ID token from the metadata server: {exc}") from None
        return f"Bearer {self._credentials.token}"


def _scrub(text: str, sent: Mapping[str, str]) -> str:
    """A receiver may echo what it got: the secrets sent are masked before the text is logged
    or parked (the static headers' values and the token: the `ce-*` headers are no secret)."""
    for name, value in sent.items():
        if value and not name.lower().startswith("ce-") and name != "Content-Type":
            text = text.replace(value.removeprefix("Bearer "), "***")
    return text


def on_the_wire(event: Event, mode: str) -> tuple[dict[str, str], bytes]:
    """The headers the HTTP binding prescribes (`ce-*` in binary mode, Content-Type) and the
    body: the Pub/Sub binding names the attributes alike, only the values are percent-encoded."""
    attributes, body = event.to_pubsub(mode)
    headers = {"Content-Type": attributes.pop("content-type")}
    headers.update((name, quote(value, safe=_SAFE)) for name, value in attributes.items())
    return headers, body


def _retry_after(value: str | None) -> float:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); 0 when absent/bad."""
    if not value:
        return 0.0
    if value.strip().isdigit():
        return float(value.strip())
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return 0.0


def _reason(exc: BaseException) -> str:
    """The innermost cause: requests nests urllib3's errors three deep."""
    while exc.__context__ is not None and exc.__context__ is not exc:
        exc = exc.__context__
    return str(exc) or type(exc).__name__


def check(config: Config) -> None:
    if config.sink != HttpSink.name:
        return
    if not config.http_url:
        raise ConfigError("--sink http needs --http-url URL (BRIDGE_HTTP_URL)")
    parts = urlsplit(config.http_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("--http-url: not an http:// or https:// URL")
    if parts.username is not None or parts.password is not None:
        raise ConfigError("--http-url: no user or password in the URL (use --http-header)")
    if parts.scheme == "http" and not (config.http_allow_insecure or _private(parts.hostname)):
        raise ConfigError(
            f"--http-url: http:// to {parts.hostname}, neither loopback nor private: use https://"
            " or pass --http-allow-insecure true"
        )
    if config.http_audience and any(h.name.lower() == "authorization" for h in config.http_header):
        raise ConfigError("--http-header Authorization: --http-audience sets it already")


def _without_query(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def _private(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a name may resolve anywhere: only addresses are judged
    return address.is_loopback or address.is_private


FAILURE_CLASSES = (
    "refused",
    "connection",
    "timeout",
    "throttled",
    "server",
    "redirect",
    "token",
    "paused",
)


def classify(exc: BaseException) -> str:
    if isinstance(exc, Refused):
        return "refused"
    if isinstance(exc, Retryable):
        return exc.failure_class
    return "other"


def hint(failure_class: str, config: Config) -> str:
    return {
        "refused": " (parked, the queue goes on; once fixed: maintenance-bridge redrive)",
        "connection": f" (is the receiver {_without_query(config.http_url)} up? events wait)",
        "token": " (does the VM have a service account? events wait)",
        "redirect": " (events wait)",
    }.get(failure_class, "")


def _target(config: Config) -> str:
    return _without_query(config.http_url)


register(
    SinkType(
        name=HttpSink.name,
        factory=HttpSink,
        options=OPTIONS,
        selected_by="http_url",
        check=check,
        failure_classes=FAILURE_CLASSES,
        classify=classify,
        hint=hint,
        # Sends queued behind a failure fail with it: not news.
        follow_ups=frozenset({"paused"}),
        target=_target,
    )
)
