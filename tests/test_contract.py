"""The event contract, enforced: every event the bridge emits against every schema we publish.

Events come from two places: the golden examples (one per kind, built by
`schemas/examples/generate.py` with the bridge's own code) and a real run of the daemon against
the simulator (every kind, a restart with a change while down). Each is checked in both content
modes against the official CloudEvents 1.0.2 JSON Schema, our strict producer schema and the
published consumer schema, Google's Pub/Sub binding, the official `cloudevents` SDK and the
Protocol Buffers topic schema. (The Avro topic schema: tests/test_avro_schema.py.)
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import fields
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
from cloudevents.conversion import to_dict
from cloudevents.http import from_json
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from bridge import daemon
from bridge.cloud_kinds import CLOUD_KINDS
from bridge.config import Config
from bridge.events import (
    DATASCHEMA,
    STRUCTURED_CONTENT_TYPE,
    CloudRecord,
    DecodeError,
    Event,
    EventData,
    Instance,
    Scheduling,
    Transition,
    Upcoming,
    build_event,
    decode_pubsub,
    decode_structured,
    dumps,
)
from bridge.keys import KINDS, MAINTENANCE, PREEMPTED, UPCOMING
from bridge.simulator import Simulator, sample_window
from bridge.store import Store
from bridge.transitions import canonical

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT / "schemas"
DATA_SCHEMA = SCHEMAS / "v1" / "event-data.schema.json"  # published, for consumers
PRODUCER_SCHEMA = SCHEMAS / "v1" / "event-data.producer.schema.json"  # exact, for our tests
PROTO = SCHEMAS / "v1" / "event-data.proto"
EXAMPLES = SCHEMAS / "examples"
DOCS = ROOT / "docs" / "events.md"
CE_SCHEMA = ROOT / "tests" / "data" / "cloudevents-v1.0.2.schema.json"  # see its README

ATTRIBUTE_NAME = re.compile(r"[a-z0-9]{1,20}")
RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})")
HEARTBEAT_INTERVAL = 0.4
# Not required by the consumer schema: absent when unknown, or added within v1.
ADDED_IN_V1 = ("at_startup", "stream_id")
# origin and cloud: on the cloud's events only (bridge/system_events.py), never a bridge's.
OPTIONAL_FIELDS = ("notice_seconds", "upcoming", "can_reschedule", "origin", "cloud", *ADDED_IN_V1)


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("golden_generate", EXAMPLES / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


generate = _load_generator()


# -- a real run: the daemon against the simulator -----------------------------------------------


class Collector:
    """A sink that keeps every event and acknowledges it at once."""

    name = "collector"

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._cond = threading.Condition()

    def send(self, event: Event) -> Future[str]:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()
        future: Future[str] = Future()
        future.set_result(event.id)
        return future

    def recover(self, event: Event) -> None:
        return None

    def close(self) -> None:
        return None

    def wait(self, kind: str, after: int, timeout: float = 5.0) -> int:
        """Index of the first `kind` event at or after index `after`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for index in range(after, len(self.events)):
                    if self.events[index].kind == kind:
                        return index
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [e.kind for e in self.events[after:]]
                    raise AssertionError(f"no {kind} within {timeout} s; got {seen}")
                self._cond.wait(left)


@contextmanager
def _running(sim: Simulator, state: Path, sink: Collector) -> Iterator[None]:
    config = Config(
        metadata_url=sim.url,
        state_dir=state,
        absent_interval=0.2,
        heartbeat_interval=HEARTBEAT_INTERVAL,
        drain_timeout=2.0,
        log_level="WARNING",
    )
    stop = threading.Event()
    result: list[int] = []
    thread = threading.Thread(
        target=lambda: result.append(daemon.run(config, stop, sink=sink)), daemon=True
    )
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive() and result == [0], result


