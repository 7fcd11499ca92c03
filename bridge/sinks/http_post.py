"""The HTTP sink: each event POSTed to a CloudEvents receiver (Cloud Run, a gen2 function, a
Knative broker, a webhook) per the CloudEvents HTTP protocol binding, durably.

Binary content mode by default (`ce-*` headers, `Content-Type: application/json`, the data as
the body), `--content-mode structured` for `application/cloudevents+json`. The outbox semantics
are Pub/Sub's: recorded before sending, sent one at a time in order, retired only on a 2xx.
Connection errors, time-outs, 408, 429 (its `Retry-After` is honoured) and 5xx are retried by
the relay under the same id. 401, 403 and 404 are what an IAM binding still propagating, a token
refused for clock skew or a service being deployed answer: they are retried too (class
`refused`, a 401 with a freshly fetched token) for `--http-refusal-grace`, counted from the
first refusal since the last 2xx, and only then `Refused`; any other 4xx is `Refused` at once:
the relay parks the event (see `bridge.store.Store.park`) and the queue goes on. Redirects are
never followed.
`--http-audience` adds the VM service account's ID token from the metadata server
(google-auth's `IDTokenCredentials`, refreshed before it expires); header values and the token
are never logged.

The transport is the standard library, not requests: one kept-alive socket (TCP_NODELAY, https
verified against the system trust store, no proxy, TCP keepalive), each request written in
one piece, the answer read by bridge/http1.py's `Reader` (strict framing, bytes left after an
answer close the connection, one deadline for the whole answer). requests' per-request work
and the hand-off to a
worker thread cost about a millisecond per event; now, when the connection is idle, the calling
thread writes the request itself (see `HttpSink`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import re
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from bridge import __version__
from bridge.events import Event
from bridge.http1 import ProtocolError, Reader, Response, keepalive
from bridge.options import ConfigError, Option, boolean, positive
from bridge.sinks import Permanent, SinkType, register

RESPONSE_KEPT = 1024  # characters of a refusal's body kept with the parked event
MAX_BODY = 64 * 1024  # bytes of an answer read; a longer one costs the connection, not memory
REFUSALS = (401, 403, 404)  # what a receiver says while its IAM or deployment settles
_AGENT = f"User-Agent: maintenance-bridge/{__version__}\r\n"
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
    Option(
        "http_read_timeout",
        "the whole answer within, seconds, from when the request is written",
        parse=positive(float),
        default=10.0,
    ),
    Option(
        "http_refusal_grace",
        "retry 401/403/404 for this long (seconds since the first refusal) before parking",
        parse=lambda text: _grace(text),
        default=600.0,
    ),
)


def _grace(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"not a number of seconds, 0 or more: {text!r}")
    return value


@dataclass(frozen=True)
class HttpOptions:
    """What the HTTP sink is given (bridge/sinks/__init__.py fills it from the `Config`): its
    own options and the shared content mode."""

    http_url: str = ""
    http_audience: str = ""
    http_header: tuple[Header, ...] = ()
    http_allow_insecure: bool = False
    http_connect_timeout: float = 3.0
    http_read_timeout: float = 10.0
    http_refusal_grace: float = 600.0
    content_mode: str = "binary"


class Refused(Permanent):
    """A 4xx other than 408 and 429 (401/403/404 once the refusal grace is over): sending the
    same request again cannot succeed."""


class Retryable(Exception):
    """A failure worth retrying under the same id: `failure_class` says which kind."""

    def __init__(self, failure_class: str, message: str) -> None:
        super().__init__(message)
        self.failure_class = failure_class


@dataclass(eq=False)
class _Job:
    """One event on its way: the request built by `send`, resolved by the worker."""

    event: Event
    generation: int
    future: Future[str]
    headers: dict[str, str] = field(repr=False)
    body: bytes = field(repr=False)
    written: float = 0.0  # when the calling thread wrote it (monotonic): the worker only reads


class HttpSink:
    """One request at a time, in the order given, so the receiver sees the events in order;
    after a failure the sends queued behind it fail unsent ("paused") until the relay calls
    `recover` and sends again from the failed event: nothing overtakes it.

    When nothing is in flight and the connection is open and idle, `send` writes the request
    itself, without blocking (a non-blocking send; what does not go out at once is left to the
    worker on a new connection), so the thread hand-off overlaps the receiver's work instead
    of preceding it. Connecting, fetching a token and reading answers happen only on the
    worker: the caller (the recorder, holding its lock) never waits on the receiver."""

    name = "http"

    def __init__(self, config: HttpOptions) -> None:
        self.where = _without_query(config.http_url)  # what messages name: no token in a query
        self.mode = config.content_mode
        self.connect_timeout = config.http_connect_timeout
        self.read_timeout = config.http_read_timeout
        self.refusal_grace = config.http_refusal_grace
        self.headers = {header.name: header.value for header in config.http_header}
        self.audience = config.http_audience
        parts = urlsplit(config.http_url)
        self._tls = parts.scheme == "https"
        self._address = (parts.hostname or "", parts.port or (443 if self._tls else 80))
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        target = quote(target, safe="!#$%&'()*+,/:;=?@[]~")  # as requests re-quoted it
        agent = "" if any(h.lower() == "user-agent" for h in self.headers) else _AGENT
        self._head = f"POST {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n{agent}"
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._jobs: deque[_Job] = deque()
        self._busy = False  # the worker holds a job
        self._closed = False
        self._thread: threading.Thread | None = None
        self._generation = 0  # bumped by `recover`: sends from before it are stale
        self._failed: int | None = None  # the generation a send failed in
        self._not_before = 0.0  # monotonic time a Retry-After asked to wait until
        self._reader: Reader | None = None  # the kept-alive socket; one thread at a time
        self._refused_since: float | None = None  # the first 401/403/404 since the last 2xx
        self._tls_context: ssl.SSLContext | None = None
        self._credentials: Any = None
        self._token_request: Any = None

    def send(self, event: Event) -> Future[str]:
        future: Future[str] = Future()
        wire, body = on_the_wire(event, self.mode)
        job = _Job(event, 0, future, {**self.headers, **wire}, body)
        with self._lock:
            if self._closed:
                raise RuntimeError("the http sink is closed")
            job.generation = self._generation
            if not self._jobs and not self._busy and self._reader is not None:
                job.written = self._write_now(job)
            self._jobs.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="http-sink", daemon=True)
                self._thread.start()
            self._wake.notify()
        return future

    def recover(self, event: Event) -> None:
        with self._lock:
            self._generation += 1
            self._failed = None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            queued, self._jobs = list(self._jobs), deque()
            self._wake.notify()
        for job in queued:
            job.future.cancel()
        self._drop()  # a worker blocked on a read gets an error at once

    def _write_now(self, job: _Job) -> float:
        """The fast path, under the lock: write on the idle connection without blocking; the
        time it was written, or 0 to leave the job to the worker (paused, throttled, no valid
        token, bytes waiting on the connection, or it did not fit)."""
        reader = self._reader
        if reader is None or self._failed == job.generation or self._not_before > time.monotonic():
            return 0.0
        if self.audience:
            if self._credentials is None or not self._credentials.valid:
                return 0.0  # fetching one is the worker's job
            job.headers["Authorization"] = f"Bearer {self._credentials.token}"
        try:
            data = self._encode(job)
        except ValueError:  # a header value that is not Latin-1: the worker fails the event
            return 0.0
        sock = reader.sock
        try:
            if not reader.idle():  # closed by the receiver, or it sent something unasked
                raise ConnectionResetError
            sock.settimeout(0.0)
            sent = sock.send(data)
            if sent == len(data):
                return time.monotonic()
        except (OSError, ValueError):  # would block (SSLWantWriteError too), reset, closed
            pass
        self._reader = None  # a request cut short: the worker sends it whole on a new connection
        _close(sock)
        return 0.0

    def _work(self) -> None:
        """The worker: one job at a time, in order; the job's outcome resolves its future."""
        while True:
            with self._lock:
                while not self._jobs and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                job = self._jobs.popleft()
                self._busy = True
            try:
                result: str | BaseException = self._exchange(job)
            except Exception as exc:
                result = exc
            with self._lock:  # before resolving: the next send may take the fast path
                if isinstance(result, BaseException):
                    self._failed = job.generation
                self._busy = False
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)

    def _exchange(self, job: _Job) -> str:
        """Send the job (unless the caller did) and read its answer: the whole answer within
        the read time-out of the request's writing, however slowly it trickles."""
        reader = self._reader
        if not job.written:
            with self._lock:
                if job.generation != self._generation or self._failed == job.generation:
                    raise Retryable("paused", "not sent: an earlier event failed first")
                wait = self._not_before - time.monotonic()
            if wait > 0:
                raise Retryable("throttled", f"the receiver asked to wait {wait:.1f} s more")
            if self.audience:
                job.headers["Authorization"] = self._bearer()
            data = self._encode(job)
            if reader is not None and not reader.idle():
                self._drop()  # closed by the receiver while idle, or bytes nobody asked for
            reader = self._reader or self._connect()
        elif reader is None:
            raise Retryable("connection", "the sink was closed")
        until = (job.written or time.monotonic()) + self.read_timeout
        try:
            if not job.written:
                reader.send(data, until)
            response, keep = reader.response(until, MAX_BODY, truncate=True)
        except TimeoutError as exc:
            self._drop()
            if exc.errno is None:  # the deadline, not the keepalive probes giving up
                raise Retryable(
                    "timeout", f"no answer from {self.where} within {self.read_timeout:g} s"
                ) from None
            raise Retryable("connection", f"{self.where}: {_reason(exc)}") from None
        except (OSError, ProtocolError) as exc:
            self._drop()
            raise Retryable("connection", f"{self.where}: {_reason(exc)}") from None
        if not keep:
            self._drop()  # the receiver closes it, or more came than the answer
        return self._judge(job, response)

    def _judge(self, job: _Job, response: Response) -> str:
        """The answer's meaning: the event id on a 2xx, else the failure to raise."""
        status = response.status
        if 200 <= status < 300:
            self._refused_since = None
            return job.event.id
        # Masked before it is cut: a secret cut in two would no longer be recognised.
        text = _scrub(response.body.decode("utf-8", "replace"), job.headers)[:RESPONSE_KEPT]
        if 300 <= status < 400:
            where = _without_query(response.headers.get("location", "(no Location)"))
            raise Retryable(
                "redirect", f"HTTP {status} redirect to {where} not followed: set --http-url to it"
            )
        if status == 429:
            wait = _retry_after(response.headers.get("retry-after"))
            with self._lock:
                self._not_before = time.monotonic() + wait
            raise Retryable("throttled", f"HTTP 429 from {self.where}: {text}")
        if status == 408 or status >= 500:
            raise Retryable("server", f"HTTP {status} from {self.where}: {text}")
        if status in REFUSALS:
            if status == 401:  # a token refused (clock skew, revoked): the next try fetches one
                with self._lock:
                    self._credentials = None
            now = time.monotonic()
            if self._refused_since is None:
                self._refused_since = now
            left = self.refusal_grace - (now - self._refused_since)
            if left > 0:
                raise Retryable(
                    "refused",
                    f"HTTP {status} from {self.where}: {text} (parks in {left:.0f} s)",
                )
        raise Refused(status, f"HTTP {status} from {self.where}: {text}")

    def _encode(self, job: _Job) -> bytes:
        """The request in one piece (one send: no second segment for the receiver to wait on)."""
        lines = [f"{name}: {value}\r\n" for name, value in job.headers.items()]
        head = f"{self._head}Content-Length: {len(job.body)}\r\n{''.join(lines)}\r\n"
        return head.encode("latin-1") + job.body

    def _connect(self) -> Reader:
        """A new connection (TCP_NODELAY, TCP keepalive: a receiver that forgot it during a
        blackout is noticed about a second after the network is back, not at the read time-out;
        https verified against the system trust store), within the connect time-out; on the
        worker only."""
        try:
            sock = socket.create_connection(self._address, timeout=self.connect_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            keepalive(sock)
            if self._tls:
                if self._tls_context is None:
                    self._tls_context = ssl.create_default_context()
                    self._tls_context.set_alpn_protocols(["http/1.1"])
                sock = self._tls_context.wrap_socket(sock, server_hostname=self._address[0])
        except TimeoutError:
            raise Retryable(
                "timeout", f"no connection to {self.where} within {self.connect_timeout:g} s"
            ) from None
        except OSError as exc:  # refused, unreachable, unresolvable, a certificate refused
            raise Retryable("connection", f"{self.where}: {_reason(exc)}") from None
        reader = Reader(sock)
        with self._lock:
            if self._closed:
                _close(sock)
                raise Retryable("connection", "the sink was closed")
            self._reader = reader
        return reader

    def _drop(self) -> None:
        with self._lock:
            reader, self._reader = self._reader, None
        _close(reader.sock if reader else None)

    def _bearer(self) -> str:
        """The ID token, fetched once and again only shortly before it expires (google-auth's
        `valid` leaves a margin of minutes); on the worker only. google-auth's requests
        transport, without proxies from the environment: not on the hot path."""
        import requests
        from google.auth import exceptions
        from google.auth.compute_engine import IDTokenCredentials
        from google.auth.transport.requests import Request

        if self._credentials is None:
            session = requests.Session()
            session.trust_env = False  # no proxy from the environment for the metadata server
            self._token_request = Request(session)
            self._credentials = IDTokenCredentials(
                None, self.audience, use_metadata_identity_endpoint=True
            )
        if not self._credentials.valid:
            try:
                self._credentials.refresh(self._token_request)
            except exceptions.GoogleAuthError as exc:
                raise Retryable("token", f"no ID token from the metadata server: {exc}") from None
        return f"Bearer {self._credentials.token}"


def _close(sock: socket.socket | None) -> None:
    """Shut down first: a worker blocked reading from it wakes at once."""
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


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
    """The innermost cause, short: '[Errno 111] Connection refused', ..."""
    while exc.__context__ is not None and exc.__context__ is not exc:
        exc = exc.__context__
    return str(exc) or type(exc).__name__


def check(config: HttpOptions, chosen: bool) -> None:
    if not chosen:
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


def hint(failure_class: str, config: HttpOptions) -> str:
    return {
        "refused": (
            " (check the receiver's IAM binding and URL; 401/403/404 are retried for"
            " --http-refusal-grace, then parked; once fixed: maintenance-bridge redrive)"
        ),
        "connection": f" (is the receiver {_without_query(config.http_url)} up? events wait)",
        "token": " (does the VM have a service account? events wait)",
        "redirect": " (events wait)",
    }.get(failure_class, "")


def _target(config: HttpOptions) -> str:
    return _without_query(config.http_url)


register(
    SinkType(
        name=HttpSink.name,
        factory=HttpSink,
        settings=HttpOptions,
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
