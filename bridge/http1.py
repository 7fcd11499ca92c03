"""A small HTTP/1.1 client: the metadata server's transport, and the HTTP sink's answer reader.

Why not urllib3: every change is one request on the hot path, and urllib3 with http.client
spent more CPU per answer (mostly parsing headers through the `email` package) than the rest
of handling the event. `Connection` sends one fixed request shape (GET, no body) and `Reader`
reads what HTTP/1.1 lets a server answer (RFC 9112: a Content-Length, chunked transfer coding,
or a body read to the close, after any interim 1xx), capping the header section and the body.

What it guarantees, each because a review found it broken:
- One deadline per request, not per read: connecting, sending and reading the whole answer end
  together at `deadline` seconds, however slowly a server trickles bytes.
- A byte left over after an answer (a server that wrote two answers in one go, or junk) closes
  the connection: the next request never reads a stale answer as its own.
- Strict framing: a chunk-size line is hex digits, optional RFC 9112 extensions and CRLF (no
  `0x4`, `+4` or stray blanks), each chunk's data ends in CRLF; one Content-Length (repeated
  only with the same value); a Transfer-Encoding other than `chunked` is refused.
- `poll`, not `select`: a descriptor above 1023 is fine.
- TCP keepalive on the metadata connections (`keepalive`): a connection its server forgot
  while the network was down (its RST lost) fails about a second after the network is back,
  instead of waiting out a 70 s long-poll deadline.
It keeps one connection alive, sets TCP_NODELAY, follows nothing, knows no proxy and is used
by one thread at a time.
"""

from __future__ import annotations

import contextlib
import math
import re
import select
import socket
import time
from dataclasses import dataclass

MAX_HEADER_LINE = 8 * 1024
MAX_HEADERS = 100
MAX_HEAD = 64 * 1024  # the whole header section of one answer
NO_BODY = (204, 304)
RECV = 64 * 1024
# Keepalive: the first probe after 1 s of silence, then one a second; 5 unanswered (6 s of
# silence, the same as TCP_USER_TIMEOUT for unacknowledged data) give the connection up. A peer
# that forgot the connection answers the first probe after the network's return with an RST:
# the request fails within about a second and is asked again on a new connection. Probes are
# not requests: a calm long-poll still costs one request per minute, plus one 66-byte probe
# and its ACK a second.
KEEPALIVE_IDLE = 1
KEEPALIVE_INTERVAL = 1
KEEPALIVE_COUNT = 5

_STATUS = re.compile(rb"(HTTP/1\.[0-9]) ([0-9]{3})(?: [^\x00\n\r\x0b\x0c]*)?")
# A header line: a token, a colon, the value without control characters (but tab), OWS around
# it; or, in the third group, a line that is not one (a fold, or broken).
_FIELD = re.compile(
    r"(?:([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*"
    r"((?:[^\x00-\x08\x0a-\x1f\x7f]*[^\x00-\x20\x7f])?)[ \t]*|(.*))\n"
)
_EXT_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
# chunk = chunk-size [ chunk-ext ] CRLF; chunk-ext = *( BWS ";" BWS name [ BWS "=" BWS value ] )
_CHUNK_LINE = re.compile(
    rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[ \t]*"
    + _EXT_TOKEN
    + rb"(?:[ \t]*=[ \t]*(?:"
    + _EXT_TOKEN
    + rb"|"
    + _QUOTED
    + rb"))?)*\r\n"
)


class ProtocolError(Exception):
    """The answer broke HTTP/1.1 framing or went over a cap."""


class ReadTimeout(Exception):
    """No complete answer by the request's deadline (connecting, sending and reading)."""


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]  # names lower-cased; of a repeated header, the first
    body: bytes