def _watching(sim: Simulator) -> None:
    """Wait until every watcher has read its key (the long-polls hang from then on)."""
    deadline = time.monotonic() + 10
    wanted = {MAINTENANCE: 2, PREEMPTED: 2, UPCOMING: 1}
    while time.monotonic() < deadline:
        stats = sim.stats()
        if all(stats.get(k, 0) >= n for k, n in wanted.items()):
            return
        time.sleep(0.02)
    raise AssertionError(f"the bridge never watched every key: {sim.stats()}")


WINDOW = sample_window(15)
MOVED = sample_window(20)  # rescheduled
STEPS: tuple[tuple[str, str | None, str], ...] = (
    (MAINTENANCE, "MIGRATE_ON_HOST_MAINTENANCE", "maintenance.started"),
    (MAINTENANCE, "TERMINATE_ON_HOST_MAINTENANCE", "maintenance.changed"),
    (MAINTENANCE, "NONE", "maintenance.ended"),
    (PREEMPTED, "TRUE", "preemption.started"),
    (PREEMPTED, "UNKNOWN", "preemption.changed"),
    (PREEMPTED, "FALSE", "preemption.ended"),
    (UPCOMING, WINDOW, "upcoming.scheduled"),
    (UPCOMING, MOVED, "upcoming.updated"),
    (UPCOMING, None, "upcoming.cleared"),
)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> list[Event]:
    """Every kind from a running bridge, then a change while it is down and a restart."""
    state = tmp_path_factory.mktemp("state")
    sink = Collector()
    with Simulator().start() as sim:
        with _running(sim, state, sink):
            _watching(sim)
            cursor = 0
            for key, value, kind in STEPS:
                if value is None:
                    sim.delete_value(key)
                else:
                    sim.set_value(key, value)
                cursor = sink.wait(kind, cursor) + 1
            sink.wait("bridge.heartbeat", 0, timeout=HEARTBEAT_INTERVAL * 5)
        stopped = len(sink.events)
        sim.set_value(MAINTENANCE, "MIGRATE_ON_HOST_MAINTENANCE")
        with _running(sim, state, sink):
            sink.wait("maintenance.started", stopped)
    return list(sink.events)


def test_a_new_state_dir_is_a_new_stream(tmp_path: Path, scenario: list[Event]) -> None:
    """A recreated VM (same name, empty state dir) starts a stream of its own at sequence 1:
    a consumer keeping the highest sequence per source alone would drop its events."""
    sink = Collector()
    with Simulator().start() as sim:
        sim.set_value(MAINTENANCE, "MIGRATE_ON_HOST_MAINTENANCE")
        with _running(sim, tmp_path, sink):  # an empty state dir
            sink.wait("maintenance.started", 0)
    first = sink.events[0]
    assert first.source == scenario[0].source
    assert first.data.sequence == 1 and first.data.at_startup
    assert first.data.stream_id != scenario[0].data.stream_id
    assert uuid.UUID(first.data.stream_id).version == 4


def test_the_store_keeps_its_stream_and_adopts_older_outbox_events(tmp_path: Path) -> None:
    """The stream id is made with the store and survives a reopen; an event recorded by a
    bridge older than stream_id, still in the outbox at the upgrade, goes out in the store's
    stream (a topic schema requiring the field would refuse it otherwise)."""
    old = generate.events()["maintenance.started"].to_structured()
    del old["data"]["stream_id"]
    store = Store(tmp_path / "bridge.sqlite3")
    try:
        first = store.load().stream_id
        store._db.execute(
            "INSERT INTO outbox(seq, id, kind, body, recorded_at) VALUES (4, ?, ?, ?, 0)",
            (old["id"], "maintenance.started", dumps(old)),
        )
    finally:
        store.close()
    store = Store(tmp_path / "bridge.sqlite3")
    try:
        snapshot = store.load()
    finally:
        store.close()
    assert snapshot.stream_id == first and uuid.UUID(first).version == 4
    ((seq, pending, _),) = snapshot.pending
    assert seq == 4 and pending.data.stream_id == first and pending.id == old["id"]


@pytest.fixture(scope="module")
def goldens() -> dict[str, Event]:
    return generate.events()


