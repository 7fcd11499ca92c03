"""Pub/Sub's REST API (`projects.topics.publish`), the sink's default transport.

The bridge publishes about one message a month: google-cloud-pubsub and gRPC cost some 35 MB
of resident memory and tens of megabytes of wheels for that. This is the standard library:
one kept-alive connection (TCP_NODELAY, TCP keepalive, https verified against the system trust
store), each request written in one piece and its answer read by bridge/http1.py's `Reader`,
JSON bodies, and the VM service account's access token from the metadata server, as
google-auth's Compute Engine credentials get it.

Each publish is made on the calling thread (the relay's): the request written and its answer
read before `publish` returns, one message per request. No worker thread sits between the event
and its acknowledgement: against the emulator, a worker and the wake-ups to it and back cost
about 0.4 ms at p50 and 2.4 ms at p99 over the same exchange made by the caller (bench/
phases_pubsub.py measures both transports). A failed publish pauses its ordering key: every
later publish on the key fails with `KeyPaused` until `resume(key)`, as `PublisherClient` with
message ordering behaves. No retry inside: the relay owns retries and the outage lines.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import ssl
import threading
import time
from concurrent.futures import Future

from bridge import __version__
from bridge.http1 import ProtocolError, Reader, keepalive
from bridge.metadata import MetadataClient, MetadataError

TOKEN_PATH = "instance/service-accounts/default/token"
# google-auth refreshes a token 3 min 45 s before it expires (_helpers.REFRESH_THRESHOLD).
REFRESH_BEFORE = 225.0
MAX_ANSWER = 64 * 1024  # bytes of an answer read


class PublishFailed(Exception):
    """A publish that did not go through; `failure_class` is one of the sink's classes."""

    def __init__(self, failure_class: str, message: str) -> None:
        super().__init__(message)
        self.failure_class = failure_class


class KeyPaused(Exception):
    """The ordering key is paused by an earlier failure (the library's
    PublishToPausedOrderingKeyException)."""


class Closed(Exception):
    """Published after `close`."""


def failure_class(status: int) -> str:
    """The sink's class of an HTTP answer that is not 200."""
    if status == 404:
        return "not_found"
    if status in (401, 403):
        return "permission"
    if status in (408, 429, 499) or status >= 500:
        return "unavailable"
    return "other"  # a 400: a message the topic's schema refuses, say


class MetadataTokens:
    """The default service account's access token, cached and asked again `REFRESH_BEFORE`
    seconds before it expires (monotonic clock: a stepped wall clock changes nothing). Asked
    only inside a publish, one at a time (the transport's lock): one metadata connection."""

    def __init__(self, metadata_url: str) -> None:
        self.metadata_url = metadata_url
        self._client: MetadataClient | None = None
        self._token = ""
        self._refresh_at = 0.0

    def get(self) -> str:
        if self._token and time.monotonic() < self._refresh_at:
            return self._token
        if self._client is None:
            self._client = MetadataClient(self.metadata_url)
        try:
            reading = self._client.get(TOKEN_PATH)
        except MetadataError as exc:
            raise PublishFailed("unavailable", f"access token: {exc}") from None
        value = reading.value
        if reading.absent:
            raise PublishFailed("permission", f"access token: {TOKEN_PATH} answered 404")
        if not isinstance(value, dict) or not isinstance(value.get("access_token"), str):
            raise PublishFailed("unavailable", f"access token: {TOKEN_PATH} is not a token")
        lifetime = value.get("expires_in", 0)
        lifetime = float(lifetime) if isinstance(lifetime, (int, float)) else 0.0
        self._token = value["access_token"]
        self._refresh_at = time.monotonic() + max(lifetime - REFRESH_BEFORE, 0.0)
        return self._token

    def forget(self) -> None:
        """The token was refused (401): ask for a new one next time."""
        self._token = ""

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


