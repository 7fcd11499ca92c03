"""The cloud's side: Compute Engine system-event LogEntries as events of the contract.

The converter (bridge/system_events.py) is pure, so most of it is held by properties over
generated entries in the documented shapes (FACTS.md section 8: the samples of gcpdiag,
iap-desktop and scylla-cluster-tests were read for the shapes, none copied); the golden
`schemas/examples/logentry.<kind>.json` files are the inputs of the rest. End to end, the
system-events function runs from its zip (tests/test_functions.py's `Function`) against the
official Pub/Sub emulator: an entry published on a log topic as a sink publishes it, delivered
Eventarc-style, comes out on a main topic that enforces the Avro schema, decoded by the
project's decoder. The function attests each event with its own identity token (here the
simulator's metadata server stands for Cloud Run's), which verifies as the cloud's.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st
from support.pubsub import PubSubAdmin, PubSubServer
from test_avro_schema import avro_topic  # noqa: F401  (the fixture: a topic enforcing the .avsc)
from test_functions import (
    CLOUD_IDENTITY,
    MIGRATE,
    Function,
    _load_module,
    deliver,
    firestore_host,  # noqa: F401  (the module's Firestore emulator fixture)
    free_port,
    maintenance,
    message_published,
    skip_without_firestore,
    stop,
    until,
    vm,
    wait_for_port,
)

from bridge import origin
from bridge.cloud_kinds import (
    CLOUD_KEY,
    CLOUD_KINDS,
    GENERIC_KIND,
    METHODS,
    UPCOMING_COMPLETED,
    UPCOMING_METHOD,
    UPCOMING_SCHEDULED,
    UPCOMING_UPDATED,
)
from bridge.events import DEFAULT_TYPE_PREFIX, Event, Scheduling, decode_pubsub, dumps
from bridge.simulator import Simulator
from bridge.system_events import NotASystemEvent, convert, event_id, parse, stream_of

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "schemas" / "examples"
CONSUMER = json.loads((REPO / "schemas" / "v1" / "event-data.schema.json").read_text())
PRODUCER = json.loads((REPO / "schemas" / "v1" / "event-data.producer.schema.json").read_text())
AVRO = json.loads((REPO / "schemas" / "v1" / "event-data.avsc").read_text())
CHECKER = jsonschema.Draft202012Validator.FORMAT_CHECKER
SYSTEM_LOG = "cloudaudit.googleapis.com%2Fsystem_event"


def golden(kind: str) -> dict[str, Any]:
    return json.loads((EXAMPLES / f"logentry.{kind}.json").read_text(encoding="utf-8"))


def valid(data: dict[str, Any]) -> None:
    """Both schemas: the consumer one (published) and the producer one (exactly this release)."""
    jsonschema.validate(data, CONSUMER, format_checker=CHECKER)
    jsonschema.validate(data, PRODUCER, format_checker=CHECKER)


def micros_of(moment: datetime, frac: str) -> int:
    whole = (moment - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(seconds=1)
    return whole * 10**6 + int(frac[:6].ljust(6, "0"))


# --- the goldens -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", CLOUD_KINDS)
def test_each_golden_entry_is_its_golden_event(kind: str) -> None:
    event = convert(golden(kind))
    form = json.loads((EXAMPLES / f"{kind}.pubsub.json").read_text(encoding="utf-8"))
    assert event.to_pubsub("binary") == (form["attributes"], dumps(form["data"]))
    assert event.kind == kind and event.type == f"{DEFAULT_TYPE_PREFIX}.{kind}"
    valid(event.data.to_json())
    assert decode_pubsub(*event.to_pubsub("binary")) == event
    assert decode_pubsub(*event.to_pubsub("structured")) == event


def test_every_mapped_method_has_its_own_kind_and_unknown_ones_the_generic() -> None:
    assert len(set(METHODS.values())) == len(METHODS)
    for method, kind in METHODS.items():
        entry = golden("cloud.host_error")
        entry["protoPayload"]["methodName"] = method
        assert convert(entry).kind == kind
    entry["protoPayload"]["methodName"] = "compute.instances.somethingGoogleAddsTomorrow"
    event = convert(entry)
    assert event.kind == GENERIC_KIND
    assert event.data.current == event.data.cloud.method == entry["protoPayload"]["methodName"]


def test_the_event_says_it_came_from_the_cloud_and_keeps_a_bridges_envelope() -> None:
    entry = golden("cloud.host_error")
    event = convert(entry)
    labels = entry["resource"]["labels"]
    assert event.source == (
        "//compute.googleapis.com/projects/demo-project/zones/us-central1-a/instances/demo-vm"
    )
    assert event.extensions == {
        "instanceid": labels["instance_id"],
        "zone": labels["zone"],
        "project": labels["project_id"],
    }
    attributes, _ = event.to_pubsub("binary")
    assert {"ce-instanceid", "ce-zone", "ce-project", "ce-type"} <= set(attributes)
    d = event.data
    assert (d.key, d.origin, event.subject, d.previous) == (CLOUD_KEY, "cloud", CLOUD_KEY, "")
    assert d.cloud.method == d.current == "compute.instances.hostError"
    assert d.cloud.timestamp == entry["timestamp"] == d.observed_at == event.time
    assert d.cloud.receive_timestamp == entry["receiveTimestamp"]
    assert d.cloud.operation_id == entry["operation"]["id"]
    assert d.cloud.status_message == "Instance terminated by Compute Engine."
    assert d.cloud.principal == "system@google.com"
    assert d.notice_seconds is None and d.upcoming is None
    assert d.stream_id == stream_of(labels["project_id"], labels["instance_id"])


# --- redelivery and identity -----------------------------------------------------------------


def test_a_redelivered_entry_is_the_same_event_and_another_entry_another() -> None:
    entry = golden("cloud.preempted")
    first = convert(entry)
    assert convert(copy.deepcopy(entry)) == first  # Pub/Sub redelivers the same bytes
    again = copy.deepcopy(entry)
    again["receiveTimestamp"] = "2030-02-03T11:43:00.000000001Z"  # re-exported, re-received
    assert convert(again).id == first.id
    assert convert(parse(json.dumps(entry) + "\n")).id == first.id  # a sink's newline
    other = {**entry, "insertId": entry["insertId"] + "x"}
    assert convert(other).id != first.id
    elsewhere = {**entry, "logName": f"projects/other-project/logs/{SYSTEM_LOG}"}
    assert convert(elsewhere).id != first.id
    assert first.id == event_id(entry["logName"], entry["insertId"])
    assert str(uuid.UUID(first.id)) == first.id


def test_folder_and_organization_sinks_deliver_project_scoped_entries() -> None:
    """Through a folder or organization sink an entry keeps its own project's logName and
    labels: the event is that project's, on the hub's topic."""
    entry = golden("cloud.host_error")
    entry["logName"] = f"projects/team-b-prod/logs/{SYSTEM_LOG}"
    entry["resource"]["labels"]["project_id"] = "team-b-prod"
    entry["protoPayload"]["resourceName"] = (
        "projects/team-b-prod/zones/europe-west1-b/instances/db-3"
    )
    entry["resource"]["labels"]["zone"] = "europe-west1-b"
    event = convert(entry)
    assert event.extensions["project"] == event.data.instance.project_id == "team-b-prod"
    assert event.source.endswith("/projects/team-b-prod/zones/europe-west1-b/instances/db-3")
    assert convert({**entry, "logName": entry["logName"].replace("%2F", "/")}).kind == event.kind


# --- maintenance windows ---------------------------------------------------------------------

WINDOW = {
    "canReschedule": True,
    "maintenanceStatus": "PENDING",
    "type": "SCHEDULED",
    "windowStartTime": "2030-01-15T02:00:00Z",
    "windowEndTime": "2030-01-15T06:00:00Z",
    "latestWindowStartTime": "2030-01-29T02:00:00Z",
}


def _snake(form: dict[str, Any]) -> dict[str, Any]:
    return {"".join("_" + c.lower() if c.isupper() else c for c in k): v for k, v in form.items()}


@pytest.mark.parametrize(
    "metadata",
    [
        {"@type": "type.googleapis.com/google.cloud.compute.v1.UpcomingMaintenance", **WINDOW},
        {"upcomingMaintenance": WINDOW},
        _snake(WINDOW),
        {**WINDOW, "canReschedule": "true", "addedTomorrow": {"x": 1}, "maintenanceReasons": "X"},
    ],
    ids=["flat", "nested", "snake_case", "text-flag-and-unknown-fields"],
)
def test_a_window_is_read_from_either_metadata_form(metadata: dict[str, Any]) -> None:
    entry = golden("cloud.maintenance_scheduled")
    entry["protoPayload"]["metadata"] = metadata
    event = convert(entry)
    assert event.kind == UPCOMING_SCHEDULED
    window = event.data.upcoming
    assert window is not None
    assert (window.window_start_time, window.window_end_time) == (
        "2030-01-15T02:00:00Z",
        "2030-01-15T06:00:00Z",
    )
    assert (window.can_reschedule, window.type, window.maintenance_status) == (
        True,
        "SCHEDULED",
        "PENDING",
    )
    valid(event.data.to_json())


def test_window_updated_completed_and_unreadable() -> None:
    entry = golden("cloud.maintenance_scheduled")
    entry["protoPayload"]["status"] = {"message": "Maintenance window has been rescheduled."}
    assert convert(entry).kind == UPCOMING_UPDATED
    done = golden("cloud.maintenance_completed")
    assert "metadata" not in done["protoPayload"]
    assert convert(done).kind == UPCOMING_COMPLETED and convert(done).data.upcoming is None
    bare = copy.deepcopy(done)
    bare["protoPayload"]["status"] = {}
    assert convert(bare).kind == GENERIC_KIND  # passed on, never read as a window it is not
    assert convert(bare).data.current == UPCOMING_METHOD


# --- properties over generated entries -------------------------------------------------------

_ids = st.integers(min_value=1, max_value=2**64 - 1).map(str)
_names = st.from_regex(r"[a-z]([-a-z0-9]{0,20}[a-z0-9])?", fullmatch=True)
_projects = st.from_regex(r"[a-z][-a-z0-9]{4,20}[a-z0-9]", fullmatch=True)
_zones = st.sampled_from(["us-central1-a", "europe-west4-b", "asia-east1-c"])
_methods = st.one_of(
    st.sampled_from([*METHODS, UPCOMING_METHOD]),
    st.from_regex(r"compute\.instances\.[a-z][A-Za-z]{2,30}", fullmatch=True),
)
_moments = st.datetimes(
    min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(timezone.utc)
).map(lambda m: m.replace(microsecond=0))
_fracs = st.one_of(st.just(""), st.from_regex(r"[0-9]{1,9}", fullmatch=True))
_offsets = st.sampled_from(["Z", "+00:00", "+05:30", "-08:00"])
_extras = st.dictionaries(
    st.from_regex(r"x[A-Za-z]{1,10}", fullmatch=True),
    st.one_of(st.text(max_size=5), st.integers(), st.lists(st.booleans(), max_size=2)),
    max_size=3,
)


def _stamp(moment: datetime, frac: str, offset: str) -> str:
    local = (
        moment
        if offset in ("Z", "+00:00")
        else moment.astimezone(datetime.strptime(offset.replace(":", ""), "%z").tzinfo)
    )
    return f"{local:%Y-%m-%dT%H:%M:%S}" + (f".{frac}" if frac else "") + offset


@settings(max_examples=300, deadline=None)
@given(
    method=_methods,
    instance_id=_ids,
    name=_names,
    project=_projects,
    zone=_zones,
    insert_id=st.text(min_size=1, max_size=40),
    moment=_moments,
    frac=_fracs,
    offset=_offsets,
    extras=_extras,
    severity=st.sampled_from(["INFO", "NOTICE", None]),
    metadata=st.one_of(st.none(), st.just(WINDOW), st.just({"upcomingMaintenance": WINDOW})),
)
def test_any_entry_of_the_log_is_exactly_one_valid_event(
    method: str,
    instance_id: str,
    name: str,
    project: str,
    zone: str,
    insert_id: str,
    moment: datetime,
    frac: str,
    offset: str,
    extras: dict[str, Any],
    severity: str | None,
    metadata: dict[str, Any] | None,
) -> None:
    entry = golden("cloud.migrated")
    entry.update(extras)
    entry["protoPayload"].update(extras)
    entry["protoPayload"]["methodName"] = method
    entry["protoPayload"]["resourceName"] = f"projects/{project}/zones/{zone}/instances/{name}"
    if metadata is not None:
        entry["protoPayload"]["metadata"] = metadata
    entry["insertId"] = insert_id
    entry["timestamp"] = _stamp(moment, frac, offset)
    entry["logName"] = f"projects/{project}/logs/{SYSTEM_LOG}"
    entry["resource"]["labels"] = {"instance_id": instance_id, "zone": zone, "project_id": project}
    if severity is None:
        del entry["severity"]
    else:
        entry["severity"] = severity

    event = convert(entry)

    if method in METHODS:
        assert event.kind == METHODS[method]
    elif method == UPCOMING_METHOD:
        assert event.kind in (
            UPCOMING_SCHEDULED,
            UPCOMING_UPDATED,
            UPCOMING_COMPLETED,
            GENERIC_KIND,
        )
        assert (event.data.upcoming is not None) == (metadata is not None)
    else:
        assert event.kind == GENERIC_KIND
    assert event.id == event_id(entry["logName"], insert_id)
    assert event.extensions["instanceid"] == event.data.instance.id == instance_id
    assert event.data.sequence == micros_of(moment, frac)
    assert event.data.sequence < 2**53  # exact where JSON numbers are doubles
    assert event.time == event.data.observed_at
    assert event.time.endswith("Z") and (not frac or event.time.endswith(f".{frac}Z"))
    data = event.data.to_json()
    valid(data)
    assert {f["name"] for f in AVRO["fields"]} <= set(data)  # what the topic's schema demands
    assert decode_pubsub(*event.to_pubsub("binary")) == event
    assert convert(copy.deepcopy(entry)) == event  # pure: the same entry, the same event


# --- what is not published -------------------------------------------------------------------


def _without(path: str) -> dict[str, Any]:
    entry = golden("cloud.host_error")
    *parents, last = path.split(".")
    target = entry
    for part in parents:
        target = target[part]
    del target[last]
    return entry


def _with(path: str, value: Any) -> dict[str, Any]:
    entry = golden("cloud.host_error")
    *parents, last = path.split(".")
    target = entry
    for part in parents:
        target = target[part]
    target[last] = value
    return entry


UNRELATED = {
    "activity log": _with("logName", "projects/p/logs/cloudaudit.googleapis.com%2Factivity"),
    "another resource": _with("resource.type", "gce_disk"),
    "another service": _with("protoPayload.serviceName", "container.googleapis.com"),
}
MALFORMED = {
    "not an object": [],
    "no logName": _without("logName"),
    "no resource": _without("resource"),
    "no protoPayload": _without("protoPayload"),
    "no methodName": _without("protoPayload.methodName"),
    "no insertId": _without("insertId"),
    "empty insertId": _with("insertId", ""),
    "no timestamp": _without("timestamp"),
    "timestamp not RFC 3339": _with("timestamp", "14/12/2019 01:50"),
    "timestamp out of range": _with("timestamp", "1969-12-31T23:59:59Z"),
    "no instance_id": _without("resource.labels.instance_id"),
    "no zone": _without("resource.labels.zone"),
    "labels not an object": _with("resource.labels", "x"),
    "no resourceName": _without("protoPayload.resourceName"),
    "resourceName of a disk": _with("protoPayload.resourceName", "projects/p/zones/z/disks/d"),
}


@pytest.mark.parametrize("case", [*UNRELATED, *MALFORMED])
def test_an_unrelated_or_malformed_entry_is_refused_saying_which(case: str) -> None:
    entry = UNRELATED.get(case, MALFORMED.get(case))
    with pytest.raises(NotASystemEvent) as refused:
        convert(entry)
    assert refused.value.unrelated == (case in UNRELATED), refused.value


def test_not_json_is_refused() -> None:
    for raw in (b"{not json", b"\xff\xfe", "[" * 100_000):
        with pytest.raises(NotASystemEvent):
            parse(raw)


# --- end to end: the function from its zip, the official emulator, the Avro topic ------------


def _log_message(entry: Any) -> tuple[bytes, dict[str, str]]:
    """What a log sink publishes: the LogEntry JSON (with a newline), one attribute."""
    raw = entry if isinstance(entry, bytes) else (json.dumps(entry) + "\n").encode()
    return raw, {"logging.googleapis.com/timestamp": "2030-01-20T02:01:02.290123Z"}


@pytest.fixture
def signer() -> Any:
    """The metadata server the function gets its identity token from (Cloud Run's, simulated:
    its default account signs)."""
    sim = Simulator().start()
    # google-auth reads the account's email (its directory, recursive) before asking for a token.
    sim.set_value("instance/service-accounts/default/email", CLOUD_IDENTITY)
    try:
        yield sim
    finally:
        sim.stop()


@pytest.fixture
def system_events(
    pubsub: PubSubServer,
    avro_topic: tuple[PubSubAdmin, str, str],  # noqa: F811
    signer: Simulator,
    tmp_path: Path,
) -> Any:
    """(function, admin, log topic, log subscription, main subscription)."""
    api, topic, main_subscription = avro_topic
    name = f"logs-{uuid.uuid4().hex[:8]}"
    log_topic = api.create_topic(name)
    log_subscription = api.create_subscription(log_topic, f"{name}-sub", ordering=False)
    env = {
        "PUBSUB_EMULATOR_HOST": pubsub.host_port,
        "GOOGLE_CLOUD_PROJECT": pubsub.project,
        "EVENTS_TOPIC": topic,
        "GCE_METADATA_HOST": signer.host_port,
        "GCE_METADATA_IP": signer.host_port,
    }
    function = Function("system-events", env, tmp_path)
    try:
        wait_for_port(function.port, function.proc, function.log, time.monotonic() + 120)
        yield function, api, log_topic, log_subscription, main_subscription
    finally:
        stop(function.proc)


def bare(event: Event) -> Event:
    """The event without its attestation: what the converter made of the entry."""
    kept = {k: v for k, v in event.extensions.items() if not k.startswith("attestation")}
    return dataclasses.replace(event, extensions=kept)


def _through_the_log_topic(api: PubSubAdmin, log_topic: str, sub: str, entry: Any) -> dict:
    """Publish as the sink does, pull it back, and hand it over as Eventarc's delivery would."""
    raw, attributes = _log_message(entry)
    api.publisher_api.publish(log_topic, raw, **attributes).result(timeout=10)
    (message,) = api.pull_until(sub, 1)
    return message_published(message.attributes, message.data, message.message_id)


