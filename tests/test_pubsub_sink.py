"""The Pub/Sub sink's two transports, held to one contract against the official emulator.

REST (the default, the standard library) and gRPC (google-cloud-pubsub) must be
interchangeable: the same message on the topic (binary or structured mode, ordering key =
instance id), the same pause-and-resume of a key after a failed publish, the same failure
classes. The access-token path (which the emulator does not check) is tested against the
simulator's token endpoint and a loopback stand-in for the API that insists on the token.
Finally, the default path must not load gRPC at all: that is what halves the bridge's memory.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

import pytest
from support.bridge import BridgeProcess
from support.harness import free_port, wait_for
from support.pubsub import PubSubAdmin, PubSubServer, admin

from bridge.events import (
    MAINTENANCE,
    Event,
    Instance,
    Scheduling,
    Transition,
    build_event,
    decode_pubsub,
)
from bridge.simulator import Simulator
from bridge.sinks import sink_type
from bridge.sinks.pubsub import TRANSPORTS, PubSubOptions, PubSubSink, classify, hint
from bridge.sinks.pubsub.rest import (
    TOKEN_PATH,
    MetadataTokens,
    PublishFailed,
    RestTransport,
)

REPO = Path(__file__).resolve().parents[1]
INSTANCE = Instance("4520031799277035437", "vm-1", "projects/1/zones/us-central1-a", "p-1", "1")
SCHEDULING = Scheduling(on_host_maintenance="MIGRATE", automatic_restart="TRUE")


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def adm(pubsub: PubSubServer) -> Iterator[PubSubAdmin]:
    with admin(pubsub) as a:
        yield a


@pytest.fixture
def topic(adm: PubSubAdmin) -> tuple[str, str]:
    suffix = uuid.uuid4().hex[:10]
    path = adm.create_topic(f"sink-{suffix}")
    return path, adm.create_subscription(path, f"sink-sub-{suffix}", ordering=True)


def sink_for(server: PubSubServer, topic: str, transport: str, **kw: Any) -> PubSubSink:
    options = PubSubOptions(
        topic=topic, pubsub_transport=transport, pubsub_emulator_host=server.host_port, **kw
    )
    return PubSubSink(options)


def event(sequence: int, instance: Instance = INSTANCE) -> Event:
    return build_event(
        Transition(MAINTENANCE, "NONE", "MIGRATE_ON_HOST_MAINTENANCE", "maintenance.started"),
        event_id=str(uuid.uuid4()),
        sequence=sequence,
        observed_at=datetime.now(timezone.utc),
        instance=instance,
        scheduling=SCHEDULING,
        happened_while_down=False,
        notice_seconds=60,
    )


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_events_arrive_in_order_under_their_ids_with_the_ordering_key(
    pubsub, adm, topic, transport, mode
):
    path, sub = topic
    sink = sink_for(pubsub, path, transport, content_mode=mode)
    sent = [event(i) for i in range(1, 8)]
    try:
        futures = [sink.send(e) for e in sent]
        ids = [f.result(timeout=30) for f in futures]
    finally:
        sink.close()
    assert len(set(ids)) == len(sent), "one message id per event"
    got = adm.pull_until(sub, len(sent))
    assert [m.ordering_key for m in got] == [INSTANCE.id] * len(sent)
    assert [decode_pubsub(m.attributes, m.data).id for m in got] == [e.id for e in sent]
    first = got[0]
    if mode == "binary":
        assert first.attributes["ce-id"] == sent[0].id
        assert first.attributes["content-type"] == "application/json"
        assert json.loads(first.data)["sequence"] == 1
    else:
        assert first.attributes["content-type"].startswith("application/cloudevents+json")
        assert json.loads(first.data)["id"] == sent[0].id


def test_a_failed_publish_pauses_its_key_until_recovered(pubsub, adm, topic, transport):
    """As the library does with message ordering: the key fails fast (class paused) until
    `recover`, another key is not held up, and after recovery the key publishes again."""
    path, sub = topic
    sink = sink_for(pubsub, path, transport)
    try:
        key = INSTANCE.id
        bad = sink.transport.publish(key, {}, b"")  # the emulator refuses an empty message
        with pytest.raises(Exception, match="empty") as refused:
            bad.result(timeout=30)
        assert classify(refused.value) == "other"
        held = event(1)
        with pytest.raises(Exception) as paused:
            sink.send(held).result(timeout=30)
        assert classify(paused.value) == "paused"
        other = event(1, Instance("77", "vm-2", INSTANCE.zone, "p-1", "1"))
        sink.send(other).result(timeout=30)
        sink.recover(held)
        sink.send(held).result(timeout=30)
    finally:
        sink.close()
    got = adm.pull_until(sub, 2)
    assert sorted(decode_pubsub(m.attributes, m.data).id for m in got) == sorted(
        [held.id, other.id]
    )


def test_missing_topic_is_not_found_and_the_hint_names_it(pubsub, transport):
    missing = f"projects/{pubsub.project}/topics/missing-{uuid.uuid4().hex[:8]}"
    sink = sink_for(pubsub, missing, transport)
    try:
        with pytest.raises(Exception) as failed:
            sink.send(event(1)).result(timeout=30)
    finally:
        sink.close()
    cls = classify(failed.value)
    assert cls == "not_found"
    assert missing in hint(cls, sink.options)


def test_nothing_listening_is_unavailable(transport):
    """A refused connection (the emulator gone) is an outage to wait out, not a refusal."""
    options = PubSubOptions(
        topic="projects/test-project/topics/gone",
        pubsub_transport=transport,
        pubsub_emulator_host=f"127.0.0.1:{free_port()}",
    )
    sink = PubSubSink(options)
    if transport == "grpc":  # the library waits for the channel until its own deadline
        sink.transport.timeout = 2.0
    try:
        with pytest.raises(Exception) as failed:
            sink.send(event(1)).result(timeout=30)
    finally:
        sink.close()
    assert classify(failed.value) == "unavailable", failed.value


# --- the access token ---------------------------------------------------------------------


def set_token(sim: Simulator, token: str, expires_in: int) -> None:
    payload = {"access_token": token, "expires_in": expires_in, "token_type": "Bearer"}
    sim.set_value(TOKEN_PATH, json.dumps(payload))


def test_the_token_is_cached_and_asked_again_before_it_expires(sim):
    tokens = MetadataTokens(sim.url)
    try:
        set_token(sim, "ya29.first", 3599)
        assert tokens.get() == "ya29.first"
        set_token(sim, "ya29.second", 3599)
        assert tokens.get() == "ya29.first", "a fresh token is reused"
        assert sim.stats()[TOKEN_PATH] == 1
        set_token(sim, "ya29.short", 60)  # under the refresh margin: asked every time
        tokens.forget()
        assert tokens.get() == "ya29.short"
        set_token(sim, "ya29.next", 3599)
        assert tokens.get() == "ya29.next"
    finally:
        tokens.close()


def token_failure(metadata_url: str) -> PublishFailed:
    """Why asking `metadata_url` for the access token failed."""
    tokens = MetadataTokens(metadata_url)
    try:
        with pytest.raises(PublishFailed) as failed:
            tokens.get()
    finally:
        tokens.close()
    return failed.value


def test_no_service_account_is_a_permission_failure(sim):
    failed = token_failure(sim.url)  # the simulator holds no token unless given one
    assert classify(failed) == "permission"
    assert str(failed) == f"access token: {TOKEN_PATH} answered 404"


class StandInApi(http.server.BaseHTTPRequestHandler):
    """A loopback stand-in for Pub/Sub's `topics.publish`, quiet, answering JSON."""

    def answer(self, status: int, payload: object) -> None:
        raw = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, format: str, *args: Any) -> None:
        return None


