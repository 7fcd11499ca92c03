"""A small HTTP/1.1 client for one plain-HTTP peer on the VM's own network: the metadata server.

Why not urllib3: every change is one request on the hot path, and urllib3 with http.client
spent more CPU per answer (mostly parsing headers through the `email` package) than the rest
of handling the event. This client sends one fixed request shape (GET, no body) and reads what
HTTP/1.1 lets a server answer (RFC 9112: a Content-Length, chunked transfer coding, or a body
read to the close), capping both the header block and the body. It keeps one connection alive,
sets TCP_NODELAY, follows nothing, knows no proxy and is used by one thread at a time.
"""

from __future__ import annotations

import contextlib
import select
import socket
from dataclasses import dataclass
from typing import BinaryIO

MAX_HEADER_LINE = 8 * 1024
MAX_HEADERS = 100
NO_BODY = (204, 304)


class ProtocolError(Exception):
    """The answer broke HTTP/1.1 framing or went over a cap."""


class ReadTimeout(Exception):
    """Connected and asked, but no (complete) answer within the read time-out."""


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]  # names lower-cased; of a repeated header, the first
    body: bytes


class Connection:
    """One kept-alive connection to `host:port`, opened on first use and again after any
    failure, or when the server closed it while it was idle. Connect failures and resets are
    OSError."""

    def __init__(self, host: str, port: int, *, connect_timeout: float, max_body: int) -> None:
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.max_body = max_body
        self._sock: socket.socket | None = None
        self._reader: BinaryIO | None = None

    def close(self) -> None:
        if self._sock is not None:
            if self._reader is not None:
                self._reader.close()  # the socket's file descriptor stays open until it is
            self._sock.close()
            self._sock = self._reader = None

    def interrupt(self) -> None:
        """Wake a request blocked on this connection in another thread: it fails as a reset
        (the watcher's way to re-ask a calm long-poll sooner once a notice is on)."""
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):  # already closed
                sock.shutdown(socket.SHUT_RDWR)

    def request(self, head: bytes, timeout: float) -> Response:
        """Send `head` (a complete request without body) and read the answer."""
        sock = self._open()
        try:
            sock.settimeout(timeout)
            sock.sendall(head)
            response, keep = self._read()
        except TimeoutError:
            self.close()
            raise ReadTimeout(f"no answer within {timeout:g} s") from None
        except BaseException:
            self.close()
            raise
        if not keep:
            self.close()
        return response

    def _open(self) -> socket.socket:
        if self._sock is not None and select.select([self._sock], [], [], 0)[0]:
            self.close()  # readable while idle: the server closed it (or sent junk)
        if self._sock is None:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock, self._reader = sock, sock.makefile("rb")
        return self._sock

    def _read(self) -> tuple[Response, bool]:
        reader = self._reader
        assert reader is not None
        while True:
            line = reader.readline(MAX_HEADER_LINE + 1)
            if not line:
                raise ConnectionResetError("the server closed the connection without answering")
            version, status = _status_line(line)
            headers = _headers(reader)
            if status >= 200 or status == 101:
                break  # 1xx (100 Continue, 103 Early Hints) precede the answer: skip them
        if status == 101:
            raise ProtocolError("HTTP 101: the server switched protocols")
        connection = headers.get("connection", "").lower()
        keep = "close" not in connection and (version == "HTTP/1.1" or "keep-alive" in connection)
        if status in NO_BODY:
            return Response(status, headers, b""), keep
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return Response(status, headers, self._chunked(reader)), keep
        length = headers.get("content-length")
        if length is None:  # delimited by the close
            body = reader.read(self.max_body + 1)
            if len(body) > self.max_body:
                raise ProtocolError(f"a body of over {self.max_body} bytes")
            return Response(status, headers, body), False
        if not length.isdigit():
            raise ProtocolError(f"Content-Length {length[:40]!r}")
        size = int(length)
        if size > self.max_body:
            raise ProtocolError(f"{size} bytes is over the {self.max_body} cap")
        body = reader.read(size)
        if len(body) < size:
            raise ConnectionResetError(f"the body ended after {len(body)} of {size} bytes")
        return Response(status, headers, body), keep

    def _chunked(self, reader: BinaryIO) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            line = reader.readline(MAX_HEADER_LINE + 1)
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise ProtocolError(f"chunk size {size_text[:40]!r}") from None
            if size == 0:
                _headers(reader)  # the trailer section, ignored
                return b"".join(parts)
            total += size
            if size < 0 or total > self.max_body:
                raise ProtocolError(f"a chunked body of over {self.max_body} bytes")
            chunk = reader.read(size + 2)
            if len(chunk) < size + 2:
                raise ConnectionResetError("the connection closed inside a chunk")
            parts.append(chunk[:size])


def _status_line(line: bytes) -> tuple[str, int]:
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ProtocolError(f"not an HTTP/1.x status line: {line[:60]!r}")
    return parts[0].decode("ascii", "replace"), int(parts[1])


def _headers(reader: BinaryIO) -> dict[str, str]:
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADERS + 1):
        line = reader.readline(MAX_HEADER_LINE + 1)
        if line in (b"\r\n", b"\n"):
            return headers
        if not line:
            raise ConnectionResetError("the connection closed inside the header section")
        if not line.endswith(b"\n"):
            raise ProtocolError("a header line too long, or cut off")
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise ProtocolError(f"not a header line: {line[:60]!r}")
        headers.setdefault(name.decode("latin-1").lower(), value.strip().decode("latin-1"))
    raise ProtocolError(f"over {MAX_HEADERS} header lines")