class RestTransport:
    """Publishes to `topic` at `host` (host[:port]): https (`secure`), or plain http to an
    emulator; with `tokens`, each request carries the access token. One publish at a time
    (a lock, held across the exchange: the relay is the one caller in the bridge), each within
    `timeout`."""

    def __init__(
        self,
        topic: str,
        host: str,
        *,
        secure: bool,
        tokens: MetadataTokens | None,
        timeout: float = 20.0,
    ) -> None:
        self.host = host
        self.secure = secure
        self.path = f"/v1/{topic}:publish"
        self.tokens = tokens
        self.timeout = timeout
        self._lock = threading.Lock()
        self._paused: set[str] = set()
        self._closed = False
        self._reader: Reader | None = None  # the kept-alive connection
        self._tls: ssl.SSLContext | None = None
        self._headers = {
            "Content-Type": "application/json",
            "User-Agent": f"maintenance-bridge/{__version__}",
        }

    def publish(self, key: str, attributes: dict[str, str], data: bytes) -> Future[str]:
        """The message published, or why not: the returned future is already resolved."""
        future: Future[str] = Future()
        message: dict[str, object] = {"data": base64.b64encode(data).decode("ascii")}
        if attributes:
            message["attributes"] = attributes
        if key:
            message["orderingKey"] = key
        with self._lock:
            if self._closed:
                future.set_exception(Closed("publish after close"))
            elif key in self._paused:
                future.set_exception(KeyPaused(f"ordering key {key!r} paused by a failed publish"))
            else:
                try:
                    future.set_result(self._post(message))
                except Exception as exc:
                    if key:
                        self._paused.add(key)
                    future.set_exception(exc)
        return future

    def resume(self, key: str) -> None:
        with self._lock:
            self._paused.discard(key)

    def close(self) -> None:
        """No more publishes; one in progress (a server that does not answer) fails at once:
        its connection is shut down under it, without waiting for the lock it holds."""
        self._closed = True
        reader = self._reader
        if reader is not None:
            with contextlib.suppress(OSError):
                reader.sock.shutdown(socket.SHUT_RDWR)
        with self._lock:
            self._drop()
            if self.tokens is not None:
                self.tokens.close()

    def _post(self, message: dict[str, object]) -> str:
        body = json.dumps({"messages": [message]}, separators=(",", ":")).encode()
        headers = dict(self._headers)
        if self.tokens is not None:
            headers["Authorization"] = "Bearer " + self.tokens.get()
        status, answer = self._exchange(body, headers)
        if status == 401 and self.tokens is not None:
            self.tokens.forget()
        if status != 200:
            raise PublishFailed(failure_class(status), _error_text(status, answer))
        try:
            ids = json.loads(answer)["messageIds"]
        except (ValueError, KeyError, TypeError):
            raise PublishFailed("other", f"HTTP 200 without messageIds: {answer[:200]!r}") from None
        if not isinstance(ids, list) or len(ids) != 1:
            raise PublishFailed("other", f"one message published, ids {ids!r}")
        return str(ids[0])

    def _exchange(self, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        """One POST, written in one piece (one segment: no second wakeup of the server), the
        answer read by bridge/http1.py's `Reader` (strict framing, bytes left after an answer
        make the connection unfit), the whole exchange within `timeout`. A kept-alive
        connection the server closed while idle is replaced once (nothing was read from it, so
        at most the server has the message twice, same id)."""
        lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        request = (
            f"POST {self.path} HTTP/1.1\r\nHost: {self.host}\r\n{lines}"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode("latin-1") + body
        if self._reader is not None and not self._reader.idle():
            self._drop()  # closed by the server while idle, or junk behind the last answer
        replace_stale = self._reader is not None
        while True:
            until = time.monotonic() + self.timeout
            try:
                reader = self._connect()
                reader.send(request, until)
                response, keep = reader.response(until, MAX_ANSWER, truncate=True)
            except TimeoutError as exc:
                self._drop()
                reason = str(exc) or f"no complete answer within {self.timeout:g} s"
                raise PublishFailed("unavailable", f"{self.host}: {reason}") from None
            except (OSError, ProtocolError) as exc:
                self._drop()
                if replace_stale and isinstance(exc, (ConnectionResetError, BrokenPipeError)):
                    replace_stale = False
                    continue
                raise PublishFailed("unavailable", f"{self.host}: {_reason(exc)}") from None
            if not keep:
                self._drop()  # closing, cut, or more than the answer: not reusable
            return response.status, response.body

    def _connect(self) -> Reader:
        """The kept-alive connection, opened when there is none: TCP_NODELAY, TCP keepalive (a
        Pub/Sub front end that forgot it in a blackout is noticed about a second after the
        network is back), https verified against the system trust store."""
        if self._closed:  # closed while this publish was under way: no new connection
            raise Closed("the transport is closed")
        if self._reader is None:
            name, _, port = self.host.rpartition(":") if ":" in self.host else (self.host, "", "")
            sock = socket.create_connection(
                (name, int(port or (443 if self.secure else 80))), timeout=self.timeout
            )
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            keepalive(sock)
            if self.secure:
                if self._tls is None:
                    self._tls = ssl.create_default_context()  # the system trust store, once
                sock = self._tls.wrap_socket(sock, server_hostname=name)
            self._reader = Reader(sock)
        return self._reader

    def _drop(self) -> None:
        if self._reader is not None:
            self._reader.sock.close()
            self._reader = None


def _error_text(status: int, answer: bytes) -> str:
    """'HTTP 404 NOT_FOUND: Resource not found (resource=t).': the API's own error, short."""
    try:
        error = json.loads(answer)["error"]
        return f"HTTP {status} {error.get('status', '')}: {error.get('message', '')}"[:500]
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"HTTP {status}: {answer[:200].decode('utf-8', 'replace')}"


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