class TokenCheckingApi(StandInApi):
    """Stands in for Pub/Sub's authentication only (the emulator checks none): answers
    `topics.publish` as the API does when the bearer token is `accepted`, 401 otherwise."""

    accepted: ClassVar[str] = ""
    seen: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        auth = self.headers.get("Authorization", "")
        self.seen.append(auth)
        if auth != f"Bearer {self.accepted}":
            answer, status = {"error": {"code": 401, "status": "UNAUTHENTICATED"}}, 401
        else:
            answer, status = {"messageIds": [str(i) for i, _ in enumerate(body["messages"])]}, 200
        self.answer(status, answer)


def test_each_publish_carries_the_token_and_a_refused_one_is_replaced(sim):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), TokenCheckingApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    TokenCheckingApi.seen = []
    TokenCheckingApi.accepted = "ya29.good"
    set_token(sim, "ya29.revoked", 3599)
    transport = RestTransport(
        "projects/p-test1/topics/t-1",
        f"127.0.0.1:{server.server_address[1]}",
        secure=False,
        tokens=MetadataTokens(sim.url),
    )
    try:
        with pytest.raises(PublishFailed) as failed:
            transport.publish("k", {}, b"x").result(timeout=10)
        assert classify(failed.value) == "permission"
        set_token(sim, "ya29.good", 3599)
        transport.resume("k")
        assert transport.publish("k", {}, b"x").result(timeout=10) == "0"
    finally:
        transport.close()
        server.shutdown()
        server.server_close()
    assert TokenCheckingApi.seen == ["Bearer ya29.revoked", "Bearer ya29.good"]
    assert sim.stats()[TOKEN_PATH] == 2, "the refused token was forgotten, the new one asked"


