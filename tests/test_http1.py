"""The metadata client's HTTP/1.1 transport (bridge/http1.py) against a scripted raw server.

What the bridge relies on: every framing HTTP/1.1 allows a server (Content-Length, chunked,
read to the close, interim 1xx answers) reads the same body; a kept-alive connection is reused,
and one the server closed while idle is replaced without failing the request; caps hold and
broken framing is a ProtocolError, a silent close an OSError, a slow answer a ReadTimeout.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.harness import wait_for

from bridge.http1 import (
    KEEPALIVE_COUNT,
    KEEPALIVE_IDLE,
    KEEPALIVE_INTERVAL,
    MAX_HEADERS,
    Connection,
    ProtocolError,
    Reader,
    ReadTimeout,
    readable,
)

HEAD = b"GET /x HTTP/1.1\r\nHost: test\r\n\r\n"
Script = Callable[[socket.socket, int], None]  # (accepted connection, its index)


class RawServer:
    """Accepts connections on 127.0.0.1 and runs `script` on each; counts connections and
    requests read."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            index, self.connections = self.connections, self.connections + 1
            threading.Thread(target=self._run, args=(conn, index), daemon=True).start()

    def _run(self, conn: socket.socket, index: int) -> None:
        with conn, contextlib.suppress(OSError):
            self.script(conn, index)

    def close(self) -> None:
        self.listener.close()


def read_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            raise ConnectionError("client went away")
        data += chunk
    return data


def answering(*answers: bytes) -> Script:
    """Each request on a connection gets the next answer; the connection stays open."""

    def script(conn: socket.socket, index: int) -> None:
        for answer in answers:
            read_request(conn)
            conn.sendall(answer)
        conn.recv(1)  # hold it open until the client closes

    return script


@pytest.fixture
def serve() -> Iterator[Callable[[Script], tuple[RawServer, Connection]]]:
    made: list[tuple[RawServer, Connection]] = []

    def make(script: Script, max_body: int = 1024) -> tuple[RawServer, Connection]:
        server = RawServer(script)
        conn = Connection("127.0.0.1", server.port, connect_timeout=2.0, max_body=max_body)
        made.append((server, conn))
        return server, conn

    yield make
    for server, conn in made:
        conn.close()
        server.close()


def once(answer: bytes) -> Script:
    """One answer, then the server closes the connection (its keep-alive timer, say)."""

    def script(conn: socket.socket, index: int) -> None:
        read_request(conn)
        conn.sendall(answer)

    return script


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nETag: abc\r\n\r\nNONE"
CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nETag: abc\r\n\r\n"
    b"2;ext=1\r\nNO\r\n2\r\nNE\r\n0\r\nTrailer: x\r\n\r\n"
)
INTERIM = (
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 4\r\netag: abc\r\n\r\nNONE"
)
CLOSING = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 4\r\nETag: abc\r\n\r\nNONE"
HTTP10 = b"HTTP/1.0 200 OK\r\nContent-Length: 4\r\nETag: abc\r\n\r\nNONE"
TO_CLOSE = b"HTTP/1.1 200 OK\r\nETag: abc\r\n\r\nNONE"
BARE_LF = b"HTTP/1.1 200 OK\nContent-Length: 4\nETag: abc\n\nNONE"  # RFC 9112 2.2: a recipient MAY
# script, connections two requests take: one when the connection may be kept, else two
ANSWERS = {
    "content-length": (answering(OK, OK), 1),
    "header lines ended by bare LFs": (answering(BARE_LF, BARE_LF), 1),
    "chunked": (answering(CHUNKED, CHUNKED), 1),
    "interim 100 first": (answering(INTERIM, INTERIM), 1),
    "connection: close": (answering(CLOSING), 2),
    "http/1.0": (answering(HTTP10), 2),
    "body read to the close": (once(TO_CLOSE), 2),
    "closed by the server while idle": (once(OK), 2),
}


@pytest.mark.parametrize("case", ANSWERS)
def test_every_framing_reads_the_same_and_a_connection_is_kept_only_when_it_may_be(serve, case):
    script, connections = ANSWERS[case]
    server, conn = serve(script)
    for _ in range(2):
        response = conn.request(HEAD, 2.0)
        assert (response.status, response.body, response.headers["etag"]) == (200, b"NONE", "abc")
        threading.Event().wait(0.05)  # a server's close reaches the client while it is idle
    assert server.connections == connections


