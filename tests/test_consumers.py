"""The contract in other languages' shoes: the Node and Go consumer examples.

Node: `examples/consumers/node/consumer.js` (the official CloudEvents JavaScript SDK, ajv with the
published consumer schema) reads every golden event through every delivery path a subscriber
meets: a pulled Pub/Sub message, a push request body, and the HTTP request Eventarc sends for a
`messagePublished` event, in both content modes. A planted bad event must fail. Its packages
come from the committed package-lock.json (`npm ci`, cached in its git-ignored node_modules).

Go: `examples/consumers/go/` is standard library only; where a Go toolchain is installed it must
be gofmt-clean, pass `go vet` and its own `go test`, and decode the golden messages.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from bridge.events import CLOUD_KINDS, STRUCTURED_CONTENT_TYPE, dumps
from bridge.events import KINDS as BRIDGE_KINDS

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


def _message(attributes: dict[str, str], payload: bytes) -> dict[str, Any]:
    return {
        "attributes": attributes,
        "data": _b64(payload),
        "messageId": "2070443601311540",
        "message_id": "2070443601311540",
        "publishTime": "2030-01-20T02:00:01.100Z",
        "publish_time": "2030-01-20T02:00:01.100Z",
        "orderingKey": attributes.get("ce-instanceid", ""),
    }


def _deliveries(attributes: dict[str, str], payload: bytes) -> dict[str, dict[str, Any]]:
    """label -> one delivery line for consumer.js, for every path a subscriber meets."""
    subscription = "projects/demo-project/subscriptions/maintenance-events"
    published = {"subscription": subscription, "message": _message(attributes, payload)}
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
        "pull": {"delivery": "pubsub", "attributes": attributes, "data": _b64(payload)},
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


def _run_node(node: str, deliveries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    done = subprocess.run(
        [node, "consumer.js"],
        cwd=NODE_DIR,
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