@pytest.fixture(scope="module")
def emitted(goldens: dict[str, Event], scenario: list[Event]) -> list[Event]:
    return [*goldens.values(), *scenario]


def test_scenario_emits_every_kind_in_order(scenario: list[Event]) -> None:
    assert {e.kind for e in scenario} == set(KINDS)
    transitions = [e.kind for e in scenario if e.kind != "bridge.heartbeat"]
    assert transitions == [kind for _, _, kind in STEPS] + ["maintenance.started"]
    # numbering continues across the restart: the store kept it
    assert [e.data.sequence for e in scenario] == list(range(1, len(scenario) + 1))
    assert len({e.id for e in scenario}) == len(scenario)
    assert len({e.source for e in scenario}) == 1
    # one stream across the restart: the same state dir keeps its id
    (stream,) = {e.data.stream_id for e in scenario}
    assert uuid.UUID(stream).version == 4
    down = [e for e in scenario if e.data.happened_while_down]
    assert [e.kind for e in down] == ["maintenance.started"]  # the change made while stopped
    assert [e for e in scenario if e.data.at_startup] == down  # seen on the restart's first read
    for event in scenario:
        assert event.time == event.data.observed_at
        assert event.subject == event.data.key
        assert event.extensions["instanceid"] == event.data.instance.id


def test_scenario_fields_follow_the_metadata(scenario: list[Event]) -> None:
    by_kind = {e.kind: e for e in scenario}
    assert by_kind["maintenance.started"].data.notice_seconds == 60
    assert by_kind["maintenance.changed"].data.notice_seconds == 3600
    assert by_kind["preemption.started"].data.notice_seconds == 30
    for kind in ("maintenance.ended", "preemption.changed", "preemption.ended", "upcoming.updated"):
        assert by_kind[kind].data.notice_seconds is None, kind
    windows = {k: by_kind[k].data.upcoming for k in KINDS if k.startswith("upcoming.")}
    assert windows["upcoming.scheduled"] is not None
    assert windows["upcoming.scheduled"].window_start_time == "2030-01-15T02:00:00Z"
    assert windows["upcoming.scheduled"].can_reschedule is True
    assert windows["upcoming.updated"] is not None
    assert windows["upcoming.updated"].window_start_time == "2030-01-20T02:00:00Z"
    assert windows["upcoming.cleared"] == windows["upcoming.updated"]
    assert by_kind["upcoming.cleared"].data.current == ""
    beat = by_kind["bridge.heartbeat"].data
    assert (beat.key, beat.previous, beat.current, beat.upcoming) == (
        "bridge/heartbeat",
        "",
        "",
        None,
    )


def test_window_without_reasons_has_no_reasons() -> None:
    """The simulator's window gives no maintenance_reasons: the event says [] (was ["()"])."""
    instance = Instance("1", "vm", "us-central1-a", "p", "2")
    transition = Transition(
        UPCOMING, "", canonical(UPCOMING, json.loads(WINDOW)), "upcoming.scheduled"
    )
    event = build_event(
        transition,
        event_id="x",
        sequence=1,
        observed_at=datetime(2030, 1, 1, tzinfo=timezone.utc),
        instance=instance,
        scheduling=Scheduling(),
        happened_while_down=False,
        notice_seconds=None,
    )
    assert event.data.upcoming is not None
    assert event.data.upcoming.maintenance_reasons == ()


# -- golden files and docs ---------------------------------------------------------------------


def test_golden_files_match_the_code() -> None:
    """Regenerated in memory, every golden file is identical; none missing, none extra."""
    files = generate.render()
    on_disk = {p.name for p in EXAMPLES.glob("*.json")}
    assert on_disk == set(files), "run: python schemas/examples/generate.py"
    for name, text in files.items():
        assert (EXAMPLES / name).read_text(encoding="utf-8") == text, (
            f"{name} is stale; run: python schemas/examples/generate.py"
        )
    envelopes = {f"envelope.{path}.json" for path in ("pull", "push", "eventarc")}
    assert (
        set(files)
        == {f"{k}.json" for k in KINDS}
        | {f"{k}.pubsub.json" for k in KINDS}
        | envelopes
        # the cloud's kinds: the event, its message, and the LogEntry it was made of
        | {f"{k}.json" for k in CLOUD_KINDS}
        | {f"{k}.pubsub.json" for k in CLOUD_KINDS}
        | {f"logentry.{k}.json" for k in CLOUD_KINDS}
    )


