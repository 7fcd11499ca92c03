"""`--sink http`: CloudEvents POSTed to real receivers, durably, with a Google-signed identity.

The bridge runs as a real subprocess against the simulator, whose identity endpoint signs ID
tokens with a test key. Two receivers: the `cloudevents` SDK's `from_http` behind a plain HTTP
server in this process (its answers are steered per test: an outage, a refusal, a redirect, a
rate limit), and functions-framework running tests/fixtures/ce-receiver as a CloudEvent
function. Both verify the token (signature against the simulator's certificate, audience,
expiry) with google-auth, and both parse binary and structured content mode.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from cloudevents.http import from_http
from google.auth import exceptions as auth_exceptions
from google.auth import jwt
from support.bridge import BridgeProcess
from support.harness import free_port, wait_for

from bridge.keys import MAINTENANCE
from bridge.simulator import Simulator

REPO = Path(__file__).resolve().parents[1]
FUNCTION = REPO / "tests" / "fixtures" / "ce-receiver" / "main.py"
FRAMEWORK = Path(sys.executable).with_name("functions-framework")
AUDIENCE = "https://receiver.example.run.app"
SECRET = "header-value-that-must-never-be-logged"
MIGRATE = "MIGRATE_ON_HOST_MAINTENANCE"
PREFIX = "io.github.maintenancebridge.gce.v1."
SA_EMAIL = "123456789012-compute@developer.gserviceaccount.com"


# --- the plain receiver (cloudevents SDK) -----------------------------------------------------


class Receiver:
    """A CloudEvents receiver; `answer(event) -> (status, headers, body) | None` steers it
    (None: accept with 200). Every request is recorded, accepted or not."""

    def __init__(
        self, sim: Simulator, audience: str | None = AUDIENCE, tls: ssl.SSLContext | None = None
    ) -> None:
        self.sim = sim
        self.audience = audience
        self.answer: Callable[[Any], tuple[int, dict[str, str], bytes] | None] = lambda e: None
        self.requests: list[dict[str, Any]] = []
        self.accepted: list[Any] = []  # CloudEvents, in arrival order (duplicates kept)
        self.peers: set[tuple[str, int]] = set()
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:
                return None

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                status, headers, reply = receiver.handle(self, body)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/events"
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
            self.url = f"https://localhost:{self.server.server_address[1]}/events"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def handle(
        self, request: BaseHTTPRequestHandler, body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        headers = dict(request.headers.items())
        with self.lock:
            self.peers.add(request.client_address)
            self.requests.append({"path": request.path, "headers": headers, "at": time.monotonic()})
        if self.audience:
            try:
                self.claims(headers)
            except (ValueError, auth_exceptions.GoogleAuthError) as exc:
                return 401, {}, f"token refused: {exc}".encode()
        event = from_http(headers, body)
        steered = self.answer(event)
        if steered is not None:
            return steered
        with self.lock:
            self.accepted.append(event)
        return 200, {}, b""

    def claims(self, headers: dict[str, str]) -> dict[str, Any]:
        """Signature (the simulator's certificate), audience and expiry, by google-auth."""
        scheme, _, token = headers.get("Authorization", "").partition(" ")
        if scheme != "Bearer":
            raise ValueError("no bearer token")
        return dict(jwt.decode(token, certs=self.sim.identity.certs(), audience=self.audience))

    def ids(self) -> set[str]:
        with self.lock:
            return {event["id"] for event in self.accepted}

    def sequences(self) -> dict[int, set[str]]:
        """Accepted ids by data.sequence: deduplicated on id, as a receiver must."""
        out: dict[int, set[str]] = {}
        with self.lock:
            for event in self.accepted:
                out.setdefault(event.get_data()["sequence"], set()).add(event["id"])
        return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver(sim: Simulator) -> Iterator[Receiver]:
    rx = Receiver(sim)
    yield rx
    rx.close()


def start_bridge(
    sim: Simulator, state_dir: Path, url: str, *args: str, env: dict[str, str] | None = None
) -> BridgeProcess:
    """A bridge on the http sink; google-auth finds the simulator through GCE_METADATA_HOST."""
    return BridgeProcess(
        sim.url,
        state_dir,
        "--sink",
        "http",
        "--http-url",
        url,
        "--retry-cap",
        "0.2",
        *args,
        env={"GCE_METADATA_HOST": sim.host_port, **(env or {})},
    )


def flip(sim: Simulator, value: str, bridge: BridgeProcess, sequence: int) -> None:
    """Change maintenance-event and wait until the bridge has recorded it as `sequence`."""
    sim.set_value(MAINTENANCE, value)
    recorded = re.compile(rf"\(event [0-9a-f-]{{36}}, sequence {sequence}\b")
    wait_for(
        f"event {sequence} recorded",
        lambda: any(recorded.search(r.get("message", "")) for r in bridge.logs()),
        detail=lambda: bridge.logs()[-5:],
    )


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def status_of(state_dir: Path) -> dict[str, Any]:
    result = run_cli("status", "--state-dir", str(state_dir), "--json")
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def no_secret_logged(bridge: BridgeProcess, *secrets: str) -> None:
    text = bridge.log_path.read_text(errors="replace")
    for secret in secrets:
        assert secret not in text, "a header value or token reached the bridge's log"


# --- the token path, offline ------------------------------------------------------------------


def test_simulator_identity_tokens_verify_with_google_auth(sim: Simulator) -> None:
    """The token google-auth fetches from the simulator passes `verify_token` with the served
    certificates for its audience only, and not once expired."""
    from google.auth.transport.requests import Request
    from google.oauth2 import id_token

    session = requests.Session()
    ask = f"{sim.url}instance/service-accounts/default/identity"
    flavor = {"Metadata-Flavor": "Google"}
    assert session.get(ask, headers=flavor, timeout=5).status_code == 400  # no audience
    token = session.get(
        ask, params={"audience": AUDIENCE, "format": "full"}, headers=flavor, timeout=5
    ).text
    certs = f"http://{sim.host_port}/simulator/v1/identity/certs"
    claims = id_token.verify_token(token, Request(session), audience=AUDIENCE, certs_url=certs)
    assert claims["email"] == SA_EMAIL
    assert claims["google"]["compute_engine"]["instance_name"] == "demo-vm"
    with pytest.raises(ValueError, match="audience"):
        id_token.verify_token(token, Request(session), audience="https://other", certs_url=certs)
    sim.identity.configure(lifetime=-60)
    expired = session.get(ask, params={"audience": AUDIENCE}, headers=flavor, timeout=5).text
    with pytest.raises(ValueError, match="expired"):
        id_token.verify_token(expired, Request(session), audience=AUDIENCE, certs_url=certs)


# --- delivery to real receivers ---------------------------------------------------------------


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_sdk_receiver_gets_events_in_order_with_a_verified_token(
    sim: Simulator, receiver: Receiver, tmp_path: Path, mode: str
) -> None:
    bridge = start_bridge(
        sim,
        tmp_path / "state",
        receiver.url,
        "--content-mode",
        mode,
        "--http-audience",
        AUDIENCE,
        "--http-header",
        "X-Api-Key=env:RECEIVER_KEY",
        "--log-level",
        "DEBUG",
        env={"RECEIVER_KEY": SECRET},
    )
    try:
        for sequence, value in enumerate([MIGRATE, "NONE", MIGRATE, "NONE"], start=1):
            flip(sim, value, bridge, sequence)
        wait_for("4 events accepted", lambda: len(receiver.ids()) == 4)
    finally:
        assert bridge.terminate() == 0
    events = receiver.accepted
    assert [e.get_data()["sequence"] for e in events] == [1, 2, 3, 4]  # in order
    assert [e["type"].removeprefix(PREFIX) for e in events] == [
        "maintenance.started",
        "maintenance.ended",
    ] * 2
    assert events[0]["source"].endswith("/instances/demo-vm")
    first = receiver.requests[0]["headers"]
    if mode == "binary":
        assert first["Content-Type"] == "application/json"
        assert first["ce-id"] == events[0]["id"] and first["ce-specversion"] == "1.0"
    else:
        assert first["Content-Type"].startswith("application/cloudevents+json")
        assert not any(name.lower().startswith("ce-") for name in first)
    assert first["X-Api-Key"] == SECRET
    claims = receiver.claims(first)
    assert claims["email"] == SA_EMAIL and claims["aud"] == AUDIENCE
    assert claims["exp"] > time.time() + 600
    tokens = {r["headers"]["Authorization"] for r in receiver.requests}
    assert sim.stats()["instance/service-accounts/default/identity"] == 1, "one token, cached"
    assert len(receiver.peers) == 1, "one keep-alive connection"
    no_secret_logged(bridge, SECRET, *(t.split(" ", 1)[1] for t in tokens))


@pytest.mark.skipif(not FRAMEWORK.exists(), reason="functions-framework is not installed")
@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_functions_framework_cloudevent_function_receives_both_modes(
    sim: Simulator, tmp_path: Path, mode: str
) -> None:
    certs = tmp_path / "certs.json"
    certs.write_text(json.dumps(sim.identity.certs()))
    log = tmp_path / "received.jsonl"
    port = free_port()
    env = {
        **os.environ,
        "RECEIVER_LOG": str(log),
        "RECEIVER_AUDIENCE": AUDIENCE,
        "RECEIVER_CERTS": str(certs),
    }
    function = subprocess.Popen(
        [
            str(FRAMEWORK),
            "--target=receive",
            "--signature-type=cloudevent",
            f"--source={FUNCTION}",
            "--host=127.0.0.1",
            f"--port={port}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/"
    bridge = None
    try:
        wait_for("functions-framework listening", lambda: _listening(port), timeout=60)
        bridge = start_bridge(
            sim, tmp_path / "state", url, "--content-mode", mode, "--http-audience", AUDIENCE
        )
        flip(sim, MIGRATE, bridge, 1)
        flip(sim, "NONE", bridge, 2)
        lines = wait_for(
            "2 events written by the function",
            lambda: (got := _lines(log)) and len(got) == 2 and got,
        )
    finally:
        if bridge is not None:
            assert bridge.terminate() == 0
        function.terminate()
        function.wait(10)
    assert [line["type"].removeprefix(PREFIX) for line in lines] == [
        "maintenance.started",
        "maintenance.ended",
    ]
    assert [line["data"]["sequence"] for line in lines] == [1, 2]
    assert all(line["caller"] == SA_EMAIL for line in lines), "token verified by the function"
    wanted = "application/json" if mode == "binary" else "application/cloudevents+json"
    assert all(line["content_type"].startswith(wanted) for line in lines)


def _listening(port: int) -> bool:
    try:
        requests.get(f"http://127.0.0.1:{port}/", timeout=1)
    except requests.ConnectionError:
        return False
    return True


def _lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- durability -------------------------------------------------------------------------------


def test_receiver_outage_and_kill_9_lose_nothing(
    sim: Simulator, receiver: Receiver, tmp_path: Path
) -> None:
    """While the receiver answers 503 the bridge records, retries and is SIGKILLed; a change
    happens while it is down; after the restart and the receiver's return every sequence number
    arrives, each accepted under one id."""
    state = tmp_path / "state"
    receiver.answer = lambda event: (503, {}, b"down for maintenance")
    bridge = start_bridge(sim, state, receiver.url, "--http-audience", AUDIENCE)
    for sequence, value in enumerate([MIGRATE, "NONE", MIGRATE], start=1):
        flip(sim, value, bridge, sequence)
    wait_for("a retried delivery", lambda: len(receiver.requests) >= 3)
    bridge.kill()
    sim.set_value(MAINTENANCE, "NONE")  # seen at the restart, flagged happened_while_down
    receiver.answer = lambda event: None
    bridge = start_bridge(sim, state, receiver.url, "--http-audience", AUDIENCE)
    try:
        bridge.wait_for_log("sequence 4")
        flip(sim, MIGRATE, bridge, 5)
        flip(sim, "NONE", bridge, 6)
        wait_for("sequences 1..6", lambda: sorted(receiver.sequences()) == [1, 2, 3, 4, 5, 6])
    finally:
        assert bridge.terminate() == 0
    by_sequence = receiver.sequences()
    assert all(len(ids) == 1 for ids in by_sequence.values()), by_sequence  # never renamed
    assert len(receiver.ids()) == 6
    fourth = next(e for e in receiver.accepted if e.get_data()["sequence"] == 4)
    assert fourth.get_data()["happened_while_down"] is True
    assert status_of(state)["outbox_depth"] == 0


def test_a_400_parks_that_event_the_next_arrives_and_redrive_delivers_it(
    sim: Simulator, receiver: Receiver, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    started = PREFIX + "maintenance.started"
    refusal = (400, {}, b"bad event " + b"x" * 4000)
    receiver.answer = lambda event: refusal if event["type"] == started else None
    port = free_port()
    bridge = start_bridge(
        sim, state, receiver.url, "--http-port", str(port), "--http-audience", AUDIENCE
    )
    try:
        flip(sim, MIGRATE, bridge, 1)
        flip(sim, "NONE", bridge, 2)
        wait_for("the next event", lambda: len(receiver.ids()) == 1)
        (refused,) = [r for r in receiver.requests if r["headers"]["ce-type"] == started]
        parked_id = refused["headers"]["ce-id"]
        report = status_of(state)
        assert report["parked_count"] == 1
        (parked,) = report["parked"]
        assert parked["event_id"] == parked_id and parked["status"] == 400
        assert "bad event" in parked["reason"] and len(parked["reason"]) < 1200  # first KiB
        bridge.wait_for_log(f"parked event {parked_id}")
        metrics = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert "maintenance_bridge_parked_events 1.0" in metrics
        text = run_cli("status", "--state-dir", str(state)).stdout
        assert "1 refused for good" in text and parked_id in text

        receiver.answer = lambda event: None
        result = run_cli("redrive", "--state-dir", str(state))
        assert result.returncode == 0 and parked_id in result.stdout, result.stderr
        wait_for("the parked event, redriven", lambda: parked_id in receiver.ids())
        wait_for("nothing parked", lambda: status_of(state)["parked_count"] == 0)
    finally:
        assert bridge.terminate() == 0
    assert [e["id"] for e in receiver.accepted].count(parked_id) == 1
    assert run_cli("redrive", "--state-dir", str(state), "--id", "no-such-id").returncode == 1


# --- failures on the wire ---------------------------------------------------------------------


def test_429_retry_after_is_honoured_under_the_same_id(
    sim: Simulator, receiver: Receiver, tmp_path: Path
) -> None:
    answers = iter([(429, {"Retry-After": "2"}, b"slow down")])
    receiver.answer = lambda event: next(answers, None)
    bridge = start_bridge(sim, tmp_path / "state", receiver.url, "--http-audience", AUDIENCE)
    try:
        flip(sim, MIGRATE, bridge, 1)
        wait_for("the event, after the 429", lambda: len(receiver.ids()) == 1)
    finally:
        assert bridge.terminate() == 0
    first, *rest = receiver.requests
    assert rest[0]["at"] - first["at"] >= 1.9, "sent again before Retry-After"
    assert {r["headers"]["ce-id"] for r in receiver.requests} == receiver.ids()


def test_a_redirect_is_not_followed_and_is_named_once(
    sim: Simulator, receiver: Receiver, tmp_path: Path
) -> None:
    elsewhere = receiver.url.replace("/events", "/moved")
    receiver.answer = lambda event: (307, {"Location": elsewhere}, b"")
    bridge = start_bridge(sim, tmp_path / "state", receiver.url, "--http-audience", AUDIENCE)
    try:
        flip(sim, MIGRATE, bridge, 1)
        wait_for("retries", lambda: len(receiver.requests) >= 3)
        line = bridge.wait_for_log("not followed")
    finally:
        assert bridge.terminate() == 0
    assert elsewhere in line["message"]
    assert all(r["path"] == "/events" for r in receiver.requests), "the redirect was followed"
    assert sum("not followed" in r.get("message", "") for r in bridge.logs()) == 1


def test_a_short_lived_token_is_fetched_again_before_it_expires(
    sim: Simulator, receiver: Receiver, tmp_path: Path
) -> None:
    """google-auth refreshes minutes before expiry: a 60 s token is never reused."""
    sim.identity.configure(lifetime=60)
    bridge = start_bridge(sim, tmp_path / "state", receiver.url, "--http-audience", AUDIENCE)
    try:
        flip(sim, MIGRATE, bridge, 1)
        flip(sim, "NONE", bridge, 2)
        wait_for("2 events", lambda: len(receiver.ids()) == 2)
    finally:
        assert bridge.terminate() == 0
    assert sim.stats()["instance/service-accounts/default/identity"] == 2


def direct_sink(url: str, *args: str) -> Any:
    """The http sink in this process (no relay), for what only timing or threads show."""
    from bridge.cli import parser
    from bridge.config import build
    from bridge.sinks import make_sink

    args_ = parser().parse_args(["run", "--sink", "http", "--http-url", url, *args])
    return make_sink(build(args_, {}, check_dirs=False))


def an_event(sequence: int) -> Any:
    from support.harness import event_for

    return event_for(MAINTENANCE, "NONE", MIGRATE, sequence)


def test_keep_alive_without_a_nagle_stall(receiver: Receiver) -> None:
    """Many POSTs over one connection, each far below the 40 ms a delayed ACK would add: each
    request goes out in one write, on a socket with TCP_NODELAY."""
    import socket

    receiver.audience = None
    sink = direct_sink(receiver.url)
    times = []
    try:
        for sequence in range(1, 41):
            start = time.perf_counter()
            sink.send(an_event(sequence)).result(timeout=5)
            times.append(time.perf_counter() - start)
        assert sink._reader.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        sink.close()
    assert len(receiver.peers) == 1, "one keep-alive connection"
    times.sort()
    assert times[len(times) // 2] < 0.02, f"median {times[len(times) // 2] * 1000:.1f} ms"


def test_send_never_waits_for_the_receiver(receiver: Receiver) -> None:
    """The caller (the recorder, holding its lock) writes the request on the idle connection
    and returns: the answer is read by the sink's worker, and sends behind it queue in order."""
    receiver.audience = None
    release = threading.Event()
    receiver.answer = lambda event: None if release.wait(10) else (500, {}, b"")
    sink = direct_sink(receiver.url)
    try:
        release.set()
        sink.send(an_event(1)).result(timeout=5)  # connects (on the worker)
        release.clear()
        start = time.perf_counter()
        futures = [sink.send(an_event(sequence)) for sequence in (2, 3, 4)]
        took = time.perf_counter() - start
        wait_for("event 2 at the receiver", lambda: len(receiver.requests) == 2)
        assert not any(f.done() for f in futures)
        release.set()
        assert [f.result(timeout=5) for f in futures] == [e["id"] for e in receiver.accepted[1:]]
    finally:
        sink.close()
    assert took < 0.05, f"send waited {took * 1000:.0f} ms"
    assert [e.get_data()["sequence"] for e in receiver.accepted] == [1, 2, 3, 4]
    assert len(receiver.peers) == 1


def test_a_failure_pauses_what_follows_until_recover(receiver: Receiver) -> None:
    """After a 503, a send before `recover` is not written (not even by the caller's fast
    path): it fails `paused`; after `recover` the same event goes out and is accepted."""
    from bridge.sinks.http_post import classify

    receiver.audience = None
    answers = iter([None, (503, {}, b"down")])
    receiver.answer = lambda event: next(answers, None)
    sink = direct_sink(receiver.url)
    try:
        sink.send(an_event(1)).result(timeout=5)
        with pytest.raises(Exception) as failed:
            sink.send(an_event(2)).result(timeout=5)
        assert classify(failed.value) == "server"
        with pytest.raises(Exception) as paused:
            sink.send(an_event(3)).result(timeout=5)
        assert classify(paused.value) == "paused"
        assert len(receiver.requests) == 2
        sink.recover(an_event(2))
        sink.send(an_event(2)).result(timeout=5)
        sink.send(an_event(3)).result(timeout=5)
    finally:
        sink.close()
    assert [e.get_data()["sequence"] for e in receiver.accepted] == [1, 2, 3]


def test_a_connection_the_receiver_closed_while_idle_is_replaced(sim: Simulator) -> None:
    """A receiver that closes kept-alive connections after each answer (without saying
    `Connection: close`): the next send sees it closed and reconnects, it does not fail."""
    rx = Receiver(sim, audience=None)
    handler = rx.server.RequestHandlerClass
    original = handler.do_POST

    def answer_then_close(self: Any) -> None:
        original(self)
        self.close_connection = True

    handler.do_POST = answer_then_close  # type: ignore[method-assign]
    sink = direct_sink(rx.url)
    try:
        for sequence in (1, 2, 3):
            sink.send(an_event(sequence)).result(timeout=5)
            time.sleep(0.05)  # the receiver's close arrives while the connection is idle
    finally:
        sink.close()
        rx.close()
    assert len(rx.ids()) == 3 and len(rx.peers) == 3


def test_a_connect_that_hangs_times_out_on_the_worker(tmp_path: Path) -> None:
    """A listener whose accept queue is full: connecting hangs. `send` returns at once and the
    event fails `timeout` after --http-connect-timeout."""
    import socket

    from bridge.sinks.http_post import classify

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(8):  # fill the backlog: later SYNs go unanswered
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    sink = direct_sink(f"http://127.0.0.1:{port}/", "--http-connect-timeout", "0.5")
    try:
        start = time.perf_counter()
        future = sink.send(an_event(1))
        took = time.perf_counter() - start
        with pytest.raises(Exception) as failed:
            future.result(timeout=5)
        waited = time.perf_counter() - start
    finally:
        sink.close()
        for s in (*fillers, listener):
            s.close()
    assert took < 0.05, f"send waited {took * 1000:.0f} ms"
    assert classify(failed.value) == "timeout" and 0.4 < waited < 3, (failed.value, waited)
    assert "within 0.5 s" in str(failed.value)


def self_signed_files(where: Path, host: str) -> tuple[Path, Path]:
    """A certificate for `host` and its key, as PEM files: a receiver's own CA, in effect."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from bridge.simulator.identity import self_signed

    key = ec.generate_private_key(ec.SECP256R1())
    cert = self_signed(key, host, days=1, host=host)
    cert_path, key_path = where / "cert.pem", where / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_https_is_verified_against_the_system_trust_store(
    sim: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A certificate the trust store does not vouch for is a `connection` failure naming it;
    once the store holds it (SSL_CERT_FILE: where OpenSSL's default store is looked up), the
    events go over one TLS connection, the caller writing on it when it is idle."""
    from bridge.sinks.http_post import classify

    cert, key = self_signed_files(tmp_path, "localhost")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    rx = Receiver(sim, audience=None, tls=context)
    try:
        untrusted = direct_sink(rx.url)
        try:
            with pytest.raises(Exception) as refused:
                untrusted.send(an_event(1)).result(timeout=5)
        finally:
            untrusted.close()
        assert classify(refused.value) == "connection", refused.value
        assert "certificate" in str(refused.value)
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        sink = direct_sink(rx.url)
        try:
            for sequence in range(1, 6):
                sink.send(an_event(sequence)).result(timeout=5)
        finally:
            sink.close()
    finally:
        rx.close()
    assert [e.get_data()["sequence"] for e in rx.accepted] == [1, 2, 3, 4, 5]
    assert len(rx.peers) == 1


# --- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--sink", "http"], "--http-url"),
        (["--http-url", "http://receiver.example.com/events"], "https://"),
        (["--http-url", "http://34.120.1.1/events"], "https://"),
        (["--http-url", "ftp://10.0.0.1/x"], "--http-url"),
        (["--http-url", "https://rx.example", "--http-header", "NoValue"], "NAME=VALUE"),
        (["--http-url", "https://rx.example", "--http-header", "Bad Name=x"], "NAME=VALUE"),
        (
            ["--http-url", "https://rx.example", "--http-header", "X-Key=env:NOT_SET_ANYWHERE"],
            "NOT_SET_ANYWHERE",
        ),
        (["--http-url", "https://rx.example", "--http-header", "ce-id=x"], "ce-id"),
    ],
)
def test_bad_http_flags_exit_2_with_one_line(tmp_path: Path, args: list[str], says: str) -> None:
    result = run_cli(
        "run", "--state-dir", str(tmp_path / "state"), *args, "--http-header", f"X-Other={SECRET}"
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], result.stderr
    assert SECRET not in result.stderr


# --- the parked table -------------------------------------------------------------------------


def test_a_version_1_store_gains_the_parked_table_and_redrive_survives_a_restart(
    tmp_path: Path,
) -> None:
    """Parking and redrive are store transactions: an event parked, then marked by `redrive`
    while no daemon runs, is back in the outbox under its seq and id at the next start."""
    import sqlite3

    from support.harness import event_for

    from bridge.store import SCHEMA_VERSION, Store

    path = tmp_path / "bridge.sqlite3"
    Store(path).close()
    db = sqlite3.connect(path)
    db.execute("DROP TABLE parked")
    db.execute("PRAGMA user_version=1")  # as a bridge before parking left it
    db.commit()
    db.close()
    store = Store(path)
    event = event_for(MAINTENANCE, "NONE", MIGRATE, 1)
    store.record(event)
    store.park(1, 400, "HTTP 400 from http://127.0.0.1/: bad event", "2026-11-30T10:00:00.000Z")
    assert store.load().pending == [] and store.parked_count() == 1
    assert store.request_redrive(["some-other-id"]) == []
    assert store.request_redrive(None) == [event.id]
    store.close()
    store = Store(path)
    (pending,) = store.load().pending
    assert (pending[0], pending[1].id) == (1, event.id)
    assert store.parked_count() == 0
    assert store.report()["schema_version"] == SCHEMA_VERSION == 2
    store.close()


def test_a_refusal_echoing_the_secrets_is_parked_and_logged_without_them(
    sim: Simulator, receiver: Receiver, tmp_path: Path
) -> None:
    def echo(event: Any) -> tuple[int, dict[str, str], bytes]:
        got = receiver.requests[-1]["headers"]
        return 403, {}, f"denied {got['Authorization']} key {got['X-Api-Key']}".encode()

    receiver.answer = echo
    state = tmp_path / "state"
    bridge = start_bridge(
        sim,
        state,
        receiver.url,
        "--http-audience",
        AUDIENCE,
        "--http-header",
        f"X-Api-Key={SECRET}",
        "--http-refusal-grace",
        "0",
    )
    try:
        flip(sim, MIGRATE, bridge, 1)
        line = bridge.wait_for_log("parked event")
    finally:
        assert bridge.terminate() == 0
    token = receiver.requests[0]["headers"]["Authorization"].split(" ", 1)[1]
    assert "denied Bearer *** key ***" in line["message"]
    (parked,) = status_of(state)["parked"]
    assert parked["status"] == 403 and "key ***" in parked["reason"]
    assert token not in parked["reason"] and SECRET not in parked["reason"]
    no_secret_logged(bridge, SECRET, token)


# --- refusals that settle: 401, 403, 404 ------------------------------------------------------


def test_a_403_for_30_s_then_200_parks_nothing_and_delivers_in_order(
    sim: Simulator, receiver: Receiver, tmp_path: Path
) -> None:
    """An IAM binding still propagating: the receiver refuses with 403 for 30 s. The events
    wait in the outbox (not parked), /readyz says 503 within the outbox-age limit, and once the
    receiver accepts, every event arrives in order, each under one id."""
    refusing = threading.Event()
    refusing.set()
    receiver.answer = lambda event: (403, {}, b"permission denied") if refusing.is_set() else None
    port = free_port()
    state = tmp_path / "state"
    bridge = start_bridge(
        sim,
        state,
        receiver.url,
        "--http-audience",
        AUDIENCE,
        "--http-port",
        str(port),
        "--ready-max-outbox-age",
        "2",
    )
    readyz = f"http://127.0.0.1:{port}/readyz"
    try:
        began = time.monotonic()
        for sequence, value in enumerate([MIGRATE, "NONE", MIGRATE], start=1):
            flip(sim, value, bridge, sequence)
        wait_for("/readyz 503", lambda: requests.get(readyz, timeout=5).status_code == 503)
        not_ready = time.monotonic() - began
        wait_for("refusals retried", lambda: len(receiver.requests) >= 5)
        assert status_of(state)["parked_count"] == 0
        wait_for("30 s of refusals", lambda: time.monotonic() - began >= 30, timeout=40)
        assert status_of(state)["parked_count"] == 0, "parked during the refusal"
        refusing.clear()
        wait_for("3 events accepted", lambda: len(receiver.ids()) == 3)
        wait_for("/readyz 200", lambda: requests.get(readyz, timeout=5).status_code == 200)
        report = status_of(state)
    finally:
        assert bridge.terminate() == 0
    assert not_ready < 5, f"/readyz 503 only {not_ready:.1f} s after the first refusal"
    assert report["parked_count"] == 0 and report["outbox_depth"] == 0
    assert [e.get_data()["sequence"] for e in receiver.accepted] == [1, 2, 3]
    sent_ids = {r["headers"]["ce-id"] for r in receiver.requests}
    assert sent_ids == receiver.ids(), "a refused event was retried under another id"
    lines = [r["message"] for r in bridge.logs() if "HTTP 403" in r.get("message", "")]
    assert len(lines) == 1, lines  # one line per outage, not one per retry


def test_a_refusal_that_outlasts_the_grace_parks_and_the_next_refusal_at_once(
    sim: Simulator, receiver: Receiver, tmp_path: Path
) -> None:
    """--http-refusal-grace bounds the retrying: counted from the first refusal since the
    last 2xx, so a receiver that refuses for good parks the first event after the grace and
    each later one at its first refusal, not one grace per event."""
    receiver.answer = lambda event: (404, {}, b"no such service")
    state = tmp_path / "state"
    bridge = start_bridge(
        sim, state, receiver.url, "--http-audience", AUDIENCE, "--http-refusal-grace", "2"
    )
    try:
        began = time.monotonic()
        flip(sim, MIGRATE, bridge, 1)
        bridge.wait_for_log("parked event")
        parked_after = time.monotonic() - began
        flip(sim, "NONE", bridge, 2)
        wait_for("both parked", lambda: status_of(state)["parked_count"] == 2)
    finally:
        assert bridge.terminate() == 0
    assert 1.9 < parked_after < 6, parked_after
    second = [r for r in receiver.requests if r["headers"]["ce-type"].endswith("ended")]
    assert len(second) == 1, "the second event was retried through a grace of its own"


def test_a_401_drops_the_cached_token_and_the_retry_carries_a_fresh_one(
    sim: Simulator, receiver: Receiver, tmp_path: Path
) -> None:
    """A token refused (clock skew, revoked): the bridge does not keep sending it. The
    simulator counts the token fetches: one at the start, one after the 401."""
    answers = iter([(401, {}, b"token refused")])
    receiver.answer = lambda event: next(answers, None)
    state = tmp_path / "state"
    bridge = start_bridge(sim, state, receiver.url, "--http-audience", AUDIENCE)
    try:
        flip(sim, MIGRATE, bridge, 1)
        wait_for("the event, after the 401", lambda: len(receiver.ids()) == 1)
        flip(sim, "NONE", bridge, 2)
        wait_for("the next event", lambda: len(receiver.ids()) == 2)
    finally:
        assert bridge.terminate() == 0
    assert sim.stats()["instance/service-accounts/default/identity"] == 2
    assert status_of(state)["parked_count"] == 0
    assert [e.get_data()["sequence"] for e in receiver.accepted] == [1, 2]


# --- the transport's framing (bridge/http1.py's Reader) ----------------------------------------


class RawReceiver:
    """A receiver that answers each POST with scripted bytes (`answers`, in turn; the last one
    repeats), and counts connections."""

    def __init__(self, *answers: bytes) -> None:
        import socket

        self.answers = list(answers)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/events"
        self.connections = 0
        self.bodies: list[bytes] = []
        self.heads: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: Any) -> None:
        with conn, contextlib.suppress(OSError):
            data = b""
            while True:
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, data = data.partition(b"\r\n\r\n")
                length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
                while len(data) < length:
                    data += conn.recv(65536)
                self.heads.append(head)
                self.bodies.append(data[:length])
                data = data[length:]
                answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
                conn.sendall(answer)

    def close(self) -> None:
        self.listener.close()


OK_EMPTY = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


def test_the_sink_closes_a_connection_with_bytes_left_after_an_answer() -> None:
    """Two answers in one write: the second is never taken for the next event's answer."""
    refusal = b"HTTP/1.1 500 No\r\nContent-Length: 0\r\n\r\n"
    rx = RawReceiver(OK_EMPTY + refusal, OK_EMPTY)
    sink = direct_sink(rx.url)
    try:
        for sequence in (1, 2, 3):
            sink.send(an_event(sequence)).result(timeout=5)
    finally:
        sink.close()
        rx.close()
    assert rx.connections == 2 and len(rx.bodies) == 3


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokxx0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nok",
    ],
    ids=["0x chunk size", "no CRLF after chunk data", "two lengths"],
)
def test_the_sink_refuses_broken_framing_as_a_connection_failure(answer: bytes) -> None:
    from bridge.sinks.http_post import classify

    rx = RawReceiver(answer)
    sink = direct_sink(rx.url)
    try:
        with pytest.raises(Exception) as failed:
            sink.send(an_event(1)).result(timeout=5)
    finally:
        sink.close()
        rx.close()
    assert classify(failed.value) == "connection", failed.value