class KeepAliveApi(StandInApi):
    """Stands in for `topics.publish` with HTTP/1.1 keep-alive; records the connections
    accepted, each request's messages and the thread of the client that was waiting."""

    protocol_version = "HTTP/1.1"
    connections: ClassVar[list[int]] = []
    requests: ClassVar[list[list[str]]] = []

    def setup(self) -> None:
        super().setup()
        self.connections.append(len(self.connections))

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        data = [base64.b64decode(m["data"]).decode() for m in body["messages"]]
        assert {m["orderingKey"] for m in body["messages"]} == {"k"}
        self.requests.append(data)
        number = len(self.requests)
        self.answer(200, {"messageIds": [f"{number}-{i}" for i in range(len(data))]})


def test_rest_publishes_on_the_calling_thread_over_one_connection():
    """What keeps REST quicker than gRPC: one kept-alive connection (no connect per publish),
    and no thread between the event and its acknowledgement: `publish` returns with the
    answer in hand (the future already resolved) and the transport starts no thread."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), KeepAliveApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    KeepAliveApi.connections, KeepAliveApi.requests = [], []
    before = set(threading.enumerate())
    transport = RestTransport(
        "projects/p-test1/topics/t-1",
        f"127.0.0.1:{server.server_address[1]}",
        secure=False,
        tokens=None,
    )
    try:
        futures = [transport.publish("k", {}, str(i).encode()) for i in range(4)]
        done = [f.done() for f in futures]
        ids = [f.result(timeout=0) for f in futures]
        started = {  # the stand-in server's own request threads aside
            t.name
            for t in set(threading.enumerate()) - before
            if "process_request_thread" not in t.name
        }
    finally:
        transport.close()
        server.shutdown()
        server.server_close()
    assert done == [True] * 4, "each publish answered before it returned"
    assert KeepAliveApi.requests == [["0"], ["1"], ["2"], ["3"]]
    assert ids == ["1-0", "2-0", "3-0", "4-0"]
    assert KeepAliveApi.connections == [0], "one connection for every publish"
    assert started == set(), f"threads of the transport's own: {started}"


class SilentApi(StandInApi):
    """Reads a publish and never answers (a front end that froze)."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        time.sleep(30)