def trickled(
    answer: bytes, *, then_close: bool = False, pace: float = 0.001, whole: int = 0
) -> Script:
    """One answer sent a byte at a time (after its first `whole` bytes in one piece), each
    its own segment `pace` seconds apart: the client's reads see every framing cut at every
    place (a header line, a chunk-size line, chunk data, a trailer)."""

    def script(conn: socket.socket, index: int) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        read_request(conn)
        conn.sendall(answer[:whole])
        for byte in answer[whole:]:
            conn.sendall(bytes([byte]))
            threading.Event().wait(pace)
        if not then_close:
            conn.recv(1)

    return script


@pytest.mark.parametrize(
    ("answer", "then_close"),
    [(OK, False), (CHUNKED, False), (INTERIM, False), (TO_CLOSE, True), (BARE_LF, False)],
    ids=["content-length", "chunked", "interim 100 first", "body read to the close", "bare LFs"],
)
def test_every_framing_reads_the_same_when_it_arrives_a_byte_at_a_time(serve, answer, then_close):
    """A server (or a proxy, or a lossy link) may deliver an answer in any number of pieces:
    the body is the same as when it comes in one."""
    _, conn = serve(trickled(answer, then_close=then_close))
    response = conn.request(HEAD, 10.0)
    assert (response.status, response.body, response.headers["etag"]) == (200, b"NONE", "abc")


CAP = 100


def framed(framing: str, body: bytes) -> bytes:
    """`body` as an answer in `framing`; chunked in two chunks, so that the cap is counted
    over the whole body, not per chunk."""
    head = b"HTTP/1.1 200 OK\r\n"
    if framing == "content-length":
        return head + b"Content-Length: %d\r\n\r\n" % len(body) + body
    if framing == "chunked":
        first, rest = body[:-3], body[-3:]
        return (
            head
            + b"Transfer-Encoding: chunked\r\n\r\n"
            + b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (first, rest))
            + b"0\r\n\r\n"
        )
    return head + b"\r\n" + body  # read to the close


def read_framed(framing: str, body: bytes, *, truncate: bool) -> tuple[bytes, bool]:
    """The answer read with a cap of CAP; its last byte comes 50 ms after the rest (a reader
    that stopped at the cap would miss the byte over it)."""
    ours, theirs = socket.socketpair()
    wire = framed(framing, body)

    def last_byte() -> None:
        theirs.sendall(wire[-1:])
        if framing == "to the close":
            theirs.shutdown(socket.SHUT_WR)

    later = threading.Timer(0.05, last_byte)
    with ours, theirs:
        theirs.sendall(wire[:-1])
        later.start()
        try:
            response, keep = Reader(ours).response(time.monotonic() + 5, CAP, truncate=truncate)
        finally:
            later.join()
    return response.body, keep


@pytest.mark.parametrize("framing", ["content-length", "chunked", "to the close"])
def test_a_body_of_exactly_the_cap_is_read_and_one_byte_more_is_refused_or_cut(framing):
    """The cap on a body is exact, whatever the framing: the metadata client refuses one byte
    more (a ProtocolError), the sinks (truncate) read what fits and do not reuse the
    connection, whose rest of the body is still on the wire."""
    whole = bytes(range(CAP))
    body, keep = read_framed(framing, whole, truncate=False)
    assert body == whole
    assert keep is (framing != "to the close")
    with pytest.raises(ProtocolError):
        read_framed(framing, whole + b"!", truncate=False)
    body, keep = read_framed(framing, whole + b"!", truncate=True)
    assert (body, keep) == (whole, False)