def test_a_big_2xx_body_is_cut_and_still_acknowledges() -> None:
    big = b"x" * (70 * 1024)
    rx = RawReceiver(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(big), big))
    sink = direct_sink(rx.url)
    try:
        for sequence in (1, 2):
            sink.send(an_event(sequence)).result(timeout=5)
    finally:
        sink.close()
        rx.close()
    assert rx.connections == 2, "a connection with an unread body left was reused"


def test_a_trickling_receiver_cannot_stretch_the_read_timeout() -> None:
    """One byte every 50 ms: the answer must be whole within --http-read-timeout."""
    import socket

    from bridge.sinks.http_post import classify

    listener = socket.create_server(("127.0.0.1", 0))

    def trickle() -> None:
        conn, _ = listener.accept()
        with conn, contextlib.suppress(OSError):  # the sink hangs up at its deadline
            conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 100:
                conn.sendall(bytes([byte]))
                threading.Event().wait(0.05)  # the receiver's pace: what the test is about

    threading.Thread(target=trickle, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/events"
    sink = direct_sink(url, "--http-read-timeout", "1")
    try:
        began = time.monotonic()
        with pytest.raises(Exception) as failed:
            sink.send(an_event(1)).result(timeout=10)
        took = time.monotonic() - began
    finally:
        sink.close()
        listener.close()
    assert classify(failed.value) == "timeout" and took < 1.6, (failed.value, took)


def answer(status: int, *headers: str, body: bytes = b"") -> bytes:
    lines = "".join(f"{h}\r\n" for h in headers)
    return b"HTTP/1.1 %d X\r\n%sContent-Length: %d\r\n\r\n%s" % (
        status, lines.encode(), len(body), body
    )  # fmt: skip


@pytest.mark.parametrize(
    ("status", "grace", "judged"),
    [
        (200, "600", "delivered"),
        (204, "600", "delivered"),
        (299, "600", "delivered"),
        (300, "600", "redirect"),
        (399, "600", "redirect"),
        (408, "600", "server"),
        (500, "600", "server"),
        (599, "600", "server"),
        (429, "600", "throttled"),
        (400, "600", "parked"),
        (405, "600", "parked"),
        (499, "600", "parked"),
        (401, "600", "refused, retried"),
        (403, "600", "refused, retried"),
        (404, "600", "refused, retried"),
        (403, "0", "parked"),
    ],
)
def test_every_answer_is_judged_by_its_status(status: int, grace: str, judged: str) -> None:
    """What the relay does with an answer rests on this: a 2xx acknowledges; a redirect, a
    408, a 429 and a 5xx are retried under the same id; 401/403/404 are retried for the
    refusal grace, then parked like every other 4xx (Permanent)."""
    from bridge.sinks import Permanent
    from bridge.sinks.http_post import classify

    rx = RawReceiver(answer(status, "Location: https://rx.example/new?sig=secret"))
    sink = direct_sink(rx.url, "--http-refusal-grace", grace)
    event = an_event(1)
    try:
        failure = sink.send(event).exception(timeout=5)
    finally:
        sink.close()
        rx.close()
    if judged == "delivered":
        assert failure is None
        return
    assert failure is not None
    parked = isinstance(failure, Permanent)
    got = "parked" if parked else classify(failure)
    assert got == {"refused, retried": "refused"}.get(judged, judged), failure
    assert str(status) in str(failure)
    if judged == "redirect":
        assert "https://rx.example/new " in str(failure) and "secret" not in str(failure)
    if judged == "refused, retried":
        assert "parks in 600 s" in str(failure)


def test_a_429_holds_the_next_request_for_its_retry_after() -> None:
    """Retried sooner than the receiver asked, the event is not written (the relay tries
    again later); once the wait is over it goes out."""
    from bridge.sinks.http_post import classify

    rx = RawReceiver(answer(429, "Retry-After: 1"), OK_EMPTY)
    sink = direct_sink(rx.url)
    try:
        first = sink.send(an_event(1)).exception(timeout=5)
        refused = time.monotonic()
        sink.recover(an_event(1))
        early = sink.send(an_event(1)).exception(timeout=5)
        written_early = len(rx.bodies)
        wait_for("the receiver's wait", lambda: time.monotonic() - refused > 1.05)
        sink.recover(an_event(1))
        sink.send(an_event(1)).result(timeout=5)
    finally:
        sink.close()
        rx.close()
    assert first is not None and "429" in str(first)
    assert early is not None and classify(early) == "throttled"
    assert written_early == 1 and len(rx.bodies) == 2


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(None, 0.0), ("", 0.0), ("7", 7.0), (" 7 ", 7.0), ("soon", 0.0), ("-3", 0.0)],
)
def test_retry_after_in_seconds_or_nothing(value: str | None, seconds: float) -> None:
    from bridge.sinks.http_post import _retry_after

    assert _retry_after(value) == seconds


