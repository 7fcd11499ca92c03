"""The metadata client's HTTP/1.1 transport (bridge/http1.py) against a scripted raw server.

What the bridge relies on: every framing HTTP/1.1 allows a server (Content-Length, chunked,
read to the close, interim 1xx answers) reads the same body; a kept-alive connection is reused,
and one the server closed while idle is replaced without failing the request; caps hold and
broken framing is a ProtocolError, a silent close an OSError, a slow answer a ReadTimeout.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from bridge.http1 import MAX_HEADERS, Connection, ProtocolError, ReadTimeout

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
# script, connections two requests take: one when the connection may be kept, else two
ANSWERS = {
    "content-length": (answering(OK, OK), 1),
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