def test_each_entry_becomes_one_event_on_the_avro_topic_end_to_end(
    system_events: Any, signer: Simulator
) -> None:
    function, api, log_topic, log_sub, main_sub = system_events
    entries = {kind: golden(kind) for kind in CLOUD_KINDS}
    for entry in entries.values():
        response = deliver(function.port, _through_the_log_topic(api, log_topic, log_sub, entry))
        assert response.status_code == 200, function.log.read_text()[-2000:]
    got = api.pull_until(main_sub, len(entries), timeout=30)
    events = [decode_pubsub(m.attributes, m.data) for m in got]
    assert sorted(e.kind for e in events) == sorted(CLOUD_KINDS)
    certs = signer.identity.certs()
    for message, event in zip(got, events, strict=True):
        entry = entries[event.kind]
        assert event.id == event_id(entry["logName"], entry["insertId"])
        assert message.ordering_key == event.extensions["instanceid"]
        assert message.attributes["content-type"] == "application/json"  # binary mode
        assert bare(event) == convert(entry)
        at = message.publish_time.timestamp()
        verdict = origin.check(event, at=at, certs=certs, cloud_identity=CLOUD_IDENTITY)
        assert verdict == origin.Verdict(True, True), verdict
        sent = origin.signed_part_of_message(message.attributes, message.data)
        assert origin.binding(sent) == origin.binding_of(event)  # as published, as decoded
        # No VM can sign as the cloud: a VM's own account is not the cloud's identity.
        vm_account = "vm@demo-project.iam.gserviceaccount.com"
        assert not origin.check(event, at=at, certs=certs, cloud_identity=vm_account).verified
        assert all(len(v.encode()) <= 1024 for v in message.attributes.values())
        jsonschema.validate(json.loads(message.data), CONSUMER, format_checker=CHECKER)

    # Redelivered (a new Pub/Sub message of the same entry): the same event, the same id.
    again = deliver(
        function.port, _through_the_log_topic(api, log_topic, log_sub, entries["cloud.host_error"])
    )
    assert again.status_code == 200
    (copy_of,) = api.pull_until(main_sub, 1, timeout=30)
    assert bare(decode_pubsub(copy_of.attributes, copy_of.data)) == convert(
        entries["cloud.host_error"]
    )

    # Unrelated and malformed: acknowledged (200), logged once each, nothing published: the
    # next message on the main topic is the sentinel delivered after them.
    refused = [b"{not json", *(json.dumps(e).encode() for e in UNRELATED.values())]
    refused += [json.dumps(MALFORMED[c]).encode() for c in ("no insertId", "no resourceName")]
    for raw in refused:
        response = deliver(function.port, _through_the_log_topic(api, log_topic, log_sub, raw))
        assert response.status_code == 200
    not_base64 = {"subscription": "s", "message": {"data": "!!", "messageId": "m"}}
    assert deliver(function.port, not_base64).status_code == 200
    sentinel = golden("cloud.preempted")
    sentinel["insertId"] = "sentinel"
    assert deliver(function.port, _through_the_log_topic(api, log_topic, log_sub, sentinel)).ok
    (after,) = api.pull_until(main_sub, 1, timeout=30)
    assert decode_pubsub(after.attributes, after.data).id == event_id(
        sentinel["logName"], "sentinel"
    )
    acked = [r for r in function.logs() if "acked" in r.get("message", "")]
    assert len(acked) == len(refused) + 1, acked
    assert sum("unrelated" in r["message"] for r in acked) == len(UNRELATED)
    published = [r for r in function.logs() if r.get("message") == "cloud event published"]
    assert len(published) == len(entries) + 2