def test_retry_after_as_an_http_date() -> None:
    from email.utils import formatdate

    from bridge.sinks.http_post import _retry_after

    assert 28 <= _retry_after(formatdate(time.time() + 30, usegmt=True)) <= 30
    assert _retry_after(formatdate(time.time() - 30, usegmt=True)) == 0.0


def test_an_echoed_secret_is_masked_in_the_failure() -> None:
    """A receiver that echoes the request: the static headers' values and the token never
    reach the log or the parked row; the ce-* headers and the content type are kept."""
    from bridge.sinks.http_post import _scrub

    sent = {
        "Authorization": "Bearer tok.en",
        "X-Key": "k3y",
        "ce-id": "abc",
        "Content-Type": "application/json",
        "X-Empty": "",
    }
    text = "got Bearer tok.en and k3y for abc as application/json"
    assert _scrub(text, sent) == "got Bearer *** and *** for abc as application/json"


def test_static_headers_are_read_from_flags_and_the_environment() -> None:
    from bridge.sinks.http_post import Header, headers_from

    got = headers_from([" X-Key =env:KEY", "X-Plain=a=b", "X-Empty="], {"KEY": "s3cret"})
    assert got == (Header("X-Key", "s3cret"), Header("X-Plain", "a=b"), Header("X-Empty", ""))
    assert "s3cret" not in repr(got)


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("NoValue", "give NAME=VALUE"),
        ("Bad Name=x", "give NAME=VALUE"),
        ("=x", "give NAME=VALUE"),
        ("Content-Type=x", "set by the bridge itself"),
        ("CE-Source=x", "set by the bridge itself"),
        ("X-Key=env:UNSET", "the variable UNSET is not set"),
        ("X-Key=env:BROKEN", "holds a line break"),
        ("X-Key=a\rb", "holds a line break"),
        ("X-Key=a\0b", "holds a line break"),
    ],
)
def test_a_bad_static_header_is_refused_naming_it_never_its_value(spec: str, says: str) -> None:
    from bridge.options import ConfigError
    from bridge.sinks.http_post import headers_from

    with pytest.raises(ConfigError, match=says) as refused:
        headers_from(["X-Fine=1", spec], {"BROKEN": "zq1\nzq2"})
    assert "zq1" not in str(refused.value) and "a\rb" not in str(refused.value)


