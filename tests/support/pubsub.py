"""Start a local Pub/Sub (the official emulator, or the in-repo fake by name) and talk to it.

Shared by the tests and bench/ (which imports it as `tests.support.pubsub`).

The emulator's Java process is started directly (the launcher script execs java, so the pid
we hold is the JVM's) and killed by that pid: `gcloud beta emulators pubsub start` would leave
the JVM behind when gcloud is killed. As a last resort the JVM also dies with the process
that started it (PR_SET_PDEATHSIG, set by a tiny exec-through launcher, not a preexec_fn:
forking a process with live gRPC threads runs gRPC's fork handlers, which can abort the child)
and at interpreter exit.

Clients: the admin helpers build their gRPC channel explicitly (insecure channel to
`host_port`, no credentials needed), so they never depend on a global PUBSUB_EMULATOR_HOST.
Code under test that uses the library's default path (as the bridge does) gets
`server.env()` in a subprocess environment, or `monkeypatch.setenv` in-process.

There is no silent fallback: a test asks for the emulator (`emulator_or_skip`, which skips
with the reason where support.gcloud does not find it) or for the fake by name, and its name
says `_on_fake` then.
"""

from __future__ import annotations

import atexit
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1
from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport
from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

from .fake_pubsub import FakePubSub
from .gcloud import pubsub_emulator
from .harness import free_port

START_TIMEOUT_S = 30.0
_LIVE: set[PubSubServer] = set()


def emulator_version() -> str | None:
    """The emulator's version from its jar name (e.g. '0.8.20'), or None when not installed."""
    return pubsub_emulator().version


def emulator_unavailable_reason() -> str | None:
    """Why the official emulator cannot be started here, or None when it can."""
    return pubsub_emulator().missing


