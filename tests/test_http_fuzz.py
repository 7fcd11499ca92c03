"""Fuzzing bridge/http1.py's answer framing against a reference parser: h11.

The bridge reads every metadata answer and every receiver's answer with `Reader`; a framing
mistake there is a stale value or a lost event. Two properties, over answers built from the
parts HTTP/1.1 allows (interim 1xx, Content-Length, chunked with extensions and trailers, a
body read to the close, LF or CRLF header lines, folded headers, junk after the answer):

- an answer both grammars allow is read by both alike: same status, same body, and the
  connection kept by ours exactly when h11 could reuse it (nothing left over, no close);
- an answer mutated at random is never read by ours unless h11 reads it the same way (blanks
  before a chunk extension's `;` aside: RFC 9112 allows them, h11 does not), and
  ours never keeps a connection h11 would not reuse: ours may be stricter (it refuses `4 \\r\\n`
  as a chunk size, control characters in header values; it closes on `Connection: close:`),
  never laxer, never different.
The bytes reach `Reader` through a socketpair, as they would from a server.
"""

from __future__ import annotations

import re
import socket
import time
from typing import Any

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.http1 import ProtocolError, Reader

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MAX_BODY = 1 << 20

Outcome = tuple[int, bytes, bool] | None  # status, body, connection reusable; None: refused


def ours(data: bytes) -> Outcome:
    left, right = socket.socketpair()
    with left, right:
        left.sendall(data)
        left.shutdown(socket.SHUT_WR)  # the server closes after writing
        try:
            response, keep = Reader(right).response(time.monotonic() + 5, MAX_BODY)
        except (ProtocolError, OSError):
            return None
    return response.status, response.body, keep


