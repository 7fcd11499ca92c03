"""The Avro topic schema, proven by Google's own validator: the official Pub/Sub emulator.

The emulator enforces AVRO topic schemas with JSON encoding (it answers "not implemented" for
Protocol Buffers ones), so this is where a payload meets the same check Pub/Sub makes at publish
time. Every golden payload and every event of a real bridge run (every kind, published by the
bridge itself) goes through a schema-enforcing topic; malformed payloads are refused.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import hcl2
import pytest
from google.api_core import exceptions as gexc
from google.pubsub_v1 import PublisherClient, SchemaServiceClient
from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport
from google.pubsub_v1.services.schema_service.transports import SchemaServiceGrpcTransport
from hcl2.utils import SerializationOptions
from support.bridge import BridgeProcess
from support.pubsub import PubSubAdmin, PubSubServer, admin

from bridge.events import (
    KINDS,
    MAINTENANCE,
    PREEMPTED,
    UPCOMING,
    Event,
    decode_pubsub,
    dumps,
)
from bridge.simulator import Simulator, sample_window

ROOT = Path(__file__).resolve().parents[1]
AVRO = ROOT / "schemas" / "v1" / "event-data.avsc"
CONSUMER_SCHEMA = ROOT / "schemas" / "v1" / "event-data.schema.json"
EXAMPLES = ROOT / "schemas" / "examples"
TERRAFORM = ROOT / "terraform"
JSON_TO_AVRO = {"string": "string", "boolean": "boolean", "integer": "long"}


def _avro() -> dict[str, Any]:
    return json.loads(AVRO.read_text(encoding="utf-8"))


def _goldens() -> dict[str, tuple[dict[str, str], bytes]]:
    out = {}
    for kind in KINDS:
        form = json.loads((EXAMPLES / f"{kind}.pubsub.json").read_text(encoding="utf-8"))
        out[kind] = (form["attributes"], dumps(form["data"]))
    return out


def test_avro_schema_checks_exactly_the_fields_every_event_carries() -> None:
    """Its fields are the consumer schema's required ones plus stream_id, same names, types
    and nesting, none nullable and none with a default (Pub/Sub's Avro JSON refuses an absent
    field anyway): what a later v1 may add, or an older bridge omit, is left to pass through."""
    consumer = json.loads(CONSUMER_SCHEMA.read_text(encoding="utf-8"))

    def compare(record: dict[str, Any], spec: dict[str, Any], required: list[str], at: str) -> None:
        assert record["type"] == "record", at
        assert sorted(f["name"] for f in record["fields"]) == sorted(required), at
        for field in record["fields"]:
            prop = spec["properties"][field["name"]]
            if "$ref" in prop:
                prop = consumer["$defs"][prop["$ref"].removeprefix("#/$defs/")]
            label = f"{at}.{field['name']}"
            assert "default" not in field and not isinstance(field["type"], list), label
            if isinstance(field["type"], dict):
                assert prop["type"] == "object", label
                compare(field["type"], prop, prop["required"], label)
            else:
                json_type = prop.get("type", "string")  # `key` is an enum of strings
                json_type = "integer" if "integer" in json_type else json_type
                assert field["type"] == JSON_TO_AVRO[json_type], label

    compare(_avro(), consumer, [*consumer["required"], "stream_id"], "data")


def _hcl(path: Path) -> dict[str, Any]:
    options = SerializationOptions(strip_string_quotes=True, explicit_blocks=False)
    with path.open(encoding="utf-8") as f:
        return hcl2.load(f, serialization_options=options)


def test_terraform_attaches_the_proven_schema_by_default() -> None:
    """topic_schema_type: "avro" (proven below) unless "protobuf" is asked for."""
    variables = {
        k: v for block in _hcl(TERRAFORM / "variables.tf")["variable"] for k, v in block.items()
    }
    variable = variables["topic_schema_type"]
    assert variable["default"] == "avro"
    assert variable["validation"][0]["condition"] == (
        '${contains(["avro", "protobuf"], var.topic_schema_type)}'
    )
    (schema,) = [
        block["google_pubsub_schema"]["event_data"]
        for block in _hcl(TERRAFORM / "main.tf")["resource"]
        if "google_pubsub_schema" in block
    ]
    assert schema["type"] == '${var.topic_schema_type == "avro" ? "AVRO" : "PROTOCOL_BUFFER"}'
    assert 'var.topic_schema_type == "avro"' in schema["definition"].split("?")[0]
    files = re.findall(r'file\("\$\{path\.module\}/([^"]+)"\)', schema["definition"])
    assert files == ["../schemas/v1/event-data.avsc", "../schemas/v1/event-data.proto"]
    assert all((TERRAFORM / f).resolve().is_file() for f in files)
    assert "${var.topic_schema_type}" in schema["name"]  # switching makes a new schema


# -- on the official emulator ------------------------------------------------------------------


def _schema_client(server: PubSubServer) -> SchemaServiceClient:
    channel = grpc.insecure_channel(server.host_port)
    return SchemaServiceClient(transport=SchemaServiceGrpcTransport(channel=channel))


@pytest.fixture
def avro_topic(pubsub: PubSubServer) -> Iterator[tuple[PubSubAdmin, str, str]]:
    """(admin, topic, subscription): a topic enforcing event-data.avsc with JSON encoding,
    as terraform/main.tf attaches it with topic_schema_type = "avro"."""
    name = f"avro-{uuid.uuid4().hex[:8]}"  # ids need 3 characters or more
    schemas = _schema_client(pubsub)
    schema = schemas.create_schema(
        request={
            "parent": f"projects/{pubsub.project}",
            "schema_id": f"{name}-event-data-v1",
            "schema": {"type_": "AVRO", "definition": AVRO.read_text(encoding="utf-8")},
        },
        timeout=10,
    )
    with admin(pubsub) as api:
        topic = api.topic_path(name)
        api.publisher_api.create_topic(
            request={"name": topic, "schema_settings": {"schema": schema.name, "encoding": "JSON"}},
            timeout=10,
        )
        subscription = api.create_subscription(topic, f"{name}-sub")
        yield api, topic, subscription
    schemas.delete_schema(name=schema.name, timeout=10)


def _publish(api: PubSubAdmin, topic: str, attributes: dict[str, str], data: bytes) -> None:
    """One unbatched Publish call, so that a refusal is this message's own error."""
    channel = grpc.insecure_channel(api.server.host_port)
    with PublisherClient(transport=PublisherGrpcTransport(channel=channel)) as raw:
        raw.publish(
            topic=topic, messages=[{"data": data, "attributes": attributes}], timeout=10, retry=None
        )


