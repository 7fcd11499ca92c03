"""The bridge as `maintenance-bridge run` runs it, plus a stamp for each acknowledged publish.

`bridge.daemon.run` with the sink the flags select (Pub/Sub here), wrapped so that the moment
each send's future resolves (Pub/Sub: the server acknowledged the publish) is printed as a JSON
line `{"seq", "current", "ack"}` on stdout, `ack` being `time.monotonic()` (CLOCK_MONOTONIC,
comparable across processes on Linux), and `{"connected"}` once the sink is (the Pub/Sub client
is created in the background after the watch is armed). Takes every `maintenance-bridge run`
flag, plus:

--trace   also stamp the stages of the hot path (metadata response received, store commit
          start/end, relay enqueue, sink send) by wrapping those functions: for the
          breakdown only, as the wrappers cost a few microseconds each.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bridge import metadata, relay, store
from bridge.config import add_run_options, build
from bridge.daemon import run
from bridge.events import Event
from bridge.logs import configure
from bridge.signals import install_signal_handlers
from bridge.sinks import Sink, make_sink

_out_lock = threading.Lock()
_stages: dict[int, dict[str, float]] = {}
_received: dict[str, float] = {}


def emit(record: dict[str, Any]) -> None:
    line = json.dumps(record) + "\n"
    with _out_lock:
        sys.stdout.write(line)
        sys.stdout.flush()


class StampingSink:
    """Delegates to the real sink; stamps each acknowledgement as it happens."""

    def __init__(self, inner: Sink, trace: bool) -> None:
        self.inner = inner
        self.name = inner.name
        self.trace = trace

    def send(self, event: Event) -> Any:
        sent = time.monotonic()
        future = self.inner.send(event)
        seq, current = event.data.sequence, event.data.current

        def done(f: Any) -> None:
            ack = time.monotonic()
            if f.exception() is None:
                record: dict[str, Any] = {"seq": seq, "current": current, "ack": ack}
                if self.trace:
                    record.update(_stages.pop(seq, {}), send=sent)
                emit(record)

        future.add_done_callback(done)
        return future

    def recover(self, event: Event) -> None:
        self.inner.recover(event)

    def start_connecting(self) -> None:  # the Pub/Sub sink connects in the background
        getattr(self.inner, "start_connecting", lambda: None)()

    def connect(self) -> None:
        getattr(self.inner, "connect", lambda: None)()
        emit({"connected": time.monotonic()})  # the bench measures the steady state after it

    def close(self) -> None:
        self.inner.close()


def install_trace() -> None:
    """Wrap the hot path's functions to stamp each stage (monotonic seconds)."""
    original_reading = metadata._reading
    original_record = store.Store.record
    original_enqueue = relay.Relay.enqueue

    def reading(path: str, response: Any, received: float, alt: str) -> Any:
        _received[threading.current_thread().name] = received
        return original_reading(path, response, received, alt)

    def record(self: store.Store, event: Event | None, state: Any = None) -> list[int]:
        begin = time.monotonic()
        dropped = original_record(self, event, state)
        if event is not None:
            _stages[event.data.sequence] = {
                "received": _received.get(threading.current_thread().name, begin),
                "commit_begin": begin,
                "commit_end": time.monotonic(),
            }
        return dropped

    def enqueue(
        self: relay.Relay, seq: int, event: Event, seen: Any, dropped: list[int], **kw: Any
    ) -> Any:
        _stages.setdefault(seq, {})["enqueue"] = time.monotonic()
        return original_enqueue(self, seq, event, seen, dropped, **kw)

    metadata._reading = reading  # type: ignore[assignment]
    store.Store.record = record  # type: ignore[method-assign]
    relay.Relay.enqueue = enqueue  # type: ignore[method-assign]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_options(parser)
    parser.add_argument("--trace", action="store_true")
    args = parser.parse_args()
    config = build(args, dict(os.environ))
    configure(config.log_format, config.log_level)
    logging.getLogger("bridge").setLevel(config.log_level)
    if args.trace:
        install_trace()
    stop = threading.Event()
    install_signal_handlers(stop)
    return run(config, stop, sink=StampingSink(make_sink(config), args.trace))


if __name__ == "__main__":
    raise SystemExit(main())