@pytest.mark.parametrize(
    ("answer", "error", "match"),
    [
        (b"SSH-2.0-OpenSSH\r\n\r\n", ProtocolError, "status line"),
        (b"HTTP/1.1 abc OK\r\n\r\n", ProtocolError, "status line"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", ProtocolError, "header line"),
        (
            b"HTTP/1.1 200 OK\r\n" + b"X-A: 1\r\n" * (MAX_HEADERS + 1) + b"\r\n",
            ProtocolError,
            "header lines",
        ),
        (b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n", ProtocolError, "too long"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2000\r\n\r\n", ProtocolError, "cap"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", ProtocolError, "Content-Length"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            ProtocolError,
            "chunk-size line",
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            + (b"200\r\n" + b"a" * 512 + b"\r\n") * 2
            + b"0\r\n\r\n",
            ProtocolError,
            "chunked body of over",
        ),
        (b"HTTP/1.1 101 Switching\r\n\r\n", ProtocolError, "101"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nNONE", OSError, "body ended"),
        (b"HTTP/1.1 200 OK\r\nX-A: 1\r\n", OSError, "header section"),
        (b"", OSError, "without answering"),
    ],
    ids=[
        "not http",
        "bad status",
        "bad header",
        "too many headers",
        "header too long",
        "body over the cap",
        "negative length",
        "bad chunk size",
        "chunked over the cap",
        "switching protocols",
        "body cut short",
        "headers cut short",
        "closed without answering",
    ],
)
def test_broken_answers_fail_cleanly_and_the_next_request_reconnects(serve, answer, error, match):
    def script(conn: socket.socket, index: int) -> None:
        read_request(conn)
        if index == 0:
            conn.sendall(answer)
            conn.shutdown(socket.SHUT_WR)
            return
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nNONE")

    server, conn = serve(script, max_body=1000)
    with pytest.raises(error, match=match):
        conn.request(HEAD, 2.0)
    assert conn.request(HEAD, 2.0).body == b"NONE"
    assert server.connections == 2


def test_a_slow_answer_is_a_read_timeout(serve):
    def script(conn: socket.socket, index: int) -> None:
        read_request(conn)
        conn.recv(1)

    _, conn = serve(script)
    with pytest.raises(ReadTimeout):
        conn.request(HEAD, 0.2)


def test_no_answer_without_a_body(serve):
    _, conn = serve(answering(b"HTTP/1.1 204 No Content\r\n\r\n", OK))
    assert conn.request(HEAD, 2.0).body == b""
    assert conn.request(HEAD, 2.0).body == b"NONE"


def test_a_request_is_sent_whole_with_nodelay(serve):
    got: list[bytes] = []

    def script(conn: socket.socket, index: int) -> None:
        got.append(read_request(conn))
        conn.sendall(OK)
        conn.recv(1)

    _, conn = serve(script)
    conn.request(HEAD, 2.0)
    assert got == [HEAD]
    assert conn._sock is not None
    assert conn._sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def value(text: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nETag: e\r\n\r\n%s" % (len(text), text)


def test_two_answers_in_one_write_never_answer_the_next_request(serve):
    """A server that wrote two answers in one go: the second is not the next request's answer
    (it would be a stale value, a false transition back), the connection is replaced."""

    def script(conn: socket.socket, index: int) -> None:
        read_request(conn)
        conn.sendall(value(b"OLD") + value(b"STALE") if index == 0 else value(b"NEW"))
        conn.recv(1)

    server, conn = serve(script)
    assert conn.request(HEAD, 2.0).body == b"OLD"
    assert conn.request(HEAD, 2.0).body == b"NEW"
    assert server.connections == 2


def test_an_answer_arriving_unasked_while_idle_is_never_read_as_the_next_one(serve):
    """The stale answer comes a moment after the first was read: the idle check sees it."""
    first_read = threading.Event()

    def script(conn: socket.socket, index: int) -> None:
        read_request(conn)
        conn.sendall(value(b"OLD" if index == 0 else b"NEW"))
        if index == 0 and first_read.wait(5):
            conn.sendall(value(b"STALE"))
        conn.recv(1)

    server, conn = serve(script)
    assert conn.request(HEAD, 2.0).body == b"OLD"
    first_read.set()
    sock = conn._sock
    assert sock is not None
    wait_for("the unasked answer at the client", lambda: readable(sock))
    assert conn.request(HEAD, 2.0).body == b"NEW"
    assert server.connections == 2


@pytest.mark.parametrize("where", ["header section", "body"])
def test_a_trickling_server_cannot_stretch_a_request_past_its_deadline(serve, where):
    """One byte every 50 ms: each read is quick, the whole answer would take seconds; the
    request ends at its deadline (a per-read time-out let a 1 s request run 8.3 s)."""
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 200\r\nETag: e\r\n\r\n" + b"x" * 200
    start = answer.index(b"\r\n\r\n") + 4 if where == "body" else 0
    _, conn = serve(trickled(answer, pace=0.05, whole=start), max_body=1000)
    began = time.monotonic()
    with pytest.raises(ReadTimeout):
        conn.request(HEAD, 1.0)
    took = time.monotonic() - began
    assert 0.9 < took < 1.5, f"the request took {took:.2f} s"


def chunked(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nETag: e\r\n\r\n" + body


@pytest.mark.parametrize(
    "body",
    [
        b"0x4\r\nNONE\r\n0\r\n\r\n",
        b"+4\r\nNONE\r\n0\r\n\r\n",
        b"-4\r\nNONE\r\n0\r\n\r\n",
        b" 4\r\nNONE\r\n0\r\n\r\n",
        b"4 \r\nNONE\r\n0\r\n\r\n",
        b"\t4\r\nNONE\r\n0\r\n\r\n",
        b"4_0\r\nNONE\r\n0\r\n\r\n",
        b"4\nNONE\r\n0\r\n\r\n",
        b"4\r\nNONExx0\r\n\r\n",
        b"4\r\nNONE\n0\r\n\r\n",
        b"4;\r\nNONE\r\n0\r\n\r\n",
        b"4;a=\r\nNONE\r\n0\r\n\r\n",
        b'4;a="x\r\nNONE\r\n0\r\n\r\n',
        b"4;a b\r\nNONE\r\n0\r\n\r\n",
        b"\r\n4\r\nNONE\r\n0\r\n\r\n",
        b"4\r\nNONE\r\n0\r\nbad trailer\r\n\r\n",
        b"4\r\nNONE\r\n0\r\n" + b"X-A: 1\r\n" * (MAX_HEADERS + 1) + b"\r\n",
    ],
    ids=[
        "0x prefix",
        "plus sign",
        "minus sign",
        "leading space",
        "trailing space",
        "leading tab",
        "underscore",
        "bare LF after the size",
        "no CRLF after the data",
        "bare LF after the data",
        "empty extension",
        "extension without value",
        "unterminated quoted extension",
        "extension with a space inside",
        "blank line first",
        "malformed trailer",
        "one trailer line too many",
    ],
)
def test_chunked_framing_is_strict(serve, body):
    _, conn = serve(answering(chunked(body)))
    with pytest.raises(ProtocolError):
        conn.request(HEAD, 2.0)


@pytest.mark.parametrize(
    "body",
    [
        b"4\r\nNONE\r\n0\r\n\r\n",
        b"0004\r\nNONE\r\n000\r\n\r\n",
        b'2;ext\r\nNO\r\n2;a=b;c="q \\" d"\r\nNE\r\n0;last\r\n\r\n',
        b"2 ;a = b\r\nNO\r\n2\t; a\r\nNE\r\n0\r\n\r\n",
        b"2\r\nNO\r\n2\r\nNE\r\n0\r\nExpires: never\r\nX-A: 1\r\n\r\n",
        b"1\r\nN\r\n3\r\nONE\r\n0\r\n\r\n",
        b"4\r\nNONE\r\n0\r\nX-A: 1\nX-B: 2\n\n",
        b"4\r\nNONE\r\n0\r\n" + b"X-A: 1\r\n" * MAX_HEADERS + b"\r\n",
    ],
    ids=[
        "plain",
        "leading zeros",
        "extensions",
        "BWS before ; and =",
        "trailers",
        "split",
        "trailers ended by bare LFs",
        "as many trailer lines as header lines",
    ],
)
def test_chunked_framing_allows_what_rfc_9112_allows(serve, body):
    server, conn = serve(answering(chunked(body), chunked(body)))
    assert conn.request(HEAD, 2.0).body == b"NONE"
    assert conn.request(HEAD, 2.0).body == b"NONE"
    assert server.connections == 1


@pytest.mark.parametrize(
    ("headers", "ok"),
    [
        (b"Content-Length: 4\r\nContent-Length: 4\r\n", True),
        (b"Content-Length: 4, 4\r\n", True),
        (b"Content-Length: 4\r\nContent-Length: 5\r\n", False),
        (b"Content-Length: 4, 5\r\n", False),
        (b"Content-Length: +4\r\n", False),
        (b"Content-Length: 0x4\r\n", False),
        (b"Content-Length: \xb2\r\n", False),
        (b"Transfer-Encoding: gzip, chunked\r\n", False),
        (b"Transfer-Encoding: chunked\r\nContent-Length: 99\r\n", True),
        (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n", False),
        (b"Content-Length: 4,\t4\r\n", True),
        (b"Content-Length: 000000000000000004\r\n", True),
        (b"Content-Length: 0000000000000000004\r\n", False),
        (b"Content-Length: 000000000000000004, 000000000000000004\r\n", True),
        (b"Content-Length: 0000000000000000004, 0000000000000000004\r\n", False),
    ],
    ids=[
        "repeated, same",
        "list, same",
        "repeated, different",
        "list, different",
        "plus sign",
        "hex",
        "a latin-1 digit",
        "a coding besides chunked",
        "chunked wins over a length",
        "a second coding in a repeated header",
        "list with a tab",
        "18 digits",
        "19 digits: no server sends 10^18 bytes",
        "list, 18 digits",
        "list, 19 digits",
    ],
)
def test_framing_headers_must_not_be_ambiguous(serve, headers, ok):
    body = b"4\r\nNONE\r\n0\r\n\r\n" if b"chunked" in headers else b"NONE"
    _, conn = serve(answering(b"HTTP/1.1 200 OK\r\n" + headers + b"\r\n" + body))
    if ok:
        assert conn.request(HEAD, 2.0).body == b"NONE"
    else:
        with pytest.raises(ProtocolError):
            conn.request(HEAD, 2.0)


@pytest.mark.parametrize("fold", [b"  ", b"\t", b" \t "], ids=["spaces", "a tab", "mixed"])
def test_a_folded_header_is_joined(serve, fold):
    answer = b"HTTP/1.1 200 OK\r\nETag: a\r\n" + fold + b"b\r\nContent-Length: 4\r\n\r\nNONE"
    _, conn = serve(answering(answer))
    assert conn.request(HEAD, 2.0).headers["etag"] == "a b"


@pytest.mark.parametrize("fold", [b" ", b"\t"], ids=["a space", "a tab"])
def test_a_fold_before_any_header_is_refused(serve, fold):
    """A continuation of nothing: no header to join it to (RFC 9112 section 5.2)."""
    answer = b"HTTP/1.1 200 OK\r\n" + fold + b"ETag: a\r\nContent-Length: 4\r\n\r\nNONE"
    _, conn = serve(answering(answer))
    with pytest.raises(ProtocolError, match="continuation"):
        conn.request(HEAD, 2.0)


def test_a_descriptor_above_1023_works(serve):
    """The idle check uses poll: select() refused a descriptor over 1023 and killed a watcher."""
    resource = pytest.importorskip("resource")  # POSIX only
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1100:
        pytest.skip(f"the hard descriptor limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1100), hard))
    fillers = [os.open(os.devnull, os.O_RDONLY) for _ in range(1030)]
    try:
        _, conn = serve(answering(OK, OK))
        assert conn.request(HEAD, 2.0).body == b"NONE"
        assert conn._sock is not None and conn._sock.fileno() > 1023
        assert conn.request(HEAD, 2.0).body == b"NONE"  # through the idle check
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_keepalive_probes_are_set_where_the_platform_has_them(serve):
    server = RawServer(answering(OK))
    conn = Connection("127.0.0.1", server.port, connect_timeout=2.0, max_body=1024, probe=True)
    try:
        conn.request(HEAD, 2.0)
        sock = conn._sock
        assert sock is not None
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
        for name, expected in [
            ("TCP_KEEPIDLE", KEEPALIVE_IDLE),
            ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
            ("TCP_KEEPCNT", KEEPALIVE_COUNT),
        ]:
            if hasattr(socket, name):
                assert sock.getsockopt(socket.IPPROTO_TCP, getattr(socket, name)) == expected
    finally:
        conn.close()
        server.close()


# -- through a blackout, in a network namespace of the test's own --------------------------------

TESTS = Path(__file__).resolve().parent


def _namespaces() -> str:
    """Why a network namespace cannot be made here, or ""."""
    if not shutil.which("unshare") or not shutil.which("ip"):
        return "unshare or ip is not installed"
    probe = subprocess.run(
        ["unshare", "-rn", "ip", "link", "set", "lo", "up"], capture_output=True, timeout=30
    )
    if probe.returncode:
        return f"unshare -rn failed: {probe.stderr.decode(errors='replace').strip()[:200]}"
    return ""


NO_NAMESPACE = _namespaces() if sys.platform.startswith("linux") else "not Linux"
needs_namespace = pytest.mark.skipif(bool(NO_NAMESPACE), reason=NO_NAMESPACE or "-")


def in_namespace(**scenario: Any) -> dict[str, Any]:
    """Run `blackout(**scenario)` in a new unprivileged network namespace (`unshare -rn`)."""
    code = (
        f"import json, sys; sys.path[:0] = [{str(TESTS)!r}, {str(TESTS.parent)!r}]; "
        f"import test_http1; print(json.dumps(test_http1.blackout(**{scenario!r})))"
    )
    child = subprocess.Popen(
        ["unshare", "-rn", sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()  # by its own pid: the namespace and its servers go with it
            child.wait()
    assert child.returncode == 0, err
    return dict(json.loads(out.strip().splitlines()[-1]))


def _link(state: str) -> None:
    subprocess.run(["ip", "link", "set", "lo", state], check=True)


def blackout(*, forget: bool, probe: bool, dark: float, deadline: float, answer: bool) -> dict:
    """Inside the namespace: a long-poll is asked and held by the server; the link goes down
    for `dark` seconds; meanwhile the server forgets the connection (an RST that the blackout
    swallows) or keeps it; after the link is back it answers (`answer`) or never does.
    Returns when and how the client's request ended, counted from the link's return."""
    _link("up")
    listener = socket.create_server(("127.0.0.1", 0))
    held: queue.Queue[socket.socket] = queue.Queue()

    def serve() -> None:
        peer, _ = listener.accept()
        read_request(peer)
        held.put(peer)

    threading.Thread(target=serve, daemon=True).start()
    conn = Connection(
        "127.0.0.1", listener.getsockname()[1], connect_timeout=2.0, max_body=1024, probe=probe
    )
    outcome: dict[str, Any] = {}
    ended = threading.Event()

    def ask() -> None:
        try:
            outcome["body"] = conn.request(HEAD, deadline).body.decode()
        except Exception as exc:
            outcome["error"] = type(exc).__name__
        outcome["at"] = time.monotonic()
        ended.set()

    began = time.monotonic()
    threading.Thread(target=ask, daemon=True).start()
    peer = held.get(timeout=10)  # the request is at the server: the poll hangs
    _link("down")
    if forget:
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        os.close(peer.detach())  # an RST, lost in the blackout
    ended.wait(dark)  # the blackout's length is the scenario, not a guess
    up = time.monotonic()
    _link("up")
    if answer and not forget:
        peer.sendall(OK)
    ended.wait(deadline + 5)
    return {
        **outcome,
        "after_up": outcome.get("at", math.inf) - up,
        "took": outcome.get("at", math.inf) - began,
    }


@needs_namespace
def test_a_connection_the_server_forgot_in_a_blackout_fails_soon_after_the_link_is_back():
    got = in_namespace(forget=True, probe=True, dark=2.0, deadline=30.0, answer=False)
    assert got.get("error") == "ConnectionResetError", got
    assert got["after_up"] < 2.5, got


@needs_namespace
def test_without_keepalive_a_forgotten_connection_waits_for_its_deadline():
    """The control: what the keepalive probes save (the test above can fail)."""
    got = in_namespace(forget=True, probe=False, dark=2.0, deadline=6.0, answer=False)
    assert got.get("error") == "ReadTimeout" and got["after_up"] > 3.0, got


@needs_namespace
def test_a_connection_that_survived_a_short_blackout_is_kept_and_answers():
    got = in_namespace(forget=False, probe=True, dark=2.0, deadline=30.0, answer=True)
    assert got.get("body") == "NONE" and got["after_up"] < 1.0, got


@needs_namespace
def test_a_poll_that_survived_but_is_never_answered_ends_at_its_deadline():
    got = in_namespace(forget=False, probe=True, dark=1.5, deadline=4.0, answer=False)
    assert got.get("error") == "ReadTimeout", got
    assert 3.9 < got["took"] < 5.0, got


@needs_namespace
def test_a_long_blackout_gives_the_connection_up_as_a_connection_failure():
    """6 s without a word from the peer (5 probes unanswered): the connection is given up
    (ETIMEDOUT, an OSError: a connection failure, not the request's deadline), so the watcher
    asks again on a new one as soon as the network lets it."""
    got = in_namespace(forget=False, probe=True, dark=10.0, deadline=30.0, answer=False)
    assert got.get("error") == "TimeoutError", got
    assert 5.5 < got["took"] < 8.0, got