def test_a_publish_the_topic_refuses_is_retried_not_acked(system_events: Any) -> None:
    """Pub/Sub down or refusing: the function answers an error, so that the trigger retries."""
    function, api, log_topic, log_sub, _ = system_events
    api.delete_topic(function.env["EVENTS_TOPIC"])  # NotFound: the main topic is gone
    delivery = _through_the_log_topic(api, log_topic, log_sub, golden("cloud.host_error"))
    response = deliver(function.port, delivery)
    assert response.status_code >= 500
    assert any("will be retried" in r.get("message", "") for r in function.logs())


# --- the ledger reconciles both streams (pure part, in-process) -------------------------------

ledger = _load_module("ledger")


def cloud_event_of(kind: str, instance: Any, at: datetime, insert_id: str = "") -> Any:
    """The cloud's event of `kind` about `instance`, made by the converter from a golden entry."""
    entry = golden(kind)
    entry["insertId"] = insert_id or f"{kind}-{at.isoformat()}"
    entry["timestamp"] = at.isoformat().replace("+00:00", "Z")
    entry["logName"] = f"projects/{instance.project_id}/logs/{SYSTEM_LOG}"
    entry["resource"]["labels"] = {
        "instance_id": instance.id,
        "zone": instance.zone,
        "project_id": instance.project_id,
    }
    entry["protoPayload"]["resourceName"] = (
        f"projects/{instance.project_id}/zones/{instance.zone}/instances/{instance.name}"
    )
    return convert(entry)