def test_close_ends_a_publish_the_server_never_answers():
    """At stop the daemon closes the sink: a publish stuck on a frozen server fails at once
    (its connection shut under it) rather than holding the bridge for the request timeout,
    and it does not reconnect to try again."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SilentApi)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    transport = RestTransport(
        "projects/p-test1/topics/t-1",
        f"127.0.0.1:{server.server_address[1]}",
        secure=False,
        tokens=None,
    )
    result: list[Future[str]] = []
    publisher = threading.Thread(target=lambda: result.append(transport.publish("k", {}, b"x")))
    try:
        publisher.start()
        time.sleep(0.3)  # the request is written and waits for its answer
        t0 = time.monotonic()
        transport.close()
        publisher.join(5)
        took = time.monotonic() - t0
    finally:
        server.shutdown()
        server.server_close()
    assert not publisher.is_alive() and took < 2, took
    with pytest.raises(Exception) as failed:
        result[0].result(timeout=0)
    assert classify(failed.value) in ("unavailable", "other"), failed.value
    assert transport.publish("k2", {}, b"y").exception(timeout=0) is not None, "closed stays closed"


# --- the default path stays light -----------------------------------------------------------

PROBE = """
import sys
from bridge.cli import parser
from bridge.config import build
from bridge.sinks import make_sink
from bridge.sinks.pubsub import PubSubSink
args = parser().parse_args(["run", *sys.argv[2:]])
config = build(args, {"PUBSUB_EMULATOR_HOST": sys.argv[1]}, check_dirs=False)
sink = make_sink(config)
sink.connect()
print(sink.transport.publish("k", {"ce-id": "probe"}, b"{}").result(timeout=30))
heavy = ("grpc", "google.protobuf", "google.api_core", "google.cloud.pubsub_v1")
print(" ".join(sorted(m for m in sys.modules if m in heavy)))
"""


@pytest.mark.parametrize("flags", [(), ("--pubsub-transport", "grpc")], ids=["rest", "grpc"])
def test_the_default_path_never_imports_grpc(pubsub, topic, flags):
    result = subprocess.run(
        [sys.executable, "-c", PROBE, pubsub.host_port, "--topic", topic[0], *flags],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    message_id, loaded = [*result.stdout.splitlines(), ""][:2]
    assert message_id
    if flags:  # the check can fail: the gRPC transport loads all of it
        heavy = ("grpc", "google.protobuf", "google.api_core", "google.cloud.pubsub_v1")
        assert loaded.split() == sorted(heavy)
    else:
        assert loaded == "", f"the REST path loaded {loaded}"


def test_the_pubsub_options_are_the_sinks_own(tmp_path):
    """The registry fills the sink's option type from the Config, nothing more."""
    from bridge.config import Config

    config = Config(
        topic="projects/p-test1/topics/t-1",
        sink="pubsub",
        pubsub_transport="grpc",
        pubsub_endpoint="us-east1-pubsub.googleapis.com",
        state_dir=tmp_path,
    )
    options = sink_type("pubsub").settings_from(config)
    assert options == PubSubOptions(
        topic="projects/p-test1/topics/t-1",
        pubsub_transport="grpc",
        pubsub_endpoint="us-east1-pubsub.googleapis.com",
        metadata_url=config.metadata_url,
    )


# --- the real bridge, both transports ---------------------------------------------------------


def test_the_bridge_delivers_every_event_once_in_order(pubsub, adm, topic, transport, tmp_path):
    """`maintenance-bridge run --topic` with heartbeats on: every transition arrives once, in
    order, in binary mode under its ordering key; no error line."""
    path, sub = topic
    state = tmp_path / "state"
    state.mkdir()
    with Simulator().start() as sim:
        bridge = BridgeProcess(
            sim.url, state, "--topic", path, "--pubsub-transport", transport,
            "--heartbeat-interval", "0.5", "--keys", MAINTENANCE,
            env=pubsub.env(),
        )  # fmt: skip
        try:
            wait_for("the first long-poll", lambda: sim.stats().get(MAINTENANCE, 0) >= 1)
            values = ["MIGRATE_ON_HOST_MAINTENANCE", "NONE"] * 3
            for i, value in enumerate(values, start=1):
                sim.set_value(MAINTENANCE, value)
                # Heartbeats take sequence numbers too: count the recorded transitions.
                wait_for(
                    f"transition {i} recorded",
                    lambda i=i: (
                        len([r for r in bridge.logs() if r["message"].startswith("maintenance.")])
                        >= i
                    ),
                    timeout=15,
                )
            events: dict[str, Event] = {}
            copies: list[str] = []
            deadline = time.monotonic() + 60

            def done() -> bool:
                kinds = [e.kind for e in events.values()]
                beats = kinds.count("bridge.heartbeat")
                return beats > 0 and len(kinds) - beats == len(values)

            while not done():
                assert time.monotonic() < deadline, [e.kind for e in events.values()]
                for m in adm.pull_until(sub, 1, timeout=15):
                    decoded = decode_pubsub(m.attributes, m.data)
                    assert m.ordering_key == decoded.extensions["instanceid"]
                    assert "ce-id" in m.attributes, "binary mode"
                    copies.append(decoded.id)
                    events.setdefault(decoded.id, decoded)
        finally:
            assert bridge.terminate() == 0, bridge.logs()[-5:]
    notices = [e for e in events.values() if e.kind != "bridge.heartbeat"]
    assert [e.kind for e in notices] == ["maintenance.started", "maintenance.ended"] * 3
    sequences = [e.data.sequence for e in events.values()]
    assert sequences == sorted(sequences), "in order"
    assert len(copies) == len(set(copies)), "once"
    assert any(e.kind == "bridge.heartbeat" for e in events.values())
    assert not [r for r in bridge.logs() if r.get("severity") == "ERROR"], bridge.logs()[-5:]


