"""A CloudEvents HTTP receiver on loopback that stamps each event: the HTTP sink's far end.

Usage: receiver.py PORT. Reads binary-mode CloudEvents (the sink's default: `ce-*` headers, the
data as the body), answers 204 once the line is printed, keeps connections alive and writes
each response in one send with TCP_NODELAY, as a production receiver would. Prints one JSON
line per event, `{"instance", "seq", "current", "t"}`, `t` being `time.monotonic()` when the
request was read (comparable across processes on Linux), and `{"ready": true}` once listening.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_lock = threading.Lock()


def emit(record: dict[str, object]) -> None:
    with _lock:
        sys.stdout.write(json.dumps(record) + "\n")
        sys.stdout.flush()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the sink's session expects
    disable_nagle_algorithm = True

    def log_message(self, *args: object) -> None:  # stdout carries the stamps only
        return None

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        t = time.monotonic()
        try:
            data = json.loads(body)
            emit(
                {
                    "instance": self.headers.get("ce-instanceid", ""),
                    "seq": data["sequence"],
                    "current": data["current"],
                    "t": t,
                }
            )
        except (ValueError, KeyError, TypeError) as exc:
            emit({"error": str(exc), "t": t})
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    emit({"ready": True})
    server.serve_forever()


if __name__ == "__main__":
    main()