T0 = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)


def _apply(events: list[Any]) -> tuple[list[dict[str, Any]], list[str | None]]:
    disruptions: list[dict[str, Any]] = []
    parts = []
    for event in events:
        disruptions, part = ledger.reconcile(disruptions, event)
        parts.append(part)
    return disruptions, parts


def test_notice_cloud_record_and_end_are_one_disruption_in_any_order() -> None:
    started = maintenance("maintenance.started", sequence=1, observed=T0)
    migrated = cloud_event_of("cloud.migrated", vm(), T0 + timedelta(seconds=62))
    ended = maintenance(
        "maintenance.ended",
        sequence=2,
        previous=MIGRATE,
        current="NONE",
        observed=T0 + timedelta(seconds=75),
    )
    for order in (
        [started, migrated, ended],
        [migrated, started, ended],
        [started, ended, migrated],
    ):
        disruptions, parts = _apply(order)
        assert len(disruptions) == 1, (order, disruptions)
        (one,) = disruptions
        assert len(set(parts)) == 1 and parts[0] == one["id"]
        assert one["cause"] == "migration" and one["seen_by"] == ["bridge", "cloud"]
        assert one["ended_at"] == ended.data.observed_at and one["ended_by"] == "bridge"
        assert sorted(one["events"]) == sorted(e.id for e in order)


