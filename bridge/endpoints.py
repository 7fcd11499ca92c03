"""The optional HTTP endpoint: /healthz, /readyz, /metrics (Prometheus text format) and
/status (what `maintenance-bridge status` asks a running daemon, so it never opens the store)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

from prometheus_client import CONTENT_TYPE_LATEST

from bridge.health import Health
from bridge.metrics import Metrics


def serve(
    host: str,
    port: int,
    health: Health,
    metrics: Metrics,
    status: Callable[[], dict[str, Any]] | None = None,
) -> ThreadingHTTPServer:
    """Start serving in a daemon thread; the caller shuts the server down."""

    class Handler(BaseHTTPRequestHandler):
        routes: ClassVar[dict[str, Callable[[], tuple[int, str, bytes]]]] = {
            "/healthz": lambda: _verdict(health.problems()),
            "/readyz": lambda: _verdict(health.not_ready()),
            "/metrics": lambda: (200, CONTENT_TYPE_LATEST, metrics.render()),
        }
        if status is not None:
            routes["/status"] = lambda: (
                200,
                "application/json",
                json.dumps(status()).encode(),
            )

        def do_GET(self) -> None:
            route = self.routes.get(self.path.split("?", 1)[0])
            status, ctype, body = route() if route else (404, "text/plain", b"not found\n")
            head = (
                f"HTTP/1.0 {status} {'OK' if status == 200 else 'Error'}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
            self.wfile.write(head + body)  # one write: no Nagle stall between head and body

        def log_message(self, format: str, *args: object) -> None:
            return None

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server


def _verdict(problems: list[str]) -> tuple[int, str, bytes]:
    if problems:
        return 503, "text/plain", ("\n".join(problems) + "\n").encode()
    return 200, "text/plain", b"ok\n"