def test_golden_pubsub_form_is_the_wire_message(goldens: dict[str, Event]) -> None:
    for kind, event in goldens.items():
        form = json.loads((EXAMPLES / f"{kind}.pubsub.json").read_text(encoding="utf-8"))
        assert set(form) == {"attributes", "data"}
        assert (form["attributes"], dumps(form["data"])) == event.to_pubsub("binary"), kind
        structured = json.loads((EXAMPLES / f"{kind}.json").read_text(encoding="utf-8"))
        assert structured == event.to_structured() and structured["type"].endswith(kind)


def _doc_examples() -> dict[str, str]:
    text = DOCS.read_text(encoding="utf-8")
    found = re.findall(r"<!-- example: ([^ ]+) -->", text)
    blocks = {m["name"]: m["body"] for m in generate.EXAMPLE_BLOCK.finditer(text)}
    assert len(found) == len(blocks) == len(set(found)), "every marker needs one ```json block"
    return blocks


def test_docs_examples_are_the_golden_files() -> None:
    blocks = _doc_examples()
    assert set(KINDS) <= set(blocks), f"missing examples: {set(KINDS) - set(blocks)}"
    for name, body in blocks.items():
        golden = (EXAMPLES / f"{name}.json").read_text(encoding="utf-8")
        assert body == golden, f"docs/events.md example {name} differs from the golden file"


def test_docs_catalogue_covers_every_type_field_and_filter_attribute(
    goldens: dict[str, Event],
) -> None:
    text = DOCS.read_text(encoding="utf-8")
    for kind, event in goldens.items():
        assert f"### `{kind}`" in text and f"`{event.type}`" in text, kind
    schema = json.loads(DATA_SCHEMA.read_text(encoding="utf-8"))
    for path in _schema_paths(schema):
        assert f"| `{path}` |" in text, f"field {path} is not in the docs' fields table"
    attributes = set(goldens["maintenance.started"].to_pubsub("binary")[0])
    for name in set(re.findall(r"attributes\.([a-z-]+)", text)):
        assert name in attributes, f"the docs filter on {name}, which the bridge does not set"
    assert {"ce-type", "ce-zone", "ce-instanceid"} <= attributes


def _schema_paths(schema: dict[str, Any]) -> list[str]:
    paths = []
    for name, spec in schema["properties"].items():
        paths.append(name)
        ref = spec.get("$ref", "")
        if ref.startswith("#/$defs/") and "properties" in schema["$defs"][ref[8:]]:
            paths += [f"{name}.{sub}" for sub in schema["$defs"][ref[8:]]["properties"]]
    return paths


# -- JSON Schemas ------------------------------------------------------------------------------