def request_head(url: str, *args: str) -> list[str]:
    """The request line and header lines the sink writes for one event to `url`."""
    rx = RawReceiver(OK_EMPTY)
    sink = direct_sink(url.replace("RX", rx.url.removesuffix("/events")), *args)
    try:
        sink.send(an_event(1)).result(timeout=5)
    finally:
        sink.close()
        rx.close()
    return rx.heads[0].decode("latin-1").split("\r\n")


@pytest.mark.parametrize(
    ("url", "line"),
    [
        ("RX", "POST / HTTP/1.1"),
        ("RX/hook/a b", "POST /hook/a%20b HTTP/1.1"),
        ("RX/hook?k=1&sig=x%2F", "POST /hook?k=1&sig=x%2F HTTP/1.1"),
        ("RX/h~(1)!?q=[a]", "POST /h~(1)!?q=[a] HTTP/1.1"),
    ],
)
def test_the_request_target_is_the_url_s_path_and_query(url: str, line: str) -> None:
    """As requests sent it before: an empty path is "/", the query kept (a receiver may
    authenticate by it), what a URL may hold left as it is, a space escaped."""
    assert request_head(url)[0] == line


def test_the_user_agent_is_the_bridge_s_unless_a_header_sets_one() -> None:
    agents = [h for h in request_head("RX/e") if h.lower().startswith("user-agent:")]
    assert len(agents) == 1 and agents[0].startswith("User-Agent: maintenance-bridge/")
    mine = request_head("RX/e", "--http-header", "user-agent=mine/1")
    assert [h for h in mine if h.lower().startswith("user-agent:")] == ["user-agent: mine/1"]


def test_the_content_mode_decides_the_headers() -> None:
    binary = request_head("RX/e")
    structured = request_head("RX/e", "--content-mode", "structured")
    assert "Content-Type: application/json" in binary
    assert any(h.startswith("ce-id: ") for h in binary)
    assert "Content-Type: application/cloudevents+json; charset=UTF-8" in structured
    assert not any(h.lower().startswith("ce-") for h in structured)


def test_nothing_listening_is_a_connection_failure_naming_the_receiver() -> None:
    from bridge.sinks.http_post import classify

    url = f"http://127.0.0.1:{free_port()}/events?sig=secret"
    sink = direct_sink(url)
    try:
        failure = sink.send(an_event(1)).exception(timeout=5)
    finally:
        sink.close()
    assert failure is not None and classify(failure) == "connection"
    assert str(failure).startswith(url.split("?")[0] + ": ")
    assert "secret" not in str(failure)