def test_host_error_without_a_bridge_and_during_a_notice() -> None:
    error = cloud_event_of("cloud.host_error", vm(), T0)
    (alone,), _ = _apply([error])
    assert (alone["cause"], alone["seen_by"], alone["ended_by"]) == (
        "host_error",
        ["cloud"],
        "cloud",
    )
    assert alone["error"] == "Instance terminated by Compute Engine."
    started = maintenance("maintenance.started", sequence=1, observed=T0)
    crash = cloud_event_of("cloud.host_error", vm(), T0 + timedelta(seconds=20))
    restart = cloud_event_of("cloud.automatic_restart", vm(), T0 + timedelta(seconds=90))
    (one,), parts = _apply([started, crash, restart])
    assert one["host_error"] is True and one["ended_by"] == "cloud"
    assert one["ended_at"] == crash.data.observed_at and one["restarted_at"] == restart.time
    assert parts == [one["id"]] * 3


def test_a_preemption_the_cloud_logged_confirms_and_ends_the_notice() -> None:
    spot = vm("spot-vm", 7)
    notice = ledger_event_of_preemption(spot, T0)
    preempted = cloud_event_of("cloud.preempted", spot, T0 + timedelta(seconds=30))
    (one,), _ = _apply([notice, preempted])
    assert one["seen_by"] == ["bridge", "cloud"] and one["ended_by"] == "cloud"
    far = cloud_event_of("cloud.preempted", spot, T0 + timedelta(days=2))
    assert len(_apply([notice, far])[0]) == 2  # days apart: another preemption