def keepalive(sock: socket.socket) -> None:
    """TCP keepalive probes on `sock` (see KEEPALIVE_*), where the platform has the options:
    Linux has all of them, macOS names the idle time TCP_KEEPALIVE, Windows 10 has the three."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    idle = getattr(socket, "TCP_KEEPIDLE", None) or getattr(socket, "TCP_KEEPALIVE", None)
    settings = (
        (idle, KEEPALIVE_IDLE),
        (getattr(socket, "TCP_KEEPINTVL", None), KEEPALIVE_INTERVAL),
        (getattr(socket, "TCP_KEEPCNT", None), KEEPALIVE_COUNT),
        (
            getattr(socket, "TCP_USER_TIMEOUT", None),
            (KEEPALIVE_IDLE + KEEPALIVE_INTERVAL * KEEPALIVE_COUNT) * 1000,
        ),
    )
    for option, value in settings:
        if option is not None:
            with contextlib.suppress(OSError):  # an older kernel or Windows build refusing one
                sock.setsockopt(socket.IPPROTO_TCP, option, value)


def readable(sock: socket.socket) -> bool:
    """Whether `sock` has something to read (or was closed) right now. poll where there is
    one: select refuses descriptors over 1023 (Windows has no poll, and no such limit)."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    return bool(select.select([sock], [], [], 0)[0])