def _validator(path: Path) -> jsonschema.Draft202012Validator:
    schema = json.loads(path.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


@pytest.fixture(scope="module")
def data_validator() -> jsonschema.Draft202012Validator:
    """The strict producer schema: exactly what this release emits."""
    return _validator(PRODUCER_SCHEMA)


@pytest.fixture(scope="module")
def consumer_validator() -> jsonschema.Draft202012Validator:
    """The published schema (the `dataschema`), which accepts what later v1 releases add."""
    return _validator(DATA_SCHEMA)


@pytest.fixture(scope="module")
def ce_validator() -> jsonschema.Draft7Validator:
    schema = json.loads(CE_SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema, format_checker=jsonschema.FormatChecker())


def test_data_schema_id_is_the_dataschema(consumer_validator: jsonschema.Validator) -> None:
    assert consumer_validator.schema["$id"] == DATASCHEMA
    assert consumer_validator.schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_producer_schema_is_generated_from_the_consumer_schema(
    data_validator: jsonschema.Validator, consumer_validator: jsonschema.Validator
) -> None:
    assert data_validator.schema == generate.producer_schema(consumer_validator.schema), (
        "run: python schemas/examples/generate.py"
    )
    assert data_validator.schema["$id"] != DATASCHEMA  # never mistaken for the published one


def test_data_schemas_match_the_model(
    data_validator: jsonschema.Validator, consumer_validator: jsonschema.Validator
) -> None:
    """Property names mirror the dataclasses the decoder fills. The producer schema requires
    every field the bridge always writes; the consumer schema not those added within v1."""
    for validator, optional in (
        (consumer_validator, OPTIONAL_FIELDS),
        (data_validator, tuple(n for n in OPTIONAL_FIELDS if n not in ADDED_IN_V1)),
    ):
        schema = validator.schema
        models: dict[str, tuple[type, dict[str, Any]]] = {
            "EventData": (EventData, schema),
            "Instance": (Instance, schema["$defs"]["instance"]),
            "Scheduling": (Scheduling, schema["$defs"]["scheduling"]),
            "Upcoming": (Upcoming, schema["$defs"]["upcoming"]),
            "CloudRecord": (CloudRecord, schema["$defs"]["cloud"]),
        }
        for label, (model, spec) in models.items():
            names = [f.name for f in fields(model)]
            assert list(spec["properties"]) == names, label
            assert set(spec["required"]) == {n for n in names if n not in optional}, label


def _structured(event: Event) -> dict[str, Any]:
    attributes, payload = event.to_pubsub("structured")
    assert attributes == {"content-type": STRUCTURED_CONTENT_TYPE}
    return json.loads(payload)


def _binary_as_structured(event: Event) -> dict[str, Any]:
    """A binary-mode message mapped back to a JSON CloudEvent, per Google's binding."""
    attributes, payload = event.to_pubsub("binary")
    out: dict[str, Any] = {
        k.removeprefix("ce-"): v for k, v in attributes.items() if k != "content-type"
    }
    out["datacontenttype"] = attributes["content-type"]
    out["data"] = json.loads(payload)
    return out


MODES: dict[str, Callable[[Event], dict[str, Any]]] = {
    "structured": _structured,
    "binary": _binary_as_structured,
}


def test_official_cloudevents_schema_both_modes(
    emitted: list[Event], ce_validator: jsonschema.Validator
) -> None:
    for event in emitted:
        for mode, render in MODES.items():
            obj = render(event)
            errors = [e.message for e in ce_validator.iter_errors(obj)]
            assert not errors, (event.kind, mode, errors)
            assert obj == event.to_structured(), (event.kind, mode)  # the binding is lossless


def test_data_schemas_both_modes(
    emitted: list[Event],
    data_validator: jsonschema.Validator,
    consumer_validator: jsonschema.Validator,
) -> None:
    for event in emitted:
        for mode, render in MODES.items():
            obj = render(event)
            for validator in (data_validator, consumer_validator):
                errors = [e.message for e in validator.iter_errors(obj["data"])]
                assert not errors, (event.kind, mode, validator.schema["title"], errors)
            assert obj["dataschema"] == consumer_validator.schema["$id"]


def test_attributes_the_schemas_do_not_check(emitted: list[Event]) -> None:
    """What the official schema leaves open (it pins no specversion, checks no names) and
    the formats jsonschema checks only with optional packages."""
    for event in emitted:
        obj = event.to_structured()
        assert obj["specversion"] == "1.0"
        for name, value in obj.items():
            assert ATTRIBUTE_NAME.fullmatch(name) or name == "data", name
            if name != "data":
                assert isinstance(value, str) and value, (name, value)
        assert RFC3339.fullmatch(obj["time"]) and obj["time"].endswith("Z"), obj["time"]
        datetime.fromisoformat(obj["time"].replace("Z", "+00:00"))
        dataschema = urlsplit(obj["dataschema"])
        assert dataschema.scheme == "https" and dataschema.netloc
        source = urlsplit(obj["source"])  # a URI-reference: network-path, no scheme
        assert source.netloc == "compute.googleapis.com" and " " not in obj["source"]
        assert obj["type"].startswith("io.github.maintenancebridge.gce.v1.")
        assert obj["type"].removeprefix("io.github.maintenancebridge.gce.v1.") in KINDS
        assert len(dumps(obj)) < 64 * 1024  # what every CloudEvents intermediary must forward


def test_binary_mode_follows_googles_pubsub_binding(emitted: list[Event]) -> None:
    for event in emitted:
        attributes, payload = event.to_pubsub("binary")
        assert attributes["content-type"] == "application/json"
        assert "Content-Type" not in attributes and "ce-datacontenttype" not in attributes
        for key in ("ce-specversion", "ce-id", "ce-source", "ce-type", "ce-time"):
            assert key in attributes, key
        for key, value in attributes.items():
            assert key == "content-type" or (
                key.startswith("ce-") and ATTRIBUTE_NAME.fullmatch(key[3:])
            ), key
            assert len(key.encode()) <= 256 and len(value.encode()) <= 1024, key
        assert len(attributes) <= 100
        assert payload == dumps(event.data.to_json())
        assert payload.decode("utf-8")  # UTF-8, compact
        assert b"\n" not in payload and b": " not in payload


def test_structured_mode_payload_is_the_stdout_line(emitted: list[Event]) -> None:
    for event in emitted:
        attributes, payload = event.to_pubsub("structured")
        assert attributes["content-type"].startswith("application/cloudevents")
        assert payload == dumps(event.to_structured())


def test_cloudevents_sdk_reads_structured_events_losslessly(emitted: list[Event]) -> None:
    for event in emitted:
        _, payload = event.to_pubsub("structured")
        sdk_event = from_json(payload)
        assert sdk_event.get_attributes() == event.attributes()
        assert sdk_event.get_data() == event.data.to_json()
        as_dict = to_dict(sdk_event)
        assert as_dict == json.loads(payload)
        assert decode_structured(as_dict) == event


def test_events_of_an_older_bridge_still_validate_and_decode(
    goldens: dict[str, Event], consumer_validator: jsonschema.Validator, proto: ModuleType
) -> None:
    """at_startup and stream_id were added within v1: an event without them (an older bridge)
    is valid for consumers and decodes (false, ""); it round-trips unchanged."""
    old = goldens["maintenance.started"].to_structured()
    del old["data"]["at_startup"], old["data"]["stream_id"]
    assert consumer_validator.is_valid(old["data"])
    message = _parse(proto, json.dumps(old["data"]))
    assert (message.at_startup, message.stream_id) == (False, "")
    decoded = decode_structured(old)
    assert (decoded.data.at_startup, decoded.data.stream_id) == (False, "")
    assert decoded.to_structured() == {**old, "data": {**old["data"], "at_startup": False}}
    with pytest.raises(DecodeError, match="at_startup"):
        decode_structured({**old, "data": {**old["data"], "at_startup": "yes"}})


def test_a_later_v1_event_validates_and_decodes(
    goldens: dict[str, Event],
    consumer_validator: jsonschema.Validator,
    data_validator: jsonschema.Validator,
) -> None:
    """Forward compatibility: unknown `data` fields (top level and nested), an unknown
    extension attribute and `sequence` as proto3 JSON writes an int64 (a string) pass the
    consumer schema and every decoder entry point; the producer schema alone refuses them."""
    golden = goldens["upcoming.updated"]
    data = golden.data.to_json()
    later = {
        **data,
        "sequence": str(data["sequence"]),
        "added_in_v1_9": {"anything": [1, 2]},
        "upcoming": {**data["upcoming"], "added_too": True},
    }
    assert consumer_validator.is_valid(later)
    assert not data_validator.is_valid(later)
    # A new key comes with a new event type, which consumers skip: its data still validates.
    new_key = {k: v for k, v in data.items() if k != "upcoming"}
    new_key["key"] = "instance/guest-attributes"
    assert consumer_validator.is_valid(new_key) and not data_validator.is_valid(new_key)
    attributes, _ = golden.to_pubsub("binary")
    attributes = {**attributes, "ce-region": "us-central1"}
    event = decode_pubsub(attributes, dumps(later))
    assert event.data == golden.data and event.extensions["region"] == "us-central1"
    structured = {**golden.to_structured(), "region": "us-central1", "data": later}
    assert decode_structured(structured) == event
    for sequence in ("0x2", "2.0", " 2", "", "0", "-2", None):
        assert not consumer_validator.is_valid({**later, "sequence": sequence}), sequence
    for sequence in ("0x2", "2.0", " 2", "", "0", 0, "-2", "9223372036854775808", 2.5, None):
        with pytest.raises(DecodeError, match=r"data\.sequence"):
            decode_pubsub(attributes, dumps({**later, "sequence": sequence}))


def test_data_schema_rejects_what_the_contract_forbids(
    goldens: dict[str, Event], data_validator: jsonschema.Validator
) -> None:
    def data(kind: str) -> dict[str, Any]:
        return goldens[kind].data.to_json()

    bad: dict[str, dict[str, Any]] = {
        "unknown field": {**data("maintenance.started"), "extra": 1},
        "unknown nested field": {
            **data("maintenance.started"),
            "instance": {**data("maintenance.started")["instance"], "extra": "x"},
        },
        "missing sequence": {k: v for k, v in data("maintenance.ended").items() if k != "sequence"},
        "missing stream_id": {
            k: v for k, v in data("maintenance.ended").items() if k != "stream_id"
        },
        "stream_id not a UUID": {**data("maintenance.ended"), "stream_id": "vm-1"},
        "sequence as text": {**data("maintenance.ended"), "sequence": "6"},
        "unknown key": {**data("maintenance.ended"), "key": "instance/other"},
        "upcoming on maintenance": {
            **data("maintenance.ended"),
            "upcoming": data("upcoming.updated")["upcoming"],
        },
        "upcoming event without window": {
            k: v for k, v in data("upcoming.updated").items() if k != "upcoming"
        },
        "notice on upcoming": {**data("upcoming.updated"), "notice_seconds": 60},
        "heartbeat with values": {**data("bridge.heartbeat"), "current": "NONE"},
        "heartbeat with notice": {**data("bridge.heartbeat"), "notice_seconds": 30},
        "time not UTC": {**data("maintenance.started"), "observed_at": "2030-01-20T03:00:01+01:00"},
        "reschedule as text": {
            **data("upcoming.updated"),
            "upcoming": {**data("upcoming.updated")["upcoming"], "can_reschedule": "true"},
        },
    }
    for case, payload in bad.items():
        assert not data_validator.is_valid(payload), case


# -- Protocol Buffers topic schema ---------------------------------------------------------


@pytest.fixture(scope="module")
def proto(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    """event-data.proto compiled as Pub/Sub would, imported from a temporary directory."""
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("proto")
    args = ["protoc", f"--proto_path={PROTO.parent}", f"--python_out={out}", PROTO.name]
    assert protoc.main(args) == 0, "protoc failed to compile schemas/v1/event-data.proto"
    spec = importlib.util.spec_from_file_location("event_data_pb2", out / "event_data_pb2.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parse(proto: ModuleType, payload: bytes | str) -> Any:
    text = payload.decode() if isinstance(payload, bytes) else payload
    return json_format.Parse(text, proto.EventData(), ignore_unknown_fields=False)


def test_proto_is_a_valid_pubsub_schema() -> None:
    text = PROTO.read_text(encoding="utf-8")
    code = re.sub(r"//.*", "", text)
    assert re.search(r'^syntax = "proto3";', code, re.MULTILINE)
    assert re.search(r"^package maintenancebridge\.v1;", code, re.MULTILINE)
    assert not re.search(r"^\s*import\b", code, re.MULTILINE), "Pub/Sub schemas cannot import"
    # Pub/Sub documents proto2 and proto3, not proto3 field presence: keep to what it documents.
    assert not re.search(r"^\s*optional\b", code, re.MULTILINE), "no proto3 optional"
    top_level = re.findall(r"^message (\w+)", code, re.MULTILINE)
    assert top_level == ["EventData"], "exactly one top-level message"


def test_proto_accepts_every_payload(emitted: list[Event], proto: ModuleType) -> None:
    for event in emitted:
        _, payload = event.to_pubsub("binary")
        message = _parse(proto, payload)
        data = event.data
        assert (message.key, message.sequence) == (data.key, data.sequence)
        assert message.stream_id == data.stream_id
        # Without field presence an absent field reads as its default (docs/events.md).
        assert message.notice_seconds == (data.notice_seconds or 0)
        assert message.at_startup == data.at_startup
        assert message.instance.project_id == data.instance.project_id
        assert message.HasField("upcoming") == (data.upcoming is not None)
        if data.upcoming is not None:
            assert message.upcoming.can_reschedule == bool(data.upcoming.can_reschedule)
            assert tuple(message.upcoming.maintenance_reasons) == data.upcoming.maintenance_reasons
        back = json_format.MessageToDict(message, preserving_proto_field_name=True)
        assert int(back["sequence"]) == data.sequence  # nothing was lost on the way in


def test_proto_rejects_unknown_and_mistyped_fields(
    goldens: dict[str, Event], proto: ModuleType
) -> None:
    upcoming = goldens["upcoming.updated"].data.to_json()
    started = goldens["maintenance.started"].data.to_json()
    bad = {
        "extra top-level field": {**started, "extra": 1},
        "extra nested field": {**upcoming, "upcoming": {**upcoming["upcoming"], "extra": "x"}},
        "sequence as text": {**started, "sequence": "six"},
        "flag as text": {**started, "happened_while_down": "yes"},
        "instance as text": {**started, "instance": "demo-vm"},
        "reasons as text": {
            **upcoming,
            "upcoming": {**upcoming["upcoming"], "maintenance_reasons": 1},
        },
        "structured envelope": goldens["maintenance.started"].to_structured(),
    }
    for case, payload in bad.items():
        with pytest.raises(json_format.ParseError):
            _parse(proto, json.dumps(payload))
        assert case


_PROTO_TYPES = {
    FieldDescriptor.TYPE_STRING: "string",
    FieldDescriptor.TYPE_BOOL: "boolean",
    FieldDescriptor.TYPE_INT32: "integer",
    FieldDescriptor.TYPE_INT64: "integer",
    FieldDescriptor.TYPE_MESSAGE: "object",
}


def _repeated(field: FieldDescriptor) -> bool:
    """`is_repeated` on protobuf >= 6, `label` before (and gone in 7)."""
    flag = getattr(field, "is_repeated", None)
    return bool(flag) if flag is not None else field.label == FieldDescriptor.LABEL_REPEATED


def test_proto_and_json_schema_describe_the_same_fields(
    proto: ModuleType, data_validator: jsonschema.Validator
) -> None:
    schema = data_validator.schema

    def compare(descriptor: Descriptor, spec: dict[str, Any], where: str) -> None:
        names = [f.name for f in descriptor.fields]
        assert names == list(spec["properties"]), where
        for field in descriptor.fields:
            prop = spec["properties"][field.name]
            if "$ref" in prop:
                prop = schema["$defs"][prop["$ref"].removeprefix("#/$defs/")]
            label = f"{where}.{field.name}"
            if _repeated(field):
                assert prop.get("type") == "array", label
                prop = prop["items"]
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                compare(field.message_type, prop, label)
            elif "enum" not in prop:
                assert prop.get("type") == _PROTO_TYPES[field.type], label
            if field.type != FieldDescriptor.TYPE_MESSAGE:  # messages always have presence
                assert not field.has_presence, label

    compare(proto.EventData.DESCRIPTOR, schema, "data")