# --- the REST transport's answers, one by one ---------------------------------------------------


class ScriptedApi(StandInApi):
    """Answers every publish with `status` and `payload` (raw bytes when `payload` is bytes)."""

    status: ClassVar[int] = 200
    payload: ClassVar[object] = {}

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        if isinstance(self.payload, bytes):
            self.send_response(self.status)
            self.send_header("Content-Length", str(len(self.payload)))
            self.end_headers()
            self.wfile.write(self.payload)
        else:
            self.answer(self.status, self.payload)


@contextlib.contextmanager
def scripted(status: int, payload: object) -> Iterator[RestTransport]:
    """A REST transport publishing to a ScriptedApi that answers `status` and `payload`."""
    ScriptedApi.status, ScriptedApi.payload = status, payload
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ScriptedApi)
    threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()
    host = f"127.0.0.1:{server.server_address[1]}"
    transport = RestTransport("projects/p-test1/topics/t-1", host, secure=False, tokens=None)
    try:
        yield transport
    finally:
        transport.close()
        server.shutdown()
        server.server_close()


def publish_against(status: int, payload: object) -> Future[str]:
    with scripted(status, payload) as transport:
        return transport.publish("k", {"ce-id": "1"}, b"x")


NOT_FOUND = {"error": {"code": 404, "status": "NOT_FOUND", "message": "Resource not found"}}


@pytest.mark.parametrize(
    ("status", "payload", "failure", "text"),
    [
        (200, {"messageIds": ["7"]}, None, "7"),
        (200, {"messageIds": 7}, "other", "one message published, ids 7"),
        (200, {"messageIds": ["7", "8"]}, "other", "one message published"),
        (200, {"ids": ["7"]}, "other", "HTTP 200 without messageIds"),
        (200, b"not json", "other", "HTTP 200 without messageIds"),
        (404, NOT_FOUND, "not_found", "HTTP 404 NOT_FOUND: Resource not found"),
        (401, {"error": {"status": "UNAUTHENTICATED"}}, "permission", "HTTP 401 UNAUTHENTICATED: "),
        (403, {"error": {"message": "denied"}}, "permission", "HTTP 403 : denied"),
        (400, b"<html>bad</html>", "other", "HTTP 400: <html>bad</html>"),
        (408, {}, "unavailable", "HTTP 408: {}"),
        (429, {}, "unavailable", "HTTP 429"),
        (499, {}, "unavailable", "HTTP 499"),
        (500, {}, "unavailable", "HTTP 500"),
        (503, {"error": "a string"}, "unavailable", "HTTP 503: "),
        (402, {}, "other", "HTTP 402"),
        (498, {}, "other", "HTTP 498"),
    ],
)
def test_each_answer_of_the_api_is_an_id_or_a_failure_of_its_class(status, payload, failure, text):
    """The relay's retries and the outage lines rest on the class; the operator reads the
    API's own error (its status and message, short)."""
    future = publish_against(status, payload)
    if failure is None:
        assert future.result(0) == text
        return
    error = future.exception(0)
    assert isinstance(error, PublishFailed), error
    assert (classify(error), str(error)[: len(text)]) == (failure, text)