def reference(data: bytes) -> Outcome:
    """h11 as a client that sent one GET, then got `data` and the close."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/x", headers=[("Host", "test")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    status, body, closed = 0, b"", False
    try:
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                leftover = bool(conn.trailing_data[0])
                reusable = conn.their_state is h11.DONE and not leftover and not closed
                return status, body, reusable
            elif event is h11.NEED_DATA:
                conn.receive_data(b"")  # the close: ends a body read to it, or is an error
                closed = True
            elif not isinstance(event, h11.InformationalResponse):
                return None
    except h11.RemoteProtocolError:
        return None


# -- answers built from what HTTP/1.1 allows ----------------------------------------------------

_token = st.text(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-!#$%&'*+.^_`|~",
    min_size=1,
    max_size=12,
)
_value = st.text('abcdefghijklmnopqrstuvwxyz0123456789 ,;=/"()<>@[]{}?', max_size=20).map(str.strip)
_names = _token.filter(
    lambda n: n.lower() not in ("content-length", "transfer-encoding", "connection")
)
_headers = st.lists(st.tuples(_names, _value), max_size=5)
_ext = st.lists(
    st.tuples(
        _token,
        st.none()
        | _token
        | st.text('abc \\"', max_size=6).map(
            lambda v: '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        ),
    ),
    max_size=2,
)


@st.composite
def chunked(draw: Any, body: bytes) -> bytes:
    """`body` in chunks: sizes in hex (either case, leading zeros), extensions, trailers."""
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True) if b > a]
    out = b""
    for piece in [*pieces, b""]:
        digits = draw(st.sampled_from(["{:x}", "{:X}", "0{:x}", "000{:x}"])).format(len(piece))
        ext = "".join(f";{n}" + (f"={v}" if v is not None else "") for n, v in draw(_ext))
        out += f"{digits}{ext}\r\n".encode() + piece + (b"\r\n" if piece else b"")
    trailers = draw(_headers)
    return out + "".join(f"{n}: {v}\r\n" for n, v in trailers).encode() + b"\r\n"


@st.composite
def answers(draw: Any) -> bytes:
    eol = draw(st.sampled_from(["\r\n", "\n"]))
    out = ""
    for interim in draw(st.lists(st.sampled_from([100, 102, 103]), max_size=2)):
        out += f"HTTP/1.1 {interim} Interim{eol}"
        out += "".join(f"{n}: {v}{eol}" for n, v in draw(_headers)) + eol
    version = draw(st.sampled_from(["1.1", "1.0"]))
    status = draw(st.sampled_from([200, 201, 204, 304, 404, 500, 503]))
    reason = draw(st.sampled_from(["", " OK", " Not Found", " ", " A  b\tc"]))
    out += f"HTTP/{version} {status}{reason}{eol}"
    for name, value in draw(_headers):
        fold = draw(st.booleans()) and value
        out += f"{name}: {value}{eol}" if not fold else f"{name}: {value}{eol} \t{value}{eol}"
    if draw(st.booleans()):
        out += f"Connection: {draw(st.sampled_from(['close', 'keep-alive', 'Keep-Alive, x']))}{eol}"
    body = draw(st.binary(max_size=200))
    framing = draw(st.sampled_from(["length", "chunked", "close"]))
    if status in (204, 304):
        return (out + eol).encode()
    if framing == "length":
        lengths = draw(st.sampled_from([1, 2])) * [str(len(body))]
        out += "".join(f"Content-Length: {n}{eol}" for n in lengths) + eol
        tail = draw(st.sampled_from([b"", b"", b"HTTP/1.1 200 OK\r\n\r\n", b"junk"]))
        return out.encode() + body + tail
    if framing == "chunked":
        out += f"Transfer-Encoding: {draw(st.sampled_from(['chunked', 'Chunked']))}{eol}{eol}"
        return out.encode() + draw(chunked(body))
    return (out + eol).encode() + body


@FUZZ
@given(answers())
def test_an_answer_both_allow_is_read_alike(data: bytes) -> None:
    expected = reference(data)
    assert expected is not None, "the generator built an answer h11 refuses"
    assert ours(data) == expected


# RFC 9112 allows blanks before a chunk extension's ";" (BWS); h11 does not: the one place ours
# reads what h11 refuses, compared without them.
_BWS = re.compile(rb"(?m)^([0-9A-Fa-f]+)[ \t]+;")
_NASTY = b' \t\r\n:;,="0xX+-_aF\x00\x01\x7f\xff'


@st.composite
def mutated(draw: Any) -> bytes:
    data = bytearray(draw(answers()))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        how = draw(st.sampled_from(["insert", "delete", "replace", "repeat"]))
        byte = draw(st.sampled_from(list(_NASTY)))
        if how == "insert":
            data[at:at] = bytes([byte])
        elif how == "delete" and at < len(data):
            del data[at]
        elif how == "replace" and at < len(data):
            data[at] = byte
        else:
            data[at:at] = data[at : at + draw(st.integers(1, 8))]
    return bytes(data)


@FUZZ
@given(mutated())
def test_a_mutated_answer_is_never_read_laxer_or_differently(data: bytes) -> None:
    got = ours(data)
    if got is not None:
        expected = reference(data) or reference(_BWS.sub(rb"\1;", data))
        assert expected is not None, "read what h11 refuses"
        assert got[:2] == expected[:2], "read otherwise than h11"
        assert expected[2] or not got[2], "kept a connection h11 would not reuse"


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4 \r\nNONE\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nX-A: a\x01b\r\n\r\nNONE",
    ],
    ids=["blank after a chunk size", "control character in a value"],
)
def test_where_ours_is_stricter_than_h11(data: bytes) -> None:
    """The differences allowed above, named: h11 accepts both, RFC 9112 and 9110 do not."""
    assert reference(data) is not None and ours(data) is None


def test_where_ours_follows_rfc_9112_and_h11_does_not() -> None:
    data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4 ;a=b\r\nNONE\r\n0\r\n\r\n"
    assert reference(data) is None and ours(data) == (200, b"NONE", True)
