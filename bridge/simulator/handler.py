"""The simulator's HTTP side: the metadata API's header rules, faults on the wire, the control
API, and one-write responses; every answer comes from the `Simulator` state model."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import socket
import struct
import sys
import threading
from dataclasses import replace
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from bridge.simulator.scenarios import SCENARIOS, parse_steps
from bridge.simulator.wire import CONTROL, JSON, MISSING_FLAVOR, TEXT, V1, Query, Reply, etag_of

if TYPE_CHECKING:
    from bridge.simulator.state import Simulator

HUGE_SIZE = 1 << 20
# Windows declares struct linger with two u_shorts, POSIX with two ints.
_LINGER_RST = struct.pack("HH" if sys.platform == "win32" else "ii", 1, 0)


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # many simulated VMs and their hanging GETs

    def __init__(self, address: tuple[str, int], sim: Simulator) -> None:
        self.sim = sim
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def drop_connections(self) -> None:
        """Wake handler threads blocked on idle keep-alive sockets."""
        with self.connections_lock:
            for conn in self.connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    def forget_connections(self) -> int:
        """Close every open connection with a reset and without a word, as a new host after a
        migration would (it never had them): during a blackout the reset is lost and the client
        is left waiting on a connection nobody holds. How many were forgotten."""
        with self.connections_lock:
            forgotten = list(self.connections)
            self.connections.clear()
            for conn in forgotten:
                with contextlib.suppress(OSError):
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
                    # Wakes a handler blocked reading an idle connection (sends nothing): while
                    # a thread is inside recv, closing the descriptor would not release it.
                    conn.shutdown(socket.SHUT_RD)
                fd = conn.detach()  # the handler's socket object no longer owns a descriptor
                if fd >= 0:
                    os.close(fd)
        return len(forgotten)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Peers vanishing is routine here (faults, stop, client timeouts): stay silent."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "Metadata Server for VM"
    sys_version = ""
    disable_nagle_algorithm = True  # with one write per response: no 40 ms stall
    server: Server

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        if not self.server.sim.quiet:
            super().log_message(format, *args)

    def _dispatch(self) -> None:
        length = self.headers.get("Content-Length", "")
        body = self.rfile.read(int(length)) if length.isdigit() else b""
        path, _, query = self.path.partition("?")
        if self.server.sim._stopping.is_set():
            self._abort(rst=False)
        elif path.startswith(CONTROL):
            self._send(self._control(path.removeprefix(CONTROL), body))
        elif path == "/":
            self._send(Reply(200, b"computeMetadata/\n"))
        elif not path.startswith("/computeMetadata/"):
            self._send(Reply(404, b"Not Found"))
        elif self.command != "GET":
            self._send(Reply(405, b"Method Not Allowed", headers=(("Allow", "GET"),)))
        else:
            self._metadata(path, query)

    do_GET = do_PUT = do_POST = do_DELETE = _dispatch

    def _metadata(self, path: str, query: str) -> None:
        sim = self.server.sim
        freezes = sim._freezes_so_far()
        fault = sim._begin(path.removeprefix(V1))
        kind = fault.kind if fault else None
        if kind in ("drop", "reset"):
            self._abort(rst=kind == "reset")
            return
        if fault and kind == "delay":
            sim._stopping.wait(float(fault.params["seconds"]))
        if fault and kind == "status":
            reply = Reply(fault.params["status"], str(fault.params["body"]).encode())
        elif kind == "redirect":
            target = f"http://{sim.host_port}{path}?{query + '&' if query else ''}redirected=1"
            reply = Reply(302, headers=(("Location", target),))
        elif kind in ("malformed", "huge", "invalid_utf8"):
            body = {"malformed": b"{not json", "huge": b"x" * HUGE_SIZE}.get(kind, b"\xff\xfe\xfa")
            reply = Reply(200, body, JSON if kind == "malformed" else TEXT, etag_of(body))
        else:
            reply = self._answer(path, query)
        if sim._swallowed(freezes):  # a frozen server: the request was taken, never answered
            sim._stopping.wait()
        if sim._stopping.is_set():
            self._abort(rst=False)
            return
        if kind == "no_etag":
            reply = replace(reply, etag=None)
        self._send(reply, flavor=kind != "no_flavor")

    def _answer(self, path: str, query: str) -> Reply:
        """The real server's answer: header rules first, then the value or listing."""
        if "%" in path:
            return Reply(400, b"Percent-encoding is not supported in the path")
        if "X-Forwarded-For" in self.headers:
            return Reply(403, b"Request denied: X-Forwarded-For header present")
        if self.headers.get("Metadata-Flavor") != "Google":
            return Reply(403, MISSING_FLAVOR)
        sim = self.server.sim
        if path == "/computeMetadata/":
            return Reply(200, b"v1/\n")
        rel = path.removeprefix(V1)
        if path.startswith(V1) and sim.identity.handles(rel):
            return sim._identity_token(rel, query)
        if path + "/" == V1 or (path.startswith(V1) and rel and sim._is_dir(rel)):
            location = f"http://{sim.host_port}{path}/" + (f"?{query}" if query else "")
            return Reply(301, headers=(("Location", location),))
        if not path.startswith(V1):
            return Reply(404, b"Not Found")
        try:
            q = Query.parse(query)
        except ValueError as exc:
            return Reply(400, str(exc).encode())
        return sim._respond(rel, q)

    def _control(self, route: str, body: bytes) -> Reply:
        sim, method = self.server.sim, self.command
        try:
            if route.startswith("values/") and method in ("PUT", "DELETE", "GET"):
                key = route.removeprefix("values/")
                if method == "PUT":
                    sim.set_value(key, body.decode("utf-8"))
                elif method == "DELETE":
                    sim.delete_value(key)
                elif (value := sim.get_value(key)) is None:
                    return Reply(404, b"Not Found")
                else:
                    return Reply(200, value.encode())
                return Reply(204)
            if route == "faults" and method == "POST":
                sim.inject(**json.loads(body or b"{}"))
                return Reply(204)
            if route == "faults" and method == "DELETE":
                sim.clear_faults()
                return Reply(204)
            if route == "forget" and method == "POST":
                return Reply(200, json.dumps({"forgotten": sim.forget()}).encode(), JSON)
            if route == "freeze" and method in ("POST", "DELETE"):
                sim.freeze() if method == "POST" else sim.thaw()
                return Reply(204)
            if route == "settings" and method == "POST":
                sim.configure(**json.loads(body or b"{}"))
                return Reply(204)
            if route == "stats" and method == "GET":
                return Reply(200, json.dumps(sim.stats()).encode(), JSON)
            if route == "identity/certs" and method == "GET":
                return sim.identity.certs_reply()
            if route == "identity" and method == "POST":
                sim.identity.configure(**json.loads(body or b"{}"))
                return Reply(204)
            if route == "scenario" and method == "POST":
                spec = json.loads(body or b"{}")
                if "steps" in spec:
                    steps = parse_steps(spec["steps"])
                elif spec.get("name") in SCENARIOS:
                    steps = SCENARIOS[spec["name"]]
                else:
                    raise ValueError(f"give 'steps' or a 'name' in {sorted(SCENARIOS)}")
                sim._play_background(steps, float(spec.get("speed", 1.0)))
                return Reply(202)
        except (ValueError, TypeError, AttributeError) as exc:
            return Reply(400, str(exc).encode())
        return Reply(404, b"Not Found")

    def _send(self, reply: Reply, flavor: bool = True) -> None:
        """Write the whole response in one send: a split write can stall on delayed ACKs."""
        lines = [f"HTTP/1.1 {reply.status} {HTTPStatus(reply.status).phrase}"]
        if flavor:
            lines.append("Metadata-Flavor: Google")
        lines += [f"Content-Type: {reply.ctype}", f"Date: {self.date_time_string()}"]
        lines.append(f"Server: {self.server_version}")
        if reply.status != 204:
            lines.append(f"Content-Length: {len(reply.body)}")
        if reply.etag:
            lines.append(f"ETag: {reply.etag}")
        lines += [f"{name}: {value}" for name, value in reply.headers]
        if self.close_connection:
            lines.append("Connection: close")
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + reply.body)
        self.wfile.flush()

    def _abort(self, rst: bool) -> None:
        """Close without answering; ``rst`` makes it a TCP reset instead of a FIN."""
        self.close_connection = True
        if rst:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        self.rfile.close()  # the socket only really closes once its file is closed too
        self.connection.close()