class Reader:
    """Answers read from one socket, and the bytes read past the last one (which make the
    connection unfit for another request). Every wait ends at the caller's deadline, a
    `time.monotonic()` value: TimeoutError."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self._pending = getattr(sock, "pending", None)  # TLS: decrypted but not yet read
        self._poller = None
        if hasattr(select, "poll"):  # made once: a new poll object per request cost CPU
            self._poller = select.poll()
            self._poller.register(sock, select.POLLIN)

    def idle(self) -> bool:
        """Nothing buffered and nothing arrived: safe to send the next request on. A kept-alive
        connection that is readable while idle was closed by the server (or it sent junk)."""
        if self.buffer or (self._pending is not None and self._pending()):
            return False
        if self._poller is not None:
            return not self._poller.poll(0)
        return not readable(self.sock)

    def send(self, data: bytes, until: float) -> None:
        self.sock.settimeout(_left(until))
        self.sock.sendall(data)

    def response(
        self, until: float, max_body: int, *, truncate: bool = False
    ) -> tuple[Response, bool]:
        """The next answer, interim 1xx skipped, and whether the connection may be reused.
        A body over `max_body` is a ProtocolError, or with `truncate` cut to `max_body` (the
        connection is then not reused). A close before the answer is complete is an OSError."""
        while True:
            version, status, headers = self._head(until)
            if status >= 200 or status == 101:
                break  # 1xx (100 Continue, 103 Early Hints) precede the answer: skip them
        if status == 101:
            raise ProtocolError("HTTP 101: the server switched protocols")
        tokens = headers.get("connection", "").lower()
        keep = "close" not in tokens and version != "HTTP/1.0"  # no 1.0 keep-alive, as h11
        if status in NO_BODY:
            body = b""
        elif "transfer-encoding" in headers:
            coding = headers["transfer-encoding"]
            if coding.lower() != "chunked":
                raise ProtocolError(f"Transfer-Encoding {coding[:40]!r}")
            body = self._chunked(until, max_body, truncate)
        elif "content-length" in headers:
            body = self._exact(_length(headers["content-length"]), until, max_body, truncate)
        else:  # delimited by the close
            body, keep = self._to_close(until, max_body, truncate), False
        if len(body) >= max_body and truncate:
            keep = False  # the rest of a cut body is still on the wire
        if self.buffer:
            keep = False  # bytes after the answer: never read as the next one's
        return Response(status, headers, body), keep

    def _recv(self, until: float) -> bytes:
        self.sock.settimeout(_left(until))
        return self.sock.recv(RECV)

    def _head(self, until: float) -> tuple[str, int, dict[str, str]]:
        """The status line and header section: one block found in the buffer, then split."""
        buf = self.buffer
        while True:
            crlf = buf.find(b"\n\r\n")
            lf = buf.find(b"\n\n", 0, crlf if crlf >= 0 else len(buf))
            if lf >= 0:
                block, self.buffer = buf[: lf + 1], buf[lf + 2 :]
                break
            if crlf >= 0:
                block, self.buffer = buf[: crlf + 1], buf[crlf + 3 :]
                break
            if len(buf) > MAX_HEAD:
                raise ProtocolError(f"a header section of over {MAX_HEAD} bytes")
            data = self._recv(until)
            if not data:
                if not buf:
                    raise ConnectionResetError("the server closed the connection without answering")
                raise ConnectionResetError("the connection closed inside the header section")
            buf += data
        text = block.replace(b"\r\n", b"\n")
        first = text.index(b"\n")
        match = _STATUS.fullmatch(text, 0, first)
        if match is None:
            raise ProtocolError(f"not an HTTP/1.x status line: {text[: min(first, 60)]!r}")
        fields = text[first + 1 :].decode("latin-1")
        if fields.count("\n") > MAX_HEADERS:
            raise ProtocolError(f"over {MAX_HEADERS} header lines")
        return match.group(1).decode("ascii"), int(match.group(2)), _headers(fields)

    def _exact(self, size: int, until: float, max_body: int, truncate: bool) -> bytes:
        if size > max_body:
            if not truncate:
                raise ProtocolError(f"{size} bytes is over the {max_body} cap")
            size = max_body
        buf = self.buffer
        while len(buf) < size:
            data = self._recv(until)
            if not data:
                raise ConnectionResetError(f"the body ended after {len(buf)} of {size} bytes")
            buf += data
        self.buffer = buf[size:]
        return buf[:size]

    def _to_close(self, until: float, max_body: int, truncate: bool) -> bytes:
        buf = self.buffer
        while len(buf) <= max_body:
            data = self._recv(until)
            if not data:
                break
            buf += data
        self.buffer = b""
        if len(buf) > max_body and not truncate:
            raise ProtocolError(f"a body of over {max_body} bytes")
        return buf[:max_body]

    def _line(self, until: float) -> bytes:
        """One CRLF-ended line of the chunked framing (a chunk size, a trailer)."""
        buf = self.buffer
        while (end := buf.find(b"\n")) < 0:
            if len(buf) > MAX_HEADER_LINE:
                raise ProtocolError("a chunk-size or trailer line too long")
            data = self._recv(until)
            if not data:
                raise ConnectionResetError("the connection closed inside a chunked body")
            buf += data
        self.buffer = buf[end + 1 :]
        return buf[: end + 1]

    def _chunked(self, until: float, max_body: int, truncate: bool) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            line = self._line(until)
            match = _CHUNK_LINE.fullmatch(line)
            if match is None:
                raise ProtocolError(f"chunk-size line {line[:40]!r}")
            size = int(match.group(1), 16)
            if size == 0:
                self._trailers(until)
                return b"".join(parts)
            if total + size > max_body:
                if not truncate:
                    raise ProtocolError(f"a chunked body of over {max_body} bytes")
                parts.append(self._exact(max_body - total, until, max_body, truncate))
                return b"".join(parts)
            total += size
            parts.append(self._exact(size + 2, until, size + 2, False))
            if not parts[-1].endswith(b"\r\n"):
                raise ProtocolError("chunk data not followed by CRLF")
            parts[-1] = parts[-1][:-2]

    def _trailers(self, until: float) -> None:
        """The trailer section, checked as header lines and ignored."""
        lines = []
        while (line := self._line(until)) not in (b"\r\n", b"\n"):
            if len(lines) >= MAX_HEADERS:
                raise ProtocolError(f"over {MAX_HEADERS} trailer lines")
            lines.append(line[:-2] if line.endswith(b"\r\n") else line[:-1])
        _headers("".join(f"{line.decode('latin-1')}\n" for line in lines))


class Connection:
    """One kept-alive connection to `host:port`, opened on first use and again after any
    failure, after an answer with bytes behind it, or when the server closed it while it was
    idle. Connect failures and resets are OSError; the deadline passing is ReadTimeout."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        connect_timeout: float,
        max_body: int,
        probe: bool = False,
    ) -> None:
        """`probe`: TCP keepalive on the connection (`keepalive`)."""
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.max_body = max_body
        self.probe = probe
        self._sock: socket.socket | None = None
        self._reader: Reader | None = None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = self._reader = None

    def interrupt(self) -> None:
        """Wake a request blocked on this connection in another thread: it fails as a reset
        (the watcher's way to re-ask a calm long-poll sooner once a notice is on)."""
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):  # already closed
                sock.shutdown(socket.SHUT_RDWR)

    def request(self, head: bytes, deadline: float) -> Response:
        """Send `head` (a complete request without body) and read the answer, the whole
        exchange within `deadline` seconds."""
        until = time.monotonic() + deadline
        try:
            reader = self._open(until)
            reader.send(head, until)
            response, keep = reader.response(until, self.max_body)
        except TimeoutError as exc:
            self.close()
            if exc.errno is not None:  # ETIMEDOUT: the keepalive probes gave the peer up
                raise
            raise ReadTimeout(f"no complete answer within {deadline:g} s") from None
        except BaseException:
            self.close()
            raise
        if not keep:
            self.close()
        return response

    def _open(self, until: float = math.inf) -> Reader:
        if self._reader is not None and not self._reader.idle():
            self.close()
        if self._reader is None:
            wait = min(self.connect_timeout, _left(until))
            try:
                sock = socket.create_connection((self.host, self.port), timeout=wait)
            except TimeoutError:
                if wait < self.connect_timeout:
                    raise  # the request's deadline: ReadTimeout
                raise ConnectionError(f"no connection within {wait:g} s") from None
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.probe:
                keepalive(sock)
            self._sock, self._reader = sock, Reader(sock)
        return self._reader


