"""The stdout sink in-process: one event per line, the stored bytes exactly, failures kept.

The end-to-end tests run it in a subprocess (code mutation testing cannot see); these hold
its promises in the process: a consumer of the JSON lines reads each event as recorded
(UTF-8, whatever the stream's text encoding), on a line of its own, after anything written
before it; a closed or broken stdout fails the send (the event stays in the outbox).
"""

from __future__ import annotations

import io
import json
from dataclasses import replace
from datetime import datetime, timezone

import pytest
from support.harness import INSTANCE, SCHEDULING

from bridge.events import MAINTENANCE, build_event
from bridge.sinks.stdout import StdoutSink
from bridge.transitions import classify


def event(sequence: int = 1, name: str = "démo-vm"):
    transition = classify(MAINTENANCE, "NONE", "MIGRATE_ON_HOST_MAINTENANCE")
    assert transition is not None
    return build_event(
        transition,
        event_id=f"id-{sequence}",
        sequence=sequence,
        observed_at=datetime(2026, 12, 8, tzinfo=timezone.utc),
        instance=replace(INSTANCE, name=name),
        scheduling=SCHEDULING,
        happened_while_down=False,
        notice_seconds=60,
    )


def test_each_event_is_its_recorded_bytes_on_a_line_of_its_own_after_what_came_before():
    """A stdout whose text encoding is not UTF-8 (latin-1 here) gets the event's own UTF-8
    bytes, not a re-encoding; text written before the event (unflushed) comes before it."""
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="latin-1", write_through=False)
    sink = StdoutSink(stream)
    stream.write("before\n")
    first, second = event(1), event(2)
    assert sink.send(first).result(0) == "id-1"
    assert sink.send(second).result(0) == "id-2"
    assert raw.getvalue() == b"before\n" + first.structured + b"\n" + second.structured + b"\n"


def test_a_stream_without_bytes_gets_each_event_as_one_line_of_text():
    stream = io.StringIO()
    sink = StdoutSink(stream)
    events = [event(1), event(2)]
    assert [sink.send(e).result(0) for e in events] == ["id-1", "id-2"]
    lines = stream.getvalue().split("\n")
    assert lines[-1] == ""
    assert [json.loads(line)["id"] for line in lines[:-1]] == ["id-1", "id-2"]
    assert lines[0].encode() == events[0].structured


class BrokenPipe(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[override]
        raise BrokenPipeError(32, "Broken pipe")


@pytest.mark.parametrize("case", ["closed", "broken pipe", "closed text stream"])
def test_a_closed_or_broken_stdout_fails_the_send_with_its_error(case):
    """The relay keeps a failed event in the outbox and tries again: the future must carry
    the failure, not a result."""
    if case == "closed":
        stream = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
        stream.close()
    elif case == "broken pipe":
        stream = io.TextIOWrapper(io.BufferedWriter(BrokenPipe()), encoding="utf-8")
    else:
        stream = io.StringIO()
        stream.close()
    future = StdoutSink(stream).send(event())
    error = future.exception(0)
    assert isinstance(error, (OSError, ValueError)), error
