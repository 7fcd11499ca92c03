"""The one decoder: every golden example through every envelope, and only DecodeError otherwise.

Envelopes: a Pub/Sub message (attributes + bytes), the data of an Eventarc
`google.cloud.pubsub.topic.v1.messagePublished` CloudEvent (shaped like Google's test data in
`tests/data/eventarc-pubsub/`, including the duplicated snake_case fields), and a
Pub/Sub push request body. Both content modes, both spellings of the content-type attribute.
"""

from __future__ import annotations

import base64
import copy
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.events import (
    KINDS,
    STRUCTURED_CONTENT_TYPE,
    DecodeError,
    Event,
    decode_message_published,
    decode_pubsub,
    decode_push,
    decode_structured,
    dumps,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "schemas" / "examples"
EVENTARC = ROOT / "tests" / "data" / "eventarc-pubsub"
EXTENSION_NAME = re.compile(r"[a-z0-9]{1,20}")
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _golden(name: str) -> Any:
    return json.loads((EXAMPLES / name).read_text(encoding="utf-8"))


def _template(name: str) -> dict[str, Any]:
    return json.loads((EVENTARC / name).read_text(encoding="utf-8"))


def _b64(payload: bytes) -> str:
    return base64.b64encode(payload).decode("ascii")


def _message(name: str, attributes: dict[str, str], payload: bytes) -> dict[str, Any]:
    """Google's messagePublished test data with our message put in."""
    data = _template(name)
    data["message"]["attributes"] = attributes
    data["message"]["data"] = _b64(payload)
    return data


def _wire(kind: str, mode: str, header: str) -> tuple[dict[str, str], bytes]:
    """The Pub/Sub message of a golden example, as attributes and payload bytes."""
    if mode == "binary":
        form = _golden(f"{kind}.pubsub.json")
        attributes, payload = dict(form["attributes"]), dumps(form["data"])
    else:
        attributes = {"content-type": STRUCTURED_CONTENT_TYPE}
        payload = dumps(_golden(f"{kind}.json"))
    attributes[header] = attributes.pop("content-type")
    return attributes, payload


def _envelopes(
    attributes: dict[str, str], payload: bytes
) -> Iterator[tuple[str, Callable[[], Event]]]:
    """Every way a subscriber can meet the message: (label, decode call)."""
    yield "pubsub bytes", lambda: decode_pubsub(attributes, payload)
    yield "pubsub str", lambda: decode_pubsub(attributes, payload.decode())
    for name in (
        "data-MessagePublishedData-complex.json",
        "data-MessagePublishedData-duplicatedFields.json",
    ):
        published = _message(name, attributes, payload)
        yield f"eventarc {name}", lambda p=published: decode_message_published(p)
    # The whole Eventarc CloudEvent, as functions-framework sees it.
    outer = json.loads((EVENTARC / "structured-MessagePublishedData.json").read_text("utf-8"))
    outer["data"]["message"]["attributes"] = attributes
    outer["data"]["message"]["data"] = _b64(payload)
    yield "eventarc structured", lambda o=outer: decode_message_published(o["data"])
    push = {
        "message": {
            "attributes": attributes,
            "data": _b64(payload),
            "messageId": "2070443601311540",
            "message_id": "2070443601311540",
            "publishTime": "2030-01-20T02:00:01.100Z",
            "publish_time": "2030-01-20T02:00:01.100Z",
            "orderingKey": "4520031799277579481",
        },
        "subscription": "projects/demo-project/subscriptions/maintenance-push",
    }
    body = json.dumps(push).encode()
    yield "push bytes", lambda: decode_push(body)
    yield "push str", lambda: decode_push(body.decode())
    yield "push dict", lambda: decode_push(json.loads(body))


@pytest.mark.parametrize("header", ["content-type", "Content-Type"])
@pytest.mark.parametrize("mode", ["binary", "structured"])
@pytest.mark.parametrize("kind", KINDS)
def test_golden_round_trips_through_every_envelope(kind: str, mode: str, header: str) -> None:
    structured = _golden(f"{kind}.json")
    expected = decode_structured(structured)
    assert expected.to_structured() == structured  # the golden file itself decodes losslessly
    attributes, payload = _wire(kind, mode, header)
    labels = []
    for label, decode in _envelopes(attributes, payload):
        event = decode()
        assert event == expected, label
        assert event.to_structured() == structured, label
        assert event.to_pubsub("binary") == expected.to_pubsub("binary"), label
        labels.append(label)
    assert len(labels) >= 7


def test_raw_envelopes_of_the_docs_decode() -> None:
    """The raw JSON of each delivery path (schemas/examples/envelope.*.json, shown in
    docs/events.md) decodes to the golden event."""
    expected = decode_structured(_golden("maintenance.started.json"))
    pulled = _golden("envelope.pull.json")["receivedMessages"][0]["message"]
    data = base64.b64decode(pulled["data"])
    assert decode_pubsub(pulled["attributes"], data) == expected
    assert decode_push(_golden("envelope.push.json")) == expected
    eventarc = _golden("envelope.eventarc.json")
    assert eventarc["type"] == "google.cloud.pubsub.topic.v1.messagePublished"
    assert decode_message_published(eventarc["data"]) == expected


def test_decoded_event_is_typed() -> None:
    event = decode_structured(_golden("upcoming.updated.json"))
    assert event.kind == "upcoming.updated"
    assert event.data.sequence == 2 and event.data.happened_while_down is False
    assert event.data.instance.zone == "us-central1-a"
    assert event.data.upcoming is not None and event.data.upcoming.can_reschedule is True
    assert event.data.upcoming.maintenance_reasons == ("PLANNED_UPDATE",)
    assert event.data.notice_seconds is None
    started = decode_structured(_golden("maintenance.started.json"))
    assert started.data.notice_seconds == 60 and started.data.upcoming is None


def test_structured_with_data_base64_and_unknown_data_fields() -> None:
    """data_base64 is accepted, and fields added later within v1 are ignored."""
    golden = _golden("preemption.started.json")
    data = dict(golden.pop("data"), added_in_v1_1="ignored")
    golden["data_base64"] = _b64(dumps(data))
    event = decode_structured(golden)
    assert event == decode_structured(_golden("preemption.started.json"))


def test_sequence_as_number_or_string() -> None:
    """int64 in JSON: the bridge writes a number, proto3's canonical JSON a decimal string."""
    attributes, data = _binary("maintenance.started")
    as_number = decode_pubsub(attributes, dumps(data))
    as_text = decode_pubsub(attributes, dumps({**data, "sequence": str(data["sequence"])}))
    assert as_text == as_number and as_text.data.sequence == 4
    biggest = decode_pubsub(attributes, dumps({**data, "sequence": str(2**63 - 1)}))
    assert biggest.data.sequence == 2**63 - 1


def test_non_ce_attributes_are_ignored() -> None:
    """Pub/Sub may carry attributes of its own (e.g. googclient_*); only ce-* count."""
    attributes, payload = _wire("maintenance.ended", "binary", "content-type")
    attributes["googclient_schemaencoding"] = "JSON"
    attributes["Ce-Whatever"] = "x"
    assert decode_pubsub(attributes, payload).kind == "maintenance.ended"


# -- malformed input: DecodeError with a message that names the problem ------------------


def _binary(kind: str = "maintenance.started") -> tuple[dict[str, str], dict[str, Any]]:
    form = _golden(f"{kind}.pubsub.json")
    return dict(form["attributes"]), form["data"]


def _with(mapping: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy with `path` (dotted) set to `value`, or deleted when value is _DELETE."""
    out = copy.deepcopy(mapping)
    *parents, last = path.split(".")
    node = out
    for part in parents:
        node = node[part]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return out


_DELETE = object()


def _data_case(path: str, value: Any, kind: str = "maintenance.started") -> Callable[[], Event]:
    attributes, data = _binary(kind)
    return lambda: decode_pubsub(attributes, dumps(_with(data, path, value)))


def _attr_case(name: str, value: Any) -> Callable[[], Event]:
    attributes, data = _binary()
    if value is _DELETE:
        del attributes[name]
    else:
        attributes[name] = value
    return lambda: decode_pubsub(attributes, dumps(data))


def _structured_case(name: str, value: Any, **extra: Any) -> Callable[[], Event]:
    golden = _golden("maintenance.started.json")
    if value is _DELETE:
        del golden[name]
    else:
        golden[name] = value
    golden.update(extra)
    return lambda: decode_structured(golden)


_ATTRS = _binary()[0]
MALFORMED: dict[str, tuple[Callable[[], Event], str]] = {
    "attributes not a map": (lambda: decode_pubsub("ce-id", b"{}"), "attributes must be a map"),
    "data not bytes": (lambda: decode_pubsub({}, 42), "data must be bytes"),
    "content-type not a string": (
        lambda: decode_pubsub({"content-type": 1}, b"{}"),
        "content-type attribute must be a string",
    ),
    "payload not JSON": (
        lambda: decode_pubsub(_ATTRS, b"MIGRATE"),
        "message data is not valid JSON",
    ),
    "payload not UTF-8": (lambda: decode_pubsub(_ATTRS, b"\xff\xfe\x00"), "not valid JSON"),
    "payload nested too deeply": (
        lambda: decode_pubsub(_ATTRS, b"[" * 100_000),
        "nested too deeply",
    ),
    "empty payload": (lambda: decode_pubsub(_ATTRS, b""), "message data is not valid JSON"),
    "no ce-id": (_attr_case("ce-id", _DELETE), "required attribute 'id'"),
    "empty ce-source": (_attr_case("ce-source", ""), "required attribute 'source'"),
    "no ce-type": (_attr_case("ce-type", _DELETE), "required attribute 'type'"),
    "specversion 0.3": (_attr_case("ce-specversion", "0.3"), "unsupported specversion '0.3'"),
    "foreign type": (_attr_case("ce-type", "com.example.thing.done"), "not a maintenance-bridge"),
    "capitalised extension": (_attr_case("ce-Zone", "x"), "invalid attribute name 'Zone'"),
    "extension too long": (_attr_case("ce-" + "a" * 21, "x"), "invalid attribute name"),
    "extension with newline": (_attr_case("ce-zone\n", "x"), "invalid attribute name"),
    "reserved extension name data": (_attr_case("ce-data", "x"), "invalid attribute name 'data'"),
    "text/plain data": (_attr_case("content-type", "text/plain"), "unsupported datacontenttype"),
    "data is a list": (lambda: decode_pubsub(_ATTRS, b"[]"), "data must be a JSON object"),
    "no sequence": (_data_case("sequence", _DELETE), "data.sequence"),
    "negative sequence": (_data_case("sequence", -1), "data.sequence"),
    "zero sequence (every stream starts at 1)": (_data_case("sequence", 0), "data.sequence"),
    "sequence as words": (_data_case("sequence", "four"), "data.sequence"),
    "sequence as signed text": (_data_case("sequence", "+4"), "data.sequence"),
    "sequence as float": (_data_case("sequence", 4.0), "data.sequence"),
    "sequence beyond int64": (_data_case("sequence", 2**63), "data.sequence"),
    "sequence as bool": (_data_case("sequence", True), "data.sequence"),
    "down as text": (_data_case("happened_while_down", "false"), "data.happened_while_down"),
    "notice as float": (_data_case("notice_seconds", 1.5), "data.notice_seconds"),
    "no key": (_data_case("key", _DELETE), "data.key is missing or not a string"),
    "previous null": (_data_case("previous", None), "data.previous"),
    "no instance": (_data_case("instance", _DELETE), "data.instance must be a JSON object"),
    "instance id number": (_data_case("instance.id", 5), "data.instance.id"),
    "scheduling list": (_data_case("scheduling", []), "data.scheduling must be a JSON object"),
    "scheduling value number": (
        _data_case("scheduling.preemptible", 0),
        "data.scheduling.preemptible",
    ),
    "can_reschedule as text": (
        _data_case("upcoming.can_reschedule", "true", "upcoming.scheduled"),
        "data.upcoming.can_reschedule must be a boolean",
    ),
    "reasons as text": (
        _data_case("upcoming.maintenance_reasons", "PLANNED_UPDATE", "upcoming.scheduled"),
        "data.upcoming.maintenance_reasons",
    ),
    "upcoming window number": (
        _data_case("upcoming.window_start_time", 1, "upcoming.scheduled"),
        "data.upcoming.window_start_time",
    ),
    "structured not an object": (lambda: decode_structured([1]), "must be a JSON object, not list"),
    "structured without data": (_structured_case("data", _DELETE), "has no data"),
    "structured data_base64 bad": (
        _structured_case("data", _DELETE, data_base64="***"),
        "data_base64 is not valid base64",
    ),
    "structured extension not a string": (_structured_case("zone", 5), "'zone' must be a string"),
    "structured time null": (_structured_case("time", None), "'time' must be a string"),
    "structured datacontenttype xml": (
        _structured_case("datacontenttype", "application/xml"),
        "unsupported datacontenttype",
    ),
    "messagePublished not an object": (
        lambda: decode_message_published("x"),
        "messagePublished data must be a JSON object",
    ),
    "messagePublished without message": (
        lambda: decode_message_published({"subscription": "s"}),
        "no message object",
    ),
    "message.data not base64": (
        lambda: decode_message_published({"message": {"data": "%%%"}}),
        "message.data is not valid base64",
    ),
    "message.data a number": (
        lambda: decode_message_published({"message": {"data": 7}}),
        "message.data must be a base64 string, not int",
    ),
    "message attributes a list": (
        lambda: decode_message_published({"message": {"attributes": ["x"], "data": ""}}),
        "attributes must be a map",
    ),
    "push body not JSON": (lambda: decode_push(b"<html>"), "push request body is not valid JSON"),
    "push body a list": (lambda: decode_push(b"[]"), "must be a JSON object, not list"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_input_names_the_problem(case: str) -> None:
    call, expected = MALFORMED[case]
    with pytest.raises(DecodeError) as raised:
        call()
    assert expected in str(raised.value), str(raised.value)


def test_decode_error_is_a_value_error() -> None:
    """Callers that already catch ValueError keep working; nothing else escapes."""
    assert issubclass(DecodeError, ValueError)


# -- property tests: anything at all gives an Event or DecodeError ----------------------------

_NAMES = st.sampled_from(
    [
        "ce-specversion", "ce-id", "ce-source", "ce-type", "ce-time", "ce-subject",
        "ce-dataschema", "ce-datacontenttype", "ce-instanceid", "ce-zone", "ce-project",
        "ce-data", "ce-", "ce-Zone", "ce-zone\n", "content-type", "Content-Type", "ce-id ",
    ]
)  # fmt: skip
_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
JSON = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=12) | _NAMES.map(lambda n: n[3:]), inner, max_size=5)
    ),
    max_leaves=20,
)
_VALUES = (
    st.text(max_size=40)
    | st.sampled_from(
        [
            "1.0",
            "application/json",
            STRUCTURED_CONTENT_TYPE,
            "io.github.maintenancebridge.gce.v1.maintenance.started",
        ]
    )
    | JSON
)
ATTRIBUTES = st.dictionaries(_NAMES | st.text(max_size=25), _VALUES, max_size=12)
PAYLOADS = st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode())


def _only_decode_error(call: Callable[[], Event]) -> Event | None:
    """Run a decode; an Event must survive its own encodings, anything else is DecodeError."""
    try:
        event = call()
    except DecodeError as exc:
        assert str(exc)
        return None
    _assert_stable(event)
    return event


def _assert_stable(event: Event) -> None:
    """A decoded event re-encodes in both modes and decodes back to itself."""
    for name, value in event.attributes().items():
        assert isinstance(name, str) and isinstance(value, str), (name, value)
    for name in event.extensions:
        assert EXTENSION_NAME.fullmatch(name) and name != "data", name
    for mode in ("binary", "structured"):
        attributes, payload = event.to_pubsub(mode)
        assert decode_pubsub(attributes, payload) == event, mode
    assert decode_structured(json.loads(dumps(event.to_structured()))) == event


@FUZZ
@given(attributes=ATTRIBUTES, payload=PAYLOADS)
def test_fuzz_pubsub_message(attributes: dict[Any, Any], payload: bytes) -> None:
    _only_decode_error(lambda: decode_pubsub(attributes, payload))


@FUZZ
@given(value=JSON)
def test_fuzz_json_values_in_every_entry_point(value: Any) -> None:
    for decode in (decode_structured, decode_message_published, decode_push):
        _only_decode_error(lambda d=decode: d(value))
    _only_decode_error(lambda: decode_push(json.dumps(value).encode()))
    _only_decode_error(
        lambda: decode_pubsub({"content-type": STRUCTURED_CONTENT_TYPE}, json.dumps(value))
    )


@FUZZ
@given(body=st.binary(max_size=300), text=st.text(max_size=100))
def test_fuzz_push_body_bytes(body: bytes, text: str) -> None:
    _only_decode_error(lambda: decode_push(body))
    _only_decode_error(lambda: decode_push(text))


@FUZZ
@given(
    message=st.fixed_dictionaries(
        {},
        optional={
            "attributes": ATTRIBUTES | JSON,
            "data": st.binary(max_size=80).map(_b64) | JSON,
            "messageId": JSON,
            "message_id": JSON,
        },
    ),
    extra=JSON,
)
def test_fuzz_message_published_envelope(message: dict[str, Any], extra: Any) -> None:
    _only_decode_error(lambda: decode_message_published({"message": message, "x": extra}))
    body = json.dumps({"message": message, "subscription": extra}, default=str)
    _only_decode_error(lambda: decode_push(body))


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into a JSON value (dict keys and list indexes)."""
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            out += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            out += _paths(item, (*prefix, index))
    return out


def _mutate(value: Any, path: tuple[Any, ...], action: str, name: str, replacement: Any) -> Any:
    out = copy.deepcopy(value)
    node = out
    for part in path[:-1]:
        node = node[part]
    last = path[-1]
    if action == "delete":
        del node[last]
    elif action == "replace":
        node[last] = replacement
    elif isinstance(node, dict):
        node[name] = replacement  # an added sibling field
    else:
        node.append(replacement)
    return out


_ADDED = (
    st.sampled_from(["data", "zone\n", "Zone", "datacontenttype", "x" * 21])
    | _NAMES
    | st.text(max_size=8)
)
MUTATION = st.tuples(
    st.sampled_from(KINDS),
    st.integers(min_value=0),
    st.sampled_from(["delete", "replace", "add"]),
    _ADDED,
    JSON | st.text(max_size=8),
)


@FUZZ
@given(mutation=MUTATION)
def test_fuzz_mutated_structured_goldens(mutation: tuple[str, int, str, str, Any]) -> None:
    kind, pick, action, name, replacement = mutation
    golden = _golden(f"{kind}.json")
    paths = _paths(golden)
    mutated = _mutate(golden, paths[pick % len(paths)], action, name, replacement)
    _only_decode_error(lambda: decode_structured(mutated))
    _only_decode_error(
        lambda: decode_pubsub({"Content-Type": STRUCTURED_CONTENT_TYPE}, dumps(mutated))
    )


@FUZZ
@given(mutation=MUTATION, header=st.sampled_from(["content-type", "Content-Type"]))
def test_fuzz_mutated_binary_goldens(mutation: tuple[str, int, str, str, Any], header: str) -> None:
    kind, pick, action, name, replacement = mutation
    form = _golden(f"{kind}.pubsub.json")
    form["attributes"][header] = form["attributes"].pop("content-type")
    paths = _paths(form)
    mutated = _mutate(form, paths[pick % len(paths)], action, name, replacement)
    attributes = mutated.get("attributes", {})
    payload = dumps(mutated["data"]) if "data" in mutated else b""
    event = _only_decode_error(lambda: decode_pubsub(attributes, payload))
    published = {"message": {"attributes": attributes, "data": _b64(payload)}}
    again = _only_decode_error(lambda: decode_message_published(published))
    assert again == event