def test_windows_and_unknown_methods_are_no_disruption() -> None:
    for kind in ("cloud.maintenance_scheduled", "cloud.maintenance_completed", GENERIC_KIND):
        assert _apply([cloud_event_of(kind, vm(), T0)]) == ([], [None])


def ledger_event_of_preemption(instance: Any, at: datetime) -> Any:
    from bridge.events import Transition, build_event
    from bridge.keys import PREEMPTED

    return build_event(
        Transition(key=PREEMPTED, previous="FALSE", current="TRUE", kind="preemption.started"),
        event_id=str(uuid.uuid4()),
        sequence=1,
        observed_at=at,
        instance=instance,
        scheduling=Scheduling(preemptible="TRUE"),
        happened_while_down=False,
        notice_seconds=30,
    )


# --- end to end: a real bridge and the cloud, through the ledger to the board ----------------


def test_a_bridges_notice_and_the_clouds_record_are_one_disruption_on_the_board(
    pubsub: PubSubServer,
    avro_topic: tuple[PubSubAdmin, str, str],  # noqa: F811
    firestore_host: str | None,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """simulator -> bridge -> main topic (Avro) -> ledger, and LogEntry -> log topic ->
    system-events -> main topic -> ledger, all pushed by the official emulator to the functions
    from their zips; the Firestore emulator holds the ledger, the board reads it."""
    from google.cloud import firestore
    from support.bridge import BridgeProcess

    from bridge.keys import MAINTENANCE
    from bridge.simulator import Simulator

    if firestore_host is None:
        skip_without_firestore()
    api, topic, _ = avro_topic
    env = {
        "FIRESTORE_EMULATOR_HOST": firestore_host,
        "GOOGLE_CLOUD_PROJECT": "test-project",
        "LEDGER_COLLECTION": f"cloud-{uuid.uuid4().hex[:8]}",
    }
    ledger_fn = Function("ledger", env, tmp_path)
    board_fn = Function("board", {**env, "BOARD_CACHE_SECONDS": "0"}, tmp_path, "board", "http")
    cloud_fn = Function(
        "system-events",
        {"PUBSUB_EMULATOR_HOST": pubsub.host_port, "EVENTS_TOPIC": topic, **env},
        tmp_path,
    )
    running = (ledger_fn, board_fn, cloud_fn)
    instance_id = "5550001112229990042"
    sim = Simulator(identity={"instance/id": instance_id, "instance/name": "web-1"}).start()
    bridge = None
    try:
        deadline = time.monotonic() + 120
        for fn in running:
            wait_for_port(fn.port, fn.proc, fn.log, deadline)
        api.create_subscription(
            topic,
            f"ledger-{uuid.uuid4().hex[:8]}",
            push_endpoint=f"http://127.0.0.1:{ledger_fn.port}/{topic}",
        )
        log_topic = api.create_topic(f"logs-{uuid.uuid4().hex[:8]}")
        api.create_subscription(
            log_topic,
            f"sysev-{uuid.uuid4().hex[:8]}",
            ordering=False,
            push_endpoint=f"http://127.0.0.1:{cloud_fn.port}/{log_topic}",
        )
        monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", firestore_host)
        db = firestore.Client(project="test-project")
        docs = db.collection(env["LEDGER_COLLECTION"])

        def doc(doc_id: str, check: Any) -> dict[str, Any]:
            def ready() -> dict[str, Any] | None:
                snap = docs.document(doc_id).get()
                return snap.to_dict() if snap.exists and check(snap.to_dict()) else None

            got = until(ready, timeout=30)
            assert got, (doc_id, [fn.log.read_text()[-1500:] for fn in running])
            return got

        def log_entry(kind: str, instance: Any, insert_id: str) -> bytes:
            event_time = datetime.now(timezone.utc)
            entry = golden(kind)
            entry.update(
                insertId=insert_id, timestamp=event_time.isoformat().replace("+00:00", "Z")
            )
            entry["logName"] = f"projects/{instance.project_id}/logs/{SYSTEM_LOG}"
            entry["resource"]["labels"] = {
                "instance_id": instance.id,
                "zone": instance.zone,
                "project_id": instance.project_id,
            }
            entry["protoPayload"]["resourceName"] = (
                f"projects/{instance.project_id}/zones/{instance.zone}/instances/{instance.name}"
            )
            raw, attributes = _log_message(entry)
            api.publisher_api.publish(log_topic, raw, **attributes).result(timeout=10)
            return raw

        web = dataclasses.replace(vm("web-1"), id=instance_id, project_id="demo-project")
        bridge = BridgeProcess(sim.url, tmp_path / "state", "--topic", topic, env=pubsub.env())
        mine = f"demo-project_{instance_id}"
        until(lambda: sim.stats().get(MAINTENANCE, 0) >= 2, timeout=15)
        sim.set_value(MAINTENANCE, MIGRATE)
        doc(mine, lambda d: d.get("state", {}).get("maintenance", {}).get("current") == MIGRATE)
        migrated = log_entry("cloud.migrated", web, "migrated-1")
        doc(mine, lambda d: "cloud" in d.get("state", {}))
        sim.set_value(MAINTENANCE, "NONE")
        final = doc(mine, lambda d: d["state"]["maintenance"]["current"] == "NONE")
        lonely = vm("lonely-vm", 77)
        log_entry("cloud.host_error", lonely, "host-error-1")
        alone = doc(f"{lonely.project_id}_{lonely.id}", lambda d: d.get("disruptions"))
        # The same entry again (a sink re-export): one more copy of the same event, no change.
        api.publisher_api.publish(log_topic, migrated, **_log_message({})[1]).result(timeout=10)
        assert until(
            lambda: any("ledger duplicate" in r.get("message", "") for r in ledger_fn.logs()),
            timeout=30,
        )
        assert docs.document(mine).get().to_dict()["disruptions"] == final["disruptions"]
        view = requests.get(f"http://127.0.0.1:{board_fn.port}/api/instances", timeout=30).json()
        page = requests.get(f"http://127.0.0.1:{board_fn.port}/", timeout=30).text
    finally:
        if bridge is not None:
            assert bridge.terminate() == 0
        sim.stop()
        for fn in running:
            stop(fn.proc)

    (one,) = final["disruptions"]
    assert (one["cause"], one["seen_by"], one["ended_by"]) == (
        "migration",
        ["bridge", "cloud"],
        "bridge",
    )
    parts = [h for h in final["history"] if h.get("disruption") == one["id"]]
    assert sorted(h["kind"] for h in parts) == [
        "cloud.migrated",
        "maintenance.ended",
        "maintenance.started",
    ]
    assert final["has_bridge"] is True and final["instance"]["project_number"] == "123456789012"
    (crash,) = alone["disruptions"]
    assert (crash["cause"], crash["seen_by"], alone["has_bridge"]) == (
        "host_error",
        ["cloud"],
        False,
    )
    rows = {r["name"]: r for r in view["instances"]}
    assert rows["lonely-vm"]["no_bridge"] is True and rows["web-1"]["no_bridge"] is False
    (recent,) = [d for d in view["recent_disruptions"] if d["name"] == "lonely-vm"]
    assert recent == {
        "name": "lonely-vm",
        "zone": lonely.zone,
        "no_bridge": True,
        "cause": "host_error",
        "at": recent["at"],
        "seen_by": ["cloud"],
        "error": "Instance terminated by Compute Engine.",
    }
    assert view["counts"]["no_bridge"] == 1 and view["counts"]["host_errors_7d"] == 1
    assert "Instance terminated by Compute Engine." in page and "no bridge" in page


def test_board_refresh_at_ten_thousand_instances_reads_what_changed(
    firestore_host: str | None,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The figure docs/board.md gives: 10,000 ledger documents on the Firestore emulator, the
    board's first read, then a refresh after 10 of them changed: 10 documents read."""
    from google.cloud import firestore

    if firestore_host is None:
        skip_without_firestore()
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", firestore_host)
    db = firestore.Client(project="test-project")
    name = f"fleet-{uuid.uuid4().hex[:8]}"
    docs = db.collection(name)
    for start in range(0, 10_000, 500):
        batch = db.batch()
        for i in range(start, start + 500):
            batch.set(
                docs.document(f"p_{i}"),
                {
                    "instance": {"id": str(i), "name": f"vm-{i}", "zone": "us-central1-a"},
                    "state": {},
                    "history": [{"kind": "bridge.heartbeat"}] * 20,  # never read by the board
                    "has_bridge": True,
                    "updated_at": firestore.SERVER_TIMESTAMP,
                },
            )
        batch.commit()
    page = _load_module("board")  # its own cache
    page._client, page.COLLECTION = db, name
    t0 = time.perf_counter()
    _, _, first = page._read()
    full = time.perf_counter() - t0
    assert len(first) == 10_000 and page.last_read_count == 10_000
    changed = [f"p_{i}" for i in range(0, 10_000, 1000)]
    for doc_id in changed:
        docs.document(doc_id).set(
            {"has_bridge": False, "updated_at": firestore.SERVER_TIMESTAMP}, merge=True
        )
    t0 = time.perf_counter()
    _, _, after = page._read()
    refresh = time.perf_counter() - t0
    assert page.last_read_count == len(changed) == 10
    assert len(after) == 10_000
    assert sum(d.get("has_bridge") is False for _, d in after) == 10
    t0 = time.perf_counter()
    _, _, again = page._read()
    idle = time.perf_counter() - t0
    assert page.last_read_count == 0 and len(again) == 10_000
    print(
        f"\n10,000 instances: first read {full:.2f} s (10,000 documents); "
        f"refresh with 10 changed {refresh * 1000:.0f} ms (10 documents); "
        f"unchanged {idle * 1000:.0f} ms (0 documents)"
    )


@pytest.mark.parametrize(
    "cloud",
    [
        [],
        "x",
        {"log_name": "l"},
        {
            **json.loads((EXAMPLES / "cloud.host_error.json").read_text())["data"]["cloud"],
            "insert_id": 7,
        },
    ],
    ids=["list", "text", "incomplete", "insert_id-not-text"],
)
def test_the_decoder_refuses_a_malformed_cloud_record(cloud: Any) -> None:
    from bridge.events import DecodeError

    attributes, payload = convert(golden("cloud.host_error")).to_pubsub("binary")
    data = json.loads(payload)
    data["cloud"] = cloud
    with pytest.raises(DecodeError, match=r"data\.cloud"):
        decode_pubsub(attributes, dumps(data))


_CONFIRMS = {
    MIGRATE: "cloud.migrated",
    "TERMINATE_ON_HOST_MAINTENANCE": "cloud.terminated_for_maintenance",
    "TRUE": "cloud.preempted",
}


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.sampled_from(sorted(_CONFIRMS)), min_size=1, max_size=4),
    lags=st.lists(st.integers(min_value=0, max_value=3_000), min_size=4, max_size=4),
    order=st.randoms(use_true_random=False),
)
def test_any_arrival_order_gives_one_disruption_per_notice_seen_by_both(
    values: list[str], lags: list[int], order: Any
) -> None:
    """Disruptions a day apart, each a bridge's notice (and its end) and the cloud's record of
    it a random lag after the notice, arriving in any order that keeps the bridge's own order:
    each is one disruption, seen by both, made of exactly its events."""
    bridge, cloud, expected = [], [], []
    for i, value in enumerate(values):
        at = T0 + timedelta(days=i)
        family = "preemption" if value == "TRUE" else "maintenance"
        if family == "preemption":
            notice = ledger_event_of_preemption(vm(), at)
            ended = None
        else:
            notice = maintenance(
                "maintenance.started", sequence=2 * i + 1, current=value, observed=at
            )
            ended = maintenance(
                "maintenance.ended",
                sequence=2 * i + 2,
                previous=value,
                current="NONE",
                observed=at + timedelta(seconds=lags[i] + 60),
            )
        record = cloud_event_of(_CONFIRMS[value], vm(), at + timedelta(seconds=lags[i]), f"e{i}")
        bridge += [notice, *([ended] if ended else [])]
        cloud.append(record)
        expected.append({notice.id, record.id, *([ended.id] if ended else [])})
    arrival = [*bridge, *cloud]
    order.shuffle(arrival)
    slots = iter(bridge)  # the bridge's stream arrives in its own order (ordering key)
    arrival = [next(slots) if e in bridge else e for e in arrival]
    disruptions, parts = _apply(arrival)
    assert sorted(map(sorted, (set(d["events"]) for d in disruptions))) == sorted(
        map(sorted, expected)
    )
    assert all(d["seen_by"] == ["bridge", "cloud"] for d in disruptions)
    assert None not in parts


