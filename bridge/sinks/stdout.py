"""The stdout sink: one structured-mode CloudEvent per line (JSON lines); logs go to stderr."""

from __future__ import annotations

import sys
from concurrent.futures import Future
from typing import IO

from bridge.events import Event
from bridge.sinks import NoOptions, SinkType, register


class StdoutSink:
    """Written and flushed at once: the future is already resolved when `send` returns."""

    name = "stdout"

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stdout

    def send(self, event: Event) -> Future[str]:
        future: Future[str] = Future()
        try:
            raw = getattr(self.stream, "buffer", None)  # the bytes as stored, not re-encoded
            if raw is not None:
                self.stream.flush()  # nothing written as text may come after the event
                raw.write(event.structured + b"\n")
                raw.flush()
            else:
                self.stream.write(event.structured.decode() + "\n")
                self.stream.flush()
        except (OSError, ValueError) as exc:  # closed or broken pipe: keep it in the outbox
            future.set_exception(exc)
        else:
            future.set_result(event.id)
        return future

    def recover(self, event: Event) -> None:
        return None

    def close(self) -> None:
        return None


def _make(options: NoOptions) -> StdoutSink:
    return StdoutSink()


register(SinkType(name=StdoutSink.name, factory=_make))
