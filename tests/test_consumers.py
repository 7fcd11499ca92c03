"""The contract in other languages' shoes: the Node and Go consumer examples.

Node: `examples/consumers/node/consumer.js` (the official CloudEvents JavaScript SDK, ajv with the
published consumer schema) reads every golden event through every delivery path a subscriber
meets: a pulled Pub/Sub message, a push request body, and the HTTP request Eventarc sends for a
`messagePublished` event, in both content modes. A planted bad event must fail. Its packages
come from the committed package-lock.json (`npm ci`, cached in its git-ignored node_modules).

Go: `examples/consumers/go/` is standard library only; where a Go toolchain is installed it must
be gofmt-clean, pass `go vet` and its own `go test`, and decode the golden messages.

Verified origin (issue 26, bridge/origin.py's contract): both verify real tokens from the
simulated metadata server (its signing certificates served at the URL the consumers are pointed
at, as Google's would be), in both content modes, and refuse what bridge/origin.py refuses:
another VM's token, a token replayed on a new event, a tampered payload, an unattested event, a
cloud event signed by the wrong account; their canonical JSON is Python's, byte for byte.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import shutil
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from support.bridge import BridgeProcess
from support.harness import wait_for

from bridge import origin
from bridge.events import CLOUD_KINDS, STRUCTURED_CONTENT_TYPE, Event, decode_pubsub, dumps
from bridge.events import KINDS as BRIDGE_KINDS
from bridge.keys import MAINTENANCE
from bridge.metadata import MetadataClient
from bridge.simulator.state import Simulator

# npm and Go builds on a cold cache (each limited to 300 s).
pytestmark = pytest.mark.timeout(900)
ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "schemas" / "examples"
NODE_DIR = ROOT / "examples" / "consumers" / "node"
GO_DIR = ROOT / "examples" / "consumers" / "go"
EVENTARC = ROOT.parent / "shared" / "reference" / "eventarc-pubsub"
MESSAGE_PUBLISHED = "google.cloud.pubsub.topic.v1.messagePublished"


def _b64(payload: bytes) -> str:
    return base64.b64encode(payload).decode("ascii")


def _wire(kind: str, mode: str) -> tuple[dict[str, str], bytes]:
    """A golden event as a Pub/Sub message in `mode`."""
    if mode == "binary":
        form = json.loads((EXAMPLES / f"{kind}.pubsub.json").read_text(encoding="utf-8"))
        return form["attributes"], dumps(form["data"])
    structured = json.loads((EXAMPLES / f"{kind}.json").read_text(encoding="utf-8"))
    return {"content-type": STRUCTURED_CONTENT_TYPE}, dumps(structured)


def _message(
    attributes: dict[str, str], payload: bytes, published: str = "2030-01-20T02:00:01.100Z"
) -> dict[str, Any]:
    return {
        "attributes": attributes,
        "data": _b64(payload),
        "messageId": "2070443601311540",
        "message_id": "2070443601311540",
        "publishTime": published,
        "publish_time": published,
        "orderingKey": attributes.get("ce-instanceid", ""),
    }


def _deliveries(
    attributes: dict[str, str], payload: bytes, published_at: str = "2030-01-20T02:00:01.100Z"
) -> dict[str, dict[str, Any]]:
    """label -> one delivery line for consumer.js, for every path a subscriber meets."""
    subscription = "projects/demo-project/subscriptions/maintenance-events"
    message = _message(attributes, payload, published_at)
    published = {"subscription": subscription, "message": message}
    outer_attributes = {
        "ce-specversion": "1.0",
        "ce-id": "2070443601311540",
        "ce-source": "//pubsub.googleapis.com/projects/demo-project/topics/maintenance-events",
        "ce-type": MESSAGE_PUBLISHED,
        "ce-time": "2030-01-20T02:00:01.100Z",
    }
    structured_outer = {
        "specversion": "1.0",
        "id": "2070443601311540",
        "source": outer_attributes["ce-source"],
        "type": MESSAGE_PUBLISHED,
        "datacontenttype": "application/json",
        "data": published,
    }
    return {
        "pull": {
            "delivery": "pubsub",
            "attributes": attributes,
            "data": _b64(payload),
            "publishTime": published_at,
        },
        "pull Content-Type": {
            "delivery": "pubsub",
            "attributes": {
                ("Content-Type" if k == "content-type" else k): v for k, v in attributes.items()
            },
            "data": _b64(payload),
        },
        "push": {"delivery": "push", "body": published},
        "eventarc binary": {
            "delivery": "eventarc",
            "headers": {**outer_attributes, "content-type": "application/json"},
            "body": json.dumps(published),
        },
        "eventarc structured": {
            "delivery": "eventarc",
            "headers": {"content-type": "application/cloudevents+json; charset=utf-8"},
            "body": json.dumps(structured_outer),
        },
    }


# -- Node --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def node() -> str:
    """The node binary, with the example's pinned packages installed (once, then cached)."""
    node_bin, npm_bin = shutil.which("node"), shutil.which("npm")
    if not node_bin or not npm_bin:
        pytest.skip("needs Node.js and npm (the Node consumer example); not on PATH")
    if not (NODE_DIR / "node_modules" / ".package-lock.json").is_file():
        done = subprocess.run(
            [npm_bin, "ci", "--ignore-scripts", "--no-audit", "--no-fund"],
            cwd=NODE_DIR,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode != 0:
            pytest.skip(
                f"npm ci could not install the Node example's packages: {done.stderr[-500:]}"
            )
    return node_bin


def _run_node(
    node: str, deliveries: list[dict[str, Any]], env: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    done = subprocess.run(
        [node, "consumer.js"],
        cwd=NODE_DIR,
        env={**os.environ, **(env or {})},
        input="".join(json.dumps(d) + "\n" for d in deliveries),
        capture_output=True,
        text=True,
        timeout=60,
    )
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(results) == len(deliveries), done.stderr
    assert done.returncode == (0 if all(r["ok"] for r in results) else 1), done.stderr
    return results


# Every kind on the topic, the cloud's (the system-events function's) too.
KINDS = (*BRIDGE_KINDS, *CLOUD_KINDS)


def test_node_lock_file_pins_without_a_registry_host() -> None:
    """Exact versions, integrity hashes, and no `resolved` URL naming a registry host."""
    package = json.loads((NODE_DIR / "package.json").read_text(encoding="utf-8"))
    lock = json.loads((NODE_DIR / "package-lock.json").read_text(encoding="utf-8"))
    for name, version in package["dependencies"].items():
        assert version[0].isdigit(), f"{name} is not pinned: {version}"
        assert lock["packages"][f"node_modules/{name}"]["version"] == version, name
    packages = [p for key, p in lock["packages"].items() if key]
    assert packages and all("integrity" in p and "resolved" not in p for p in packages)
    assert "node_modules/" in (NODE_DIR / ".gitignore").read_text(encoding="utf-8")


def test_node_consumer_decodes_every_golden_on_every_path(node: str) -> None:
    cases: list[tuple[str, str, str, dict[str, Any]]] = []
    for kind in KINDS:
        for mode in ("binary", "structured"):
            for label, delivery in _deliveries(*_wire(kind, mode)).items():
                cases.append((kind, mode, label, delivery))
    results = _run_node(node, [c[3] for c in cases])
    for (kind, mode, label, _), result in zip(cases, results, strict=True):
        golden = json.loads((EXAMPLES / f"{kind}.json").read_text(encoding="utf-8"))
        data = golden["data"]
        assert result == {
            "ok": True,
            "id": golden["id"],
            "source": golden["source"],
            "kind": kind,
            "stream": f"{data['instance']['id']}/{data['stream_id']}",
            "sequence": str(data["sequence"]),
            # The goldens carry no token: decoded, not acted on (REQUIRE_ATTESTATION's default).
            "verified": False,
            "attested": False,
            "reason": "unattested",
            "act": False,
        }, (kind, mode, label)
    assert len(results) == len(KINDS) * 2 * 5


def test_node_consumer_reads_the_raw_envelopes_of_the_docs(node: str) -> None:
    """schemas/examples/envelope.*.json, as each path delivers them (Eventarc over HTTP: the
    outer event's attributes as ce-* headers, its data as the body)."""
    pulled = json.loads((EXAMPLES / "envelope.pull.json").read_text(encoding="utf-8"))
    message = pulled["receivedMessages"][0]["message"]
    push = json.loads((EXAMPLES / "envelope.push.json").read_text(encoding="utf-8"))
    eventarc = json.loads((EXAMPLES / "envelope.eventarc.json").read_text(encoding="utf-8"))
    headers = {f"ce-{k}": v for k, v in eventarc.items() if k not in ("data", "datacontenttype")}
    headers["content-type"] = eventarc["datacontenttype"]
    results = _run_node(
        node,
        [
            {"delivery": "pubsub", "attributes": message["attributes"], "data": message["data"]},
            {"delivery": "push", "body": push},
            {"delivery": "eventarc", "headers": headers, "body": json.dumps(eventarc["data"])},
        ],
    )
    assert [(r["ok"], r["kind"], r["sequence"]) for r in results] == [
        (True, "maintenance.started", "4")
    ] * 3


def test_node_consumer_accepts_a_later_v1_event_and_refuses_bad_ones(node: str) -> None:
    attributes, payload = _wire("maintenance.started", "binary")
    data = json.loads(payload)
    later = {
        **data,
        "sequence": str(data["sequence"]),  # int64 as proto3 JSON writes it
        "added_in_v1_9": {"x": [1]},
        "instance": {**data["instance"], "added_too": "y"},
    }
    extended = {**attributes, "ce-region": "us-central1"}  # an extension added within v1
    good = [{"delivery": "pubsub", "attributes": extended, "data": _b64(dumps(later))}]
    planted: dict[str, tuple[dict[str, str], bytes]] = {
        "sequence as words": (attributes, dumps({**data, "sequence": "four"})),
        "no instance": (attributes, dumps({k: v for k, v in data.items() if k != "instance"})),
        "upcoming key without a window": (
            attributes,
            dumps({**data, "key": "instance/upcoming-maintenance"}),
        ),
        "stream_id not a UUID": (attributes, dumps({**data, "stream_id": "vm-1"})),
        "payload not JSON": (attributes, b"MIGRATE_ON_HOST_MAINTENANCE"),
        "no ce-id": ({k: v for k, v in attributes.items() if k != "ce-id"}, payload),
    }
    bad = [{"delivery": "pubsub", "attributes": a, "data": _b64(p)} for a, p in planted.values()]
    bad.append({"delivery": "push", "body": {"message": {"attributes": attributes, "data": "%%"}}})
    results = _run_node(node, good + bad)
    assert results[0]["ok"] and results[0]["sequence"] == "4", results[0]
    for label, result in zip([*planted, "bad base64"], results[1:], strict=True):
        assert result["ok"] is False and result["error"], label


# -- Go ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def go() -> str:
    go_bin = shutil.which("go")
    if not go_bin:
        pytest.skip("needs a Go toolchain (`go` not on PATH) to check examples/consumers/go")
    return go_bin


def test_go_consumer_is_formatted_vetted_and_tested(go: str) -> None:
    """gofmt, go vet, and its own tests (every golden, both modes, push, a later v1 event,
    sequence as a string, bad events)."""
    gofmt = Path(go).with_name("gofmt")
    unformatted = subprocess.run(
        [str(gofmt), "-l", "."], cwd=GO_DIR, capture_output=True, text=True, check=True
    ).stdout
    assert not unformatted, f"gofmt would change: {unformatted}"
    for command in ("vet", "test"):
        done = subprocess.run(
            [go, command, "./..."], cwd=GO_DIR, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, f"go {command}: {done.stdout}{done.stderr}"


def test_go_consumer_decodes_the_goldens(go: str) -> None:
    """`go run . FILE...` decodes every binary-mode golden message and the raw push body."""
    kinds = [*KINDS, "maintenance.started"]
    files = [str(EXAMPLES / f"{kind}.pubsub.json") for kind in KINDS]
    files.append(str(EXAMPLES / "envelope.push.json"))
    done = subprocess.run(
        [go, "run", ".", *files], cwd=GO_DIR, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == len(files)
    for kind, line in zip(kinds, lines, strict=True):
        assert line.startswith(f"{kind} "), line


# -- Verified origin -----------------------------------------------------------------------------

CLOUD_IDENTITY = "system-events@demo-project.iam.gserviceaccount.com"
# Free text in every known place (data only keeps known fields in Python's signed form):
# non-ASCII, astral, control characters, quotes, backslashes, line separators.
AWKWARD = 'naïve ☃ 😀 𝄞 \x00\x1f\x7f "q" \\ / \u2028 é'
# An int64 sequence beyond 2^53: JSON.parse would round it.
BIG_SEQUENCE = 2**62 + 1


def _golden_event(kind: str) -> Event:
    structured = json.loads((EXAMPLES / f"{kind}.json").read_text(encoding="utf-8"))
    return decode_pubsub({"content-type": STRUCTURED_CONTENT_TYPE}, dumps(structured))


def _token(sim: Simulator, event: Event, account: str = "default") -> str:
    """A format=full identity token bound to `event`, as the bridge asks for it (the simulator
    is, by default, the golden events' VM: same instance, zone and project)."""
    client = MetadataClient(sim.url)
    try:
        reading = client.get(
            f"instance/service-accounts/{account}/identity",
            params={"audience": origin.binding_of(event), "format": "full"},
        )
    finally:
        client.close()
    assert isinstance(reading.value, str)
    return reading.value


def _certs_url(sim: Simulator) -> str:
    return f"http://{sim.host_port}/simulator/v1/identity/certs"


def _rfc3339(at: float) -> str:
    return datetime.fromtimestamp(at, timezone.utc).isoformat(timespec="milliseconds")


@dataclasses.dataclass(frozen=True)
class Case:
    """One message on the wire, what Python's origin.check says of it, and a word the refusal
    names (so a case refused for another reason than the one planted fails)."""

    label: str
    attributes: dict[str, str]
    payload: bytes
    published: float
    verified: bool
    attested: bool
    because: str


def _tampered(payload: bytes, mode: str) -> bytes:
    body = json.loads(payload)
    data = body if mode == "binary" else body["data"]
    data["current"] = "TERMINATE_ON_HOST_MAINTENANCE"
    return dumps(body)


def _cases(sim: Simulator) -> list[Case]:
    """Genuine and forged messages in both modes, each judged by bridge/origin.py first."""
    started = _golden_event("maintenance.started")
    awkward = dataclasses.replace(
        started,
        subject=AWKWARD,
        data=dataclasses.replace(
            started.data, previous=AWKWARD, current=AWKWARD[::-1], sequence=BIG_SEQUENCE
        ),
    )
    ended = _golden_event("maintenance.ended")
    cloud = _golden_event("cloud.migrated")
    sim.set_value("instance/id", "999")  # another VM of the fleet asks for a token
    try:
        other_vm = _token(sim, started)
    finally:
        sim.set_value("instance/id", started.data.instance.id)
    now = time.time()
    made: list[tuple[str, Event, float, str]] = [
        ("genuine", origin.with_token(started, _token(sim, started)), now, ""),
        ("awkward", origin.with_token(awkward, _token(sim, awkward)), now, ""),
        ("cloud", origin.with_token(cloud, _token(sim, cloud, CLOUD_IDENTITY)), now, ""),
        ("(a) another VM's token", origin.with_token(started, other_vm), now, "instance_id"),
        ("(b) replayed", origin.with_token(ended, _token(sim, started)), now, "audience"),
        ("(d) unattested", started, now, "unattested"),
        ("(e) cloud, wrong account", origin.with_token(cloud, _token(sim, cloud)), now, "cloud"),
        (
            "published after its token expired",
            origin.with_token(started, _token(sim, started)),
            now + 5 * 3600,
            "not valid",
        ),
    ]
    certs = sim.identity.certs()
    cases = []
    for mode in ("binary", "structured"):
        wires = [(label, *event.to_pubsub(mode), at, because) for label, event, at, because in made]
        genuine = wires[0]
        tampered = _tampered(genuine[2], mode)
        wires.append(("(c) tampered", genuine[1], tampered, now, "audience"))
        for label, attributes, payload, at, because in wires:
            verdict = origin.check(
                decode_pubsub(attributes, payload),
                at=at,
                certs=certs,
                cloud_identity=CLOUD_IDENTITY,
            )
            assert because in verdict.reason, (label, verdict)  # the contract's own verdict
            cases.append(
                Case(
                    f"{label}, {mode}",
                    attributes,
                    payload,
                    at,
                    verdict.verified,
                    verdict.attested,
                    because,
                )
            )
    assert [c.verified for c in cases].count(True) == 6  # genuine, awkward, cloud; two modes
    return cases


def _origin_env(sim: Simulator) -> dict[str, str]:
    return {"ATTESTATION_CERTS_URL": _certs_url(sim), "CLOUD_EVENTS_IDENTITY": CLOUD_IDENTITY}


def test_node_consumer_verifies_origin_as_python_does(node: str, sim: Simulator) -> None:
    """Every case on the pulled path with its publish time; genuine events on every delivery
    path (the publish time from the message, or the time received on an HTTP path)."""
    cases = _cases(sim)
    pulled = [
        {
            "delivery": "pubsub",
            "attributes": c.attributes,
            "data": _b64(c.payload),
            "publishTime": _rfc3339(c.published),
        }
        for c in cases
    ]
    paths = [
        d
        for c in cases
        if c.verified
        for d in _deliveries(c.attributes, c.payload, _rfc3339(c.published)).values()
    ]
    results = _run_node(node, pulled + paths, _origin_env(sim))
    for case, result in zip(cases, results[: len(cases)], strict=True):
        assert result["ok"], (case.label, result)
        assert (result["verified"], result["attested"]) == (case.verified, case.attested), (
            case.label,
            result,
        )
        assert case.because in result["reason"], (case.label, result)
        assert result["act"] is case.verified, case.label
    awkward = [r for c, r in zip(cases, results[: len(cases)], strict=True) if "awkward" in c.label]
    assert {r["sequence"] for r in awkward} == {str(BIG_SEQUENCE)}
    assert len(paths) == 6 * 5
    assert all(r["verified"] for r in results[len(cases) :])


def test_node_consumer_acts_on_unverified_events_only_when_told(node: str, sim: Simulator) -> None:
    case = next(c for c in _cases(sim) if c.label.startswith("(a)"))
    line = {"delivery": "pubsub", "attributes": case.attributes, "data": _b64(case.payload)}
    env = {**_origin_env(sim), "REQUIRE_ATTESTATION": "false"}
    (result,) = _run_node(node, [line], env)
    assert (result["verified"], result["act"]) == (False, True), result


def test_go_consumer_verifies_origin_as_python_does(
    go: str, sim: Simulator, tmp_path: Path
) -> None:
    """Every case as a push body (its publishTime the time the token is judged at)."""
    cases = _cases(sim)
    files = []
    for n, case in enumerate(cases):
        path = tmp_path / f"{n}.json"
        message = _message(case.attributes, case.payload, _rfc3339(case.published))
        path.write_text(json.dumps({"message": message}), encoding="utf-8")
        files.append(str(path))
    done = subprocess.run(
        [
            go,
            "run",
            ".",
            "-certs-url",
            _certs_url(sim),
            "-cloud-identity",
            CLOUD_IDENTITY,
            *files,
        ],
        cwd=GO_DIR,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == len(cases), done.stdout
    for case, line in zip(cases, lines, strict=True):
        said = line.split(" origin=", 1)[1]
        if case.verified:
            assert said == "verified", (case.label, line)
        else:
            assert said.startswith("unverified (") and said.endswith("not acted on"), line
            assert case.because in said, (case.label, line)
    awkward = [line for c, line in zip(cases, lines, strict=True) if "awkward" in c.label]
    assert all(f" seq={BIG_SEQUENCE} " in line for line in awkward), awkward


# JSON texts whose canonical forms differ between naive encoders: Python's is the contract.
CANONICAL_TEXTS = [
    '{"b":1,"a":[true,false,null],"A":{},"":[]}',
    '{"\\u00e9":"na\\u00efve \\u2603","astral":"\\ud83d\\ude00 \\ud834\\udd1e"}',
    '"\\u0000\\u0001\\u001f\\u007f\\b\\f\\n\\r\\t\\u2028\\u2029\\"\\\\/\'"',
    '{"raw":"naïve ☃ 😀 \u0080 \u00ff"}',
    "[12345678901234567890123,-18446744073709551616,9223372036854775807,-0,0,1,-1]",
    "[1.0,1.5,1e16,1E15,1e-5,0.0001,0.00001,-0.0,1e300,123456789.125,1e400,-1e400,1e-400]",
    "[2.5e-7,100e-2,1234567890123456.0,12345678901234567.0,0.1,5e-324,1.7976931348623157e308]",
    '{"\\uffff":1,"\\ud83d\\ude00":2,"\\ue000":3,"z":4,"Z":5,"\\u00e9":6,"e\\u0301":7}',
    '{"__proto__":{"x":1},"constructor":2,"toString":3}',
    ' { "sp" : [ 1 , 2 , { } ] } ',
]
# A lone surrogate escape: Python keeps it, Node too; Go's encoding/json makes it U+FFFD
# (consumer.go says so: such an event fails closed there, and no bridge can send one).
LONE_SURROGATE = '{"lone":"\\udc00x\\ud800"}'


def _assert_canonical_is_pythons(command: list[str], cwd: Path, texts: list[str]) -> None:
    """`command` reads one JSON text a line and writes its canonical form a line."""
    done = subprocess.run(
        command,
        cwd=cwd,
        input="".join(t + "\n" for t in texts),
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    python = [origin.canonical(json.loads(t)).decode("ascii") for t in texts]
    assert done.stdout.splitlines() == python


def test_node_canonical_form_is_pythons(node: str) -> None:
    script = (
        'const {parseExact, canonical} = require("./origin");'
        'const lines = require("fs").readFileSync(0, "utf8").split("\\n").filter(Boolean);'
        'for (const l of lines) process.stdout.write(canonical(parseExact(l)) + "\\n");'
    )
    _assert_canonical_is_pythons([node, "-e", script], NODE_DIR, [*CANONICAL_TEXTS, LONE_SURROGATE])


def test_go_canonical_form_is_pythons(go: str) -> None:
    _assert_canonical_is_pythons([go, "run", ".", "canonical"], GO_DIR, CANONICAL_TEXTS)


# -- A real bridge's events --------------------------------------------------------------------


@pytest.fixture
def bridge_events(sim: Simulator, tmp_path: Path) -> list[bytes]:
    """What `maintenance-bridge run --attest on` wrote (stdout sink: the structured event as
    every sink sends it) for a migration's notice and end, each as the bridge serialised it."""
    bridge = BridgeProcess(sim.url, tmp_path / "state", "--keys", MAINTENANCE, "--attest", "on")
    try:
        wait_for("the first long-poll", lambda: sim.stats().get(MAINTENANCE, 0) >= 1)
        got = []
        for value in ("MIGRATE_ON_HOST_MAINTENANCE", "NONE"):
            sim.set_value(MAINTENANCE, value)
            got.append(bridge.next_event(timeout=15)[1])
    finally:
        assert bridge.terminate() == 0
    return [dumps(event) for event in got]


def _both_modes(structured: bytes) -> list[tuple[dict[str, str], bytes]]:
    """The bridge's event as a Pub/Sub message in each content mode, as its Pub/Sub sink
    encodes it (`Event.to_pubsub`, the attestation extensions included)."""
    event = decode_pubsub({"content-type": STRUCTURED_CONTENT_TYPE}, structured)
    assert origin.token_of(event) is not None
    return [({"content-type": STRUCTURED_CONTENT_TYPE}, structured), event.to_pubsub("binary")]


def test_a_real_bridges_events_verify_in_node_and_go(
    node: str, go: str, sim: Simulator, bridge_events: list[bytes], tmp_path: Path
) -> None:
    published = _rfc3339(time.time())
    messages = [m for structured in bridge_events for m in _both_modes(structured)]
    lines = [
        {"delivery": "pubsub", "attributes": a, "data": _b64(p), "publishTime": published}
        for a, p in messages
    ]
    results = _run_node(node, lines, _origin_env(sim))
    assert [(r["verified"], r["act"]) for r in results] == [(True, True)] * len(messages), results
    files = []
    for n, (attributes, payload) in enumerate(messages):
        path = tmp_path / f"{n}.json"
        path.write_text(json.dumps({"message": _message(attributes, payload, published)}))
        files.append(str(path))
    done = subprocess.run(
        [go, "run", ".", "-certs-url", _certs_url(sim), "-cloud-identity", CLOUD_IDENTITY, *files],
        cwd=GO_DIR,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    said = [line.split(" origin=", 1)[1] for line in done.stdout.splitlines()]
    assert said == ["verified"] * len(messages), done.stdout