def test_with_no_token_to_be_had_the_event_goes_out_unattested_and_logged(
    pubsub: PubSubServer,
    avro_topic: tuple[PubSubAdmin, str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    """No metadata server answers (a closed port): published all the same, unattested, which
    consumers then mark (or drain does not act on); the function says so in its log."""
    api, topic, main_sub = avro_topic
    name = f"logs-{uuid.uuid4().hex[:8]}"
    log_topic = api.create_topic(name)
    log_sub = api.create_subscription(log_topic, f"{name}-sub", ordering=False)
    closed = f"127.0.0.1:{free_port()}"
    env = {
        "PUBSUB_EMULATOR_HOST": pubsub.host_port,
        "GOOGLE_CLOUD_PROJECT": pubsub.project,
        "EVENTS_TOPIC": topic,
        "GCE_METADATA_HOST": closed,
        "GCE_METADATA_IP": closed,
    }
    function = Function("system-events", env, tmp_path)
    try:
        wait_for_port(function.port, function.proc, function.log, time.monotonic() + 120)
        entry = golden("cloud.host_error")
        delivery = _through_the_log_topic(api, log_topic, log_sub, entry)
        assert deliver(function.port, delivery).status_code == 200
        (message,) = api.pull_until(main_sub, 1, timeout=30)
    finally:
        stop(function.proc)
    event = decode_pubsub(message.attributes, message.data)
    assert event == convert(entry) and origin.token_of(event) is None
    assert any("published unattested" in r.get("message", "") for r in function.logs())