def _left(until: float) -> float:
    left = until - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def _length(value: str) -> int:
    """A Content-Length: digits, or a list of the same digits (a repeated header)."""
    if value.isdigit() and value.isascii() and len(value) <= 18:
        return int(value)
    values = {v.strip(" \t") for v in value.split(",")}
    if len(values) != 1:
        raise ProtocolError(f"conflicting Content-Length {value[:40]!r}")
    (text,) = values
    if not text.isascii() or not text.isdigit() or len(text) > 18:
        raise ProtocolError(f"Content-Length {value[:40]!r}")
    return int(text)


def _headers(fields: str) -> dict[str, str]:
    """Header lines (latin-1, each ending in LF) into a dict. The usual section is split and
    checked by one regular expression (a loop of string methods over the lines cost a third of
    an answer's CPU); a folded line, or one that breaks the grammar, takes the line-by-line way.
    A control character anywhere (a bare CR, NUL) breaks the grammar of its line."""
    pairs = _FIELD.findall(fields) if len(fields) <= MAX_HEADER_LINE else [("", "", "")]
    headers: dict[str, str] = {}
    for name, value, other in pairs:
        if not name:
            return _headers(_unfolded(fields)) if other[:1] in (" ", "\t") else _broken(fields)
        key = name.lower()
        if key not in headers:
            headers[key] = value
        elif key in ("content-length", "transfer-encoding"):
            headers[key] += ", " + value  # every value counts: framing must not be ambiguous
    return headers


def _unfolded(fields: str) -> str:
    """An obsolete line fold joined into its line, with one space."""
    lines = fields.split("\n")[:-1]
    if lines[0][:1] in (" ", "\t"):
        raise ProtocolError("a continuation line at the start of the headers")
    joined: list[str] = []
    for line in lines:
        if line[:1] in (" ", "\t"):
            joined[-1] += " " + line.lstrip(" \t")
        else:
            joined.append(line)
    return "".join(f"{line}\n" for line in joined)


def _broken(fields: str) -> dict[str, str]:
    """Name what is wrong (ProtocolError)."""
    for line in fields.split("\n")[:-1]:
        if len(line) > MAX_HEADER_LINE:
            raise ProtocolError("a header line too long")
        if not _FIELD.fullmatch(line + "\n").group(1):
            raise ProtocolError(f"not a header line: {line[:60]!r}")
    raise ProtocolError("a header line too long")  # only the whole section was over the cap