@dataclass(eq=False)
class PubSubServer:
    """A running local Pub/Sub; `host_port` is what PUBSUB_EMULATOR_HOST takes."""

    host_port: str
    kind: str  # "emulator" | "fake"
    project: str
    log_path: Path | None = None  # emulator output (appended to across restarts)
    start_seconds: float = 0.0  # how long the last (re)start took until ready
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _fake: FakePubSub | None = field(default=None, repr=False)

    @property
    def port(self) -> int:
        return int(self.host_port.rsplit(":", 1)[1])

    def env(self) -> dict[str, str]:
        """Variables for a process that should use this server through the default path."""
        return {"PUBSUB_EMULATOR_HOST": self.host_port, "PUBSUB_PROJECT_ID": self.project}

    def stop(self) -> None:
        """Stop gracefully (SIGTERM to our own JVM pid, SIGKILL after 10 s) and wait."""
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._fake is not None:
            self._fake.stop(grace=1.0)
            self._fake = None
        _LIVE.discard(self)

    def kill(self) -> None:
        """Die abruptly (SIGKILL / cancel in-flight calls), for fault tests."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None
        if self._fake is not None:
            self._fake.stop(grace=None)
            self._fake = None
        _LIVE.discard(self)

    def restart(self) -> None:
        """Start again on the same port, state lost (as the real emulator does); wait till ready."""
        self.stop()
        t0 = time.monotonic()
        if self.kind == "emulator":
            assert self.log_path is not None
            self._proc = _spawn_emulator(self.port, self.log_path)
        else:
            self._fake = _retry_bind(lambda: FakePubSub(self.port))
        self.start_seconds = time.monotonic() - t0
        _LIVE.add(self)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None


def emulator_or_skip(project: str = "test-project") -> PubSubServer:
    """The official emulator; where it is missing, a skip whose reason the summary shows (-ra)."""
    if reason := emulator_unavailable_reason():
        pytest.skip(f"needs the official Pub/Sub emulator: {reason}")
    server = start_pubsub(project)
    pubsub_emulator().started(server.host_port)
    return server


def start_pubsub(
    project: str = "test-project", kind: str = "emulator", data_dir: Path | None = None
) -> PubSubServer:
    """Start the official emulator (an error where it is missing) or, by name, the fake.

    `data_dir` holds the emulator's log (a fresh temp dir by default); the 0.8.x emulator
    keeps all state in memory, so nothing else is written there.
    """
    if kind not in ("emulator", "fake"):
        raise ValueError(f"kind must be 'emulator' or 'fake', not {kind!r}")
    reason = emulator_unavailable_reason()
    if kind == "emulator" and reason:
        raise RuntimeError(f"official Pub/Sub emulator unavailable: {reason}")
    t0 = time.monotonic()
    if kind == "emulator":
        data_dir = data_dir or Path(tempfile.mkdtemp(prefix="pubsub-emulator-"))
        data_dir.mkdir(parents=True, exist_ok=True)
        log_path = data_dir / "emulator.log"
        port = free_port()
        server = PubSubServer(f"127.0.0.1:{port}", "emulator", project, log_path)
        server._proc = _spawn_emulator(port, log_path)
        what = f"using the official emulator ({emulator_version()})"
    else:
        fake = FakePubSub()
        server = PubSubServer(f"127.0.0.1:{fake.port}", "fake", project, _fake=fake)
        what = "using the in-repo fake gRPC server"
    server.start_seconds = time.monotonic() - t0
    _LIVE.add(server)
    print(f"pubsub: {what} on {server.host_port}", file=sys.stderr)
    return server


# Linux: SIGKILL the JVM if the thread that started it dies (pytest killed hard); the setting
# survives exec.
_DIE_WITH_PARENT = (
    [
        sys.executable,
        "-c",
        "import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGKILL); "
        "os.execv(sys.argv[1], sys.argv[1:])",
    ]
    if sys.platform == "linux"
    else []
)


def _spawn_emulator(port: int, log_path: Path) -> subprocess.Popen[bytes]:
    """Run the JVM on 127.0.0.1:port and wait for "Server started" in its log."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        with log_path.open("ab") as log:
            offset = log.tell()
            proc = subprocess.Popen(
                [
                    *_DIE_WITH_PARENT,
                    str(pubsub_emulator().path),
                    "--host=127.0.0.1",
                    f"--port={port}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        while time.monotonic() < deadline:
            with log_path.open("rb") as f:
                f.seek(offset)
                out = f.read().decode(errors="replace")
            if "Server started" in out:
                return proc
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        else:
            proc.kill()
            proc.wait()
            raise TimeoutError(f"emulator not ready in {START_TIMEOUT_S} s; see {log_path}")
        # Exited early: a port still held (just after a kill) is worth another try.
        if "Address already in use" in out and time.monotonic() < deadline:
            time.sleep(0.2)
            continue
        raise RuntimeError(f"emulator exited with {proc.returncode}: {out[-2000:]}")


def _retry_bind(make: Callable[[], FakePubSub]) -> FakePubSub:
    for _ in range(50):
        try:
            return make()
        except (OSError, RuntimeError):
            time.sleep(0.1)
    return make()


@atexit.register
def _stop_leftovers() -> None:
    """A test that forgot stop() must not leave a JVM running."""
    for server in list(_LIVE):
        server.kill()


@dataclass
class Received:
    """One pulled message, flattened to plain Python types."""

    message_id: str
    data: bytes
    attributes: dict[str, str]
    ordering_key: str
    publish_time: datetime
    ack_id: str


class PubSubAdmin:
    """Topic/subscription setup and pulling, over an explicit insecure channel."""

    def __init__(self, server: PubSubServer) -> None:
        self.server = server
        self.project = server.project
        self.publisher_api = pubsub_v1.PublisherClient(
            transport=PublisherGrpcTransport(channel=grpc.insecure_channel(server.host_port))
        )
        self.subscriber_api = pubsub_v1.SubscriberClient(
            transport=SubscriberGrpcTransport(channel=grpc.insecure_channel(server.host_port))
        )

    def topic_path(self, name: str) -> str:
        return name if name.startswith("projects/") else f"projects/{self.project}/topics/{name}"

    def subscription_path(self, name: str) -> str:
        if name.startswith("projects/"):
            return name
        return f"projects/{self.project}/subscriptions/{name}"

    def create_topic(self, name: str) -> str:
        path = self.topic_path(name)
        self.publisher_api.create_topic(name=path, timeout=10)
        return path

    def create_subscription(
        self,
        topic: str,
        name: str,
        ordering: bool = True,
        push_endpoint: str | None = None,
        filter: str = "",
        ack_deadline_seconds: int = 10,
    ) -> str:
        """ack_deadline_seconds is always sent: left at 0, some emulators reject it."""
        if ack_deadline_seconds < 10:
            raise ValueError("ack_deadline_seconds must be 10 or more")
        path = self.subscription_path(name)
        request: dict[str, Any] = {
            "name": path,
            "topic": self.topic_path(topic),
            "ack_deadline_seconds": ack_deadline_seconds,
            "enable_message_ordering": ordering,
            "filter": filter,
        }
        if push_endpoint:
            request["push_config"] = {"push_endpoint": push_endpoint}
        self.subscriber_api.create_subscription(request=request, timeout=10)
        return path

    def delete_topic(self, name: str) -> None:
        self.publisher_api.delete_topic(topic=self.topic_path(name), timeout=10)

    def publisher(self, ordering: bool = True, max_latency: float = 0.001) -> Any:
        """A library PublisherClient on this server (not via the env var), low batching delay."""
        return pubsub_v1.PublisherClient(
            batch_settings=pubsub_v1.types.BatchSettings(max_latency=max_latency),
            publisher_options=pubsub_v1.types.PublisherOptions(enable_message_ordering=ordering),
            transport=PublisherGrpcTransport(channel=grpc.insecure_channel(self.server.host_port)),
        )

    def pull(
        self, sub_path: str, max_messages: int = 10, timeout: float = 2.0, ack: bool = True
    ) -> list[Received]:
        """One Pull, acked unless ack=False. [] if nothing came: the emulator (and the fake)
        hold an empty Pull until 1 s before `timeout`, so timeout <= 1 returns at once."""
        try:
            resp = self.subscriber_api.pull(
                subscription=self.subscription_path(sub_path),
                max_messages=max_messages,
                timeout=timeout,
                retry=None,
            )
        except gexc.DeadlineExceeded:
            return []
        got = [
            Received(
                message_id=r.message.message_id,
                data=bytes(r.message.data),
                attributes=dict(r.message.attributes),
                ordering_key=r.message.ordering_key,
                publish_time=r.message.publish_time,
                ack_id=r.ack_id,
            )
            for r in resp.received_messages
        ]
        if ack and got:
            self.ack(sub_path, [m.ack_id for m in got])
        return got

    def ack(self, sub_path: str, ack_ids: list[str]) -> None:
        self.subscriber_api.acknowledge(
            subscription=self.subscription_path(sub_path), ack_ids=ack_ids, timeout=10
        )

    def pull_until(
        self,
        sub_path: str,
        n: int,
        timeout: float = 10.0,
        same: Callable[[Received], str] | None = None,
    ) -> list[Received]:
        """Pull and ack until n messages arrived, else TimeoutError. Duplicates count, unless
        `same` names what makes two messages one (an event id: at least once allows a retry to
        publish it again); then the first copy of each is kept, in arrival order."""
        got: list[Received] = []
        seen: set[str] = set()
        deadline = time.monotonic() + timeout
        while len(got) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(got)} of {n} messages in {timeout} s: {got}")
            try:
                pulled = self.pull(sub_path, n - len(got), timeout=min(left, 2.0))
            except gexc.ServiceUnavailable:  # channel reconnecting after a restart
                time.sleep(0.1)
                continue
            for message in pulled:
                key = message.message_id if same is None else same(message)
                if same is None or key not in seen:
                    got.append(message)
                seen.add(key)
        return got

    def close(self) -> None:
        self.publisher_api.transport.close()
        self.subscriber_api.close()

    def __enter__(self) -> PubSubAdmin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def admin(server: PubSubServer) -> PubSubAdmin:
    return PubSubAdmin(server)