def test_a_long_error_is_cut():
    answer = {"error": {"status": "INVALID_ARGUMENT", "message": "x" * 2000}}
    assert len(str(publish_against(400, answer).exception(0))) == 500
    assert str(publish_against(400, b"y" * 2000).exception(0)) == "HTTP 400: " + "y" * 200


def test_each_transport_is_built_for_where_it_publishes():
    from bridge.sinks.pubsub import new_transport

    topic = "projects/p-test1/topics/t-1"
    emulator = new_transport(PubSubOptions(topic=topic, pubsub_emulator_host="127.0.0.1:8085"))
    assert isinstance(emulator, RestTransport)
    assert (emulator.host, emulator.secure, emulator.tokens) == ("127.0.0.1:8085", False, None)
    assert emulator.path == f"/v1/{topic}:publish"
    default = new_transport(PubSubOptions(topic=topic, metadata_url="http://10.9.9.9/v1/"))
    assert isinstance(default, RestTransport)
    assert (default.host, default.secure) == ("pubsub.googleapis.com", True)
    assert isinstance(default.tokens, MetadataTokens)
    assert default.tokens.metadata_url == "http://10.9.9.9/v1/"
    regional = new_transport(
        PubSubOptions(topic=topic, pubsub_endpoint="us-east1-pubsub.googleapis.com:8443")
    )
    assert isinstance(regional, RestTransport)
    assert (regional.host, regional.secure) == ("us-east1-pubsub.googleapis.com:8443", True)


@pytest.mark.parametrize(
    ("answer", "failure"),
    [
        ({"token_type": "Bearer"}, "unavailable"),
        ({"access_token": 7}, "unavailable"),
        (["ya29.x"], "unavailable"),
    ],
    ids=["no access_token", "not a string", "not an object"],
)
def test_a_token_answer_that_is_no_token_is_an_outage(sim, answer, failure):
    """What the metadata server answers is read, not trusted: the publish fails as an outage
    (retried), never with a token of None or an AttributeError."""
    sim.set_value(TOKEN_PATH, json.dumps(answer))
    failed = token_failure(sim.url)
    assert (classify(failed), str(failed)) == (
        failure,
        f"access token: {TOKEN_PATH} is not a token",
    )


def test_an_unreachable_metadata_server_is_an_outage():
    failed = token_failure(f"http://127.0.0.1:{free_port()}/computeMetadata/v1/")
    assert classify(failed) == "unavailable"
    assert str(failed).startswith("access token: ")


@pytest.mark.parametrize("expires_in", [None, "3599", 0], ids=["absent", "a string", "zero"])
def test_a_token_without_a_usable_lifetime_is_asked_again_every_time(sim, expires_in):
    """Without a lifetime the bridge can read, the token is never cached (cached for ever,
    it would be refused an hour later)."""
    payload: dict[str, object] = {"access_token": "ya29.a", "token_type": "Bearer"}
    if expires_in is not None:
        payload["expires_in"] = expires_in
    sim.set_value(TOKEN_PATH, json.dumps(payload))
    tokens = MetadataTokens(sim.url)
    try:
        assert tokens.get() == "ya29.a"
        assert tokens.get() == "ya29.a"
    finally:
        tokens.close()
    assert sim.stats()[TOKEN_PATH] == 2


def test_after_close_nothing_is_published_and_no_connection_is_opened():
    """The daemon closes the sink as it stops: a publish after that fails (its event stays
    in the outbox for the next start) instead of opening a connection of its own."""
    from bridge.sinks.pubsub.rest import Closed

    with scripted(200, {"messageIds": ["1"]}) as transport:
        assert transport.publish("k", {}, b"x").result(0) == "1"
        transport.close()
        assert isinstance(transport.publish("k", {}, b"x").exception(0), Closed)
        assert transport._reader is None