def test_every_golden_passes_and_malformed_payloads_are_refused(
    avro_topic: tuple[PubSubAdmin, str, str],
) -> None:
    api, topic, subscription = avro_topic
    goldens = _goldens()
    for attributes, data in goldens.values():
        _publish(api, topic, attributes, data)
    got = api.pull_until(subscription, len(goldens))
    assert sorted(decode_pubsub(m.attributes, m.data).kind for m in got) == sorted(KINDS)

    attributes, data = goldens["maintenance.started"]
    good = json.loads(data)
    structured = json.loads((EXAMPLES / "maintenance.started.json").read_text(encoding="utf-8"))
    bad: dict[str, Any] = {
        "not JSON": b"MIGRATE_ON_HOST_MAINTENANCE",
        "no stream_id": {k: v for k, v in good.items() if k != "stream_id"},
        "no sequence": {k: v for k, v in good.items() if k != "sequence"},
        "sequence as words": {**good, "sequence": "four"},
        "flag as text": {**good, "happened_while_down": "false"},
        "instance without id": {
            **good,
            "instance": {k: v for k, v in good["instance"].items() if k != "id"},
        },
        "structured envelope": structured,  # structured mode cannot use a schema topic
    }
    for case, payload in bad.items():
        wire = payload if isinstance(payload, bytes) else dumps(payload)
        with pytest.raises(gexc.InvalidArgument, match="Could not parse message"):
            _publish(api, topic, attributes, wire)
        assert case
    # What the schema leaves open passes: an optional field absent, fields of a later v1.
    later = {k: v for k, v in good.items() if k != "notice_seconds"}
    _publish(api, topic, attributes, dumps({**later, "added_in_v1_9": {"x": [1]}}))
    assert len(api.pull_until(subscription, 1)) == 1


WINDOW = sample_window(15)
MOVED = sample_window(20)
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


def _watching(sim: Simulator) -> None:
    """Until every watcher has read its key: a value set earlier would be a startup event."""
    deadline = time.monotonic() + 15
    while not all(sim.stats().get(key, 0) >= 1 for key in (MAINTENANCE, PREEMPTED, UPCOMING)):
        assert time.monotonic() < deadline, f"the bridge never watched every key: {sim.stats()}"
        time.sleep(0.05)


def test_the_bridge_publishes_every_kind_through_the_avro_topic(
    avro_topic: tuple[PubSubAdmin, str, str], pubsub: PubSubServer, tmp_path: Path
) -> None:
    """A real bridge process, binary mode, heartbeats on: every kind is accepted, in order."""
    api, topic, subscription = avro_topic
    events: list[Event] = []

    def until(kind: str) -> None:
        deadline = time.monotonic() + 30  # heartbeats keep coming: pulling alone never ends
        while kind not in {e.kind for e in events}:
            assert time.monotonic() < deadline, f"no {kind} in 30 s: {[e.kind for e in events]}"
            got = api.pull_until(subscription, 1, timeout=15)
            events.extend(decode_pubsub(m.attributes, m.data) for m in got)

    state = tmp_path / "state"
    state.mkdir()
    with Simulator().start() as sim:
        bridge = BridgeProcess(
            sim.url, state, "--topic", topic, "--heartbeat-interval", "0.5",
            env=pubsub.env(),
        )  # fmt: skip
        try:
            _watching(sim)
            for key, value, kind in STEPS:
                if value is None:
                    sim.delete_value(key)
                else:
                    sim.set_value(key, value)
                until(kind)
            until("bridge.heartbeat")
        finally:
            assert bridge.terminate() == 0, bridge.logs()[-5:]
    assert not [r for r in bridge.logs() if r.get("severity") == "ERROR"], bridge.logs()[-5:]
    assert {e.kind for e in events} == set(KINDS)
    assert [e.data.sequence for e in events] == sorted(e.data.sequence for e in events)
    assert len({e.data.stream_id for e in events}) == 1


def test_every_cloud_golden_passes(avro_topic: tuple[PubSubAdmin, str, str]) -> None:
    """The events the system-events function makes of the system-event log carry every field
    the schema demands (an empty project number and scheduling included)."""
    from bridge.cloud_kinds import CLOUD_KINDS

    api, topic, subscription = avro_topic
    for kind in CLOUD_KINDS:
        form = json.loads((EXAMPLES / f"{kind}.pubsub.json").read_text(encoding="utf-8"))
        _publish(api, topic, form["attributes"], dumps(form["data"]))
    got = api.pull_until(subscription, len(CLOUD_KINDS))
    assert sorted(decode_pubsub(m.attributes, m.data).kind for m in got) == sorted(CLOUD_KINDS)
