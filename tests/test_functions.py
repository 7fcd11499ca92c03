"""The example Cloud Functions as deployed, fed Eventarc-shaped CloudEvents.

Each function runs from its source zip, built from terraform/functions/archive.json (the list
Terraform zips) and unpacked into a temporary directory, under functions-framework in a fresh
virtual environment holding only that function's requirements.txt (cached per requirements
hash in .cache/function-venvs), with no PYTHONPATH: nothing of the repository is importable, so
a vendored module that needs more than the archive and its requirements fails here.

Every delivery is what Eventarc sends a gen2 function with a Pub/Sub trigger: a binary-mode
CloudEvents HTTP request (ce-* headers) of type messagePublished whose data is
MessagePublishedData wrapping the bridge's own binary-mode Pub/Sub message. The effects are
asserted on local stand-ins: a webhook catcher, the official Firestore emulator, a fake Compute
REST API. The servers are shared per module to keep the suite fast.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import zipfile
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from support.gcloud import firestore_emulator
from support.harness import free_port, holds_for

from bridge.events import DEFAULT_TYPE_PREFIX, Instance, Scheduling, Transition, build_event
from bridge.keys import KEYS, MAINTENANCE
from bridge.origin import binding, binding_of, token_of, with_token

# A cold build of a function's venv may take minutes (pip's own limit below is 900 s).
pytestmark = pytest.mark.timeout(1200)
REPO = Path(__file__).resolve().parents[1]
GOLDEN = sorted((REPO / "schemas" / "examples").glob("*.pubsub.json"))
FUNCTIONS = REPO / "terraform" / "functions"
SHARED = FUNCTIONS / "_shared"
ARCHIVE = FUNCTIONS / "archive.json"
VENVS = REPO / ".cache" / "function-venvs"
EVENTARC = REPO / "tests" / "data" / "eventarc-pubsub"  # Google's schema and examples
PROJECT = "test-project"
TOPIC = f"projects/{PROJECT}/topics/maintenance-bridge-events"
SUBSCRIPTION = f"projects/{PROJECT}/subscriptions/eventarc-us-central1-notify-481828-sub-000"
ZONE = "us-central1-a"
MIGRATE = "MIGRATE_ON_HOST_MAINTENANCE"

# --- building deliveries ----------------------------------------------------------------------


def vm(name: str = "demo-vm", number: int = 1) -> Instance:
    return Instance(
        id=str(4_000_000_000_000_000_000 + number),
        name=name,
        zone=ZONE,
        project_id=PROJECT,
        project_number="123456789012",
        hostname=f"{name}.{ZONE}.c.{PROJECT}.internal",
    )


def maintenance(
    kind: str,
    *,
    instance: Instance | None = None,
    sequence: int = 1,
    previous: str = "NONE",
    current: str = MIGRATE,
    observed: datetime | None = None,
    event_id: str | None = None,
) -> Any:
    """A bridge event built with the project's own builder (the contract, not a copy of it)."""
    notice = 60 if kind == "maintenance.started" and current == MIGRATE else None
    return build_event(
        Transition(key=MAINTENANCE, previous=previous, current=current, kind=kind),
        event_id=event_id or str(uuid.uuid4()),
        sequence=sequence,
        observed_at=observed or datetime(2026, 1, 1, 12, 0, sequence, tzinfo=timezone.utc),
        instance=instance or vm(),
        scheduling=Scheduling(on_host_maintenance="MIGRATE", automatic_restart="TRUE"),
        happened_while_down=False,
        notice_seconds=notice,
    )


def message_published(
    attributes: dict[str, str],
    payload: bytes,
    message_id: str,
    published: str = "2026-01-01T12:00:00.123Z",
) -> dict:
    """MessagePublishedData as Eventarc delivers it (camelCase plus the snake_case repeats);
    `published` is its publishTime, the time an attestation is judged at."""
    return {
        "subscription": SUBSCRIPTION,
        "message": {
            "attributes": attributes,
            "data": base64.b64encode(payload).decode(),
            "messageId": message_id,
            "message_id": message_id,
            "publishTime": published,
            "publish_time": published,
        },
    }


def deliver(port: int, data: dict, message_id: str | None = None) -> requests.Response:
    """POST one binary-mode CloudEvents HTTP request, as Eventarc's push does."""
    message_id = message_id or data.get("message", {}).get("messageId") or "1"
    headers = {
        "ce-specversion": "1.0",
        "ce-type": "google.cloud.pubsub.topic.v1.messagePublished",
        "ce-source": f"//pubsub.googleapis.com/{TOPIC}",
        "ce-id": str(message_id),
        "ce-time": "2026-01-01T12:00:00.123Z",
        "content-type": "application/json",
    }
    return requests.post(f"http://127.0.0.1:{port}/", json=data, headers=headers, timeout=30)


def send(port: int, event: Any, message_id: str | None = None) -> requests.Response:
    """Publish `event` in binary content mode, delivered under a fresh Pub/Sub message id."""
    attributes, payload = event.to_pubsub()
    return deliver(port, message_published(attributes, payload, message_id or uuid.uuid4().hex))


def hand_crafted(kind: str = "maintenance.started") -> tuple[dict[str, str], bytes]:
    """The same kind of message written by hand: guards the builder against drifting alone."""
    inst = vm("hand-vm", 99)
    attributes = {
        "ce-specversion": "1.0",
        "ce-id": "hand-1",
        "ce-source": f"//compute.googleapis.com/projects/{PROJECT}/zones/{ZONE}/instances/hand-vm",
        "ce-type": f"{DEFAULT_TYPE_PREFIX}.{kind}",
        "ce-time": "2026-01-01T12:00:00.000Z",
        "ce-subject": MAINTENANCE,
        "ce-dataschema": "https://maintenance-bridge.github.io/schemas/v1/event-data.json",
        "ce-instanceid": inst.id,
        "ce-zone": ZONE,
        "ce-project": PROJECT,
        "content-type": "application/json",
    }
    data = {
        "key": MAINTENANCE,
        "previous": "NONE",
        "current": MIGRATE,
        "observed_at": "2026-01-01T12:00:00.000Z",
        "happened_while_down": False,
        "sequence": 7,
        "notice_seconds": 60,
        "instance": {
            "id": inst.id,
            "name": inst.name,
            "zone": ZONE,
            "project_id": PROJECT,
            "project_number": "123456789012",
            "hostname": inst.hostname,
        },
        "scheduling": {"on_host_maintenance": "MIGRATE"},
    }
    return attributes, json.dumps(data).encode()


def malformed() -> list[tuple[str, dict]]:
    """Deliveries no retry can fix: each must be logged and acknowledged (HTTP 200)."""
    good_attrs, good_payload = maintenance("maintenance.started").to_pubsub()
    no_type = {k: v for k, v in good_attrs.items() if k != "ce-type"}
    foreign = {**good_attrs, "ce-type": "com.example.something.else"}
    return [
        ("not-json", message_published(good_attrs, b"{not json", "m1")),
        ("no-ce-type", message_published(no_type, good_payload, "m2")),
        ("foreign-type", message_published(foreign, good_payload, "m3")),
        ("bad-data", message_published(good_attrs, b'{"key": 1}', "m4")),
        (
            "bad-base64",
            {"subscription": SUBSCRIPTION, "message": {"data": "!!", "messageId": "m5"}},
        ),
        ("no-message", {"subscription": SUBSCRIPTION}),
    ]


# --- local stand-ins --------------------------------------------------------------------------


class Recorder(ThreadingHTTPServer):
    """A tiny HTTP server that records requests and answers from a script of statuses."""

    daemon_threads = True

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.requests: list[dict[str, Any]] = []
        self.fail_next: list[int] = []  # statuses to answer before behaving normally
        self.lock = threading.Lock()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def take(self, predicate: Any = None) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.requests if predicate is None or predicate(r)]


class _Handler(BaseHTTPRequestHandler):
    server: Recorder

    def log_message(self, *args: Any) -> None:
        pass

    def _body(self) -> Any:
        raw = self.rfile.read(int(self.headers.get("content-length") or 0))
        return json.loads(raw) if raw else None

    def _reply(self, status: int, body: Any) -> None:
        out = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


class WebhookHandler(_Handler):
    def do_POST(self) -> None:
        body = self._body()
        with self.server.lock:
            status = self.server.fail_next.pop(0) if self.server.fail_next else 200
            if status == 200:
                self.server.requests.append({"path": self.path, "body": body})
        self._reply(status, {"ok": status == 200})


class ComputeHandler(_Handler):
    """Just enough of compute/v1: instance group / NEG membership and instances.get."""

    def do_GET(self) -> None:
        parts = self.path.strip("/").split("/")
        if len(parts) >= 7 and parts[-2] == "instances":
            meta = self.server.metadata.get(parts[-1])  # type: ignore[attr-defined]
            items = [{"key": "drain-backends", "value": meta}] if meta else []
            self._reply(200, {"name": parts[-1], "metadata": {"items": items}})
        else:
            self._reply(404, {"error": {"code": 404, "message": "not found"}})

    def do_POST(self) -> None:
        body = self._body()
        srv = self.server
        with srv.lock:
            srv.requests.append({"path": self.path, "body": body})
            if srv.fail_next:
                self._reply(srv.fail_next.pop(0), {"error": {"code": 503, "message": "busy"}})
                return
            group, verb = self.path.split("/")[-2:]
            members: set[str] = srv.members.setdefault(group, set())  # type: ignore[attr-defined]
            if verb in ("removeInstances", "addInstances"):
                who = {i["instance"].rsplit("/", 1)[-1] for i in body["instances"]}
            else:
                who = {e["instance"] for e in body["networkEndpoints"]}
            adding = verb in ("addInstances", "attachNetworkEndpoints")
            if adding and who <= members:
                error = {
                    "code": 400,
                    "message": "already a member",
                    "errors": [{"reason": "memberAlreadyExists"}],
                }
                self._reply(400, {"error": error})
                return
            if not adding and not who & members:
                error = {
                    "code": 400,
                    "message": "The instance is not a member of the group",
                    "errors": [{"reason": "resourceNotFound"}],
                }
                self._reply(400, {"error": error})
                return
            members.update(who) if adding else members.difference_update(who)
        self._reply(200, {"kind": "compute#operation", "name": f"operation-{uuid.uuid4().hex}"})


def wait_for_port(port: int, proc: subprocess.Popen, log: Path, deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} not ready in time:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    """Stop a process we started, and its children (gunicorn workers, the emulator's Java)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # its own group: start_new_session=True
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def archive_files(name: str) -> dict[str, Path]:
    """Zip member -> repository file for one function, from the list Terraform zips."""
    listed = json.loads(ARCHIVE.read_text(encoding="utf-8"))
    files = {**listed["files"], **listed.get("only", {}).get(name, {})}
    root = REPO / "terraform"
    return {m: (root / src.replace("{function}", name)).resolve() for m, src in files.items()}


def build_archive(name: str, tmp: Path) -> Path:
    """The function's zip, as data.archive_file.function builds it, unpacked into tmp/name."""
    zip_path = tmp / f"{name}.zip"
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as zf:
        for member, origin in archive_files(name).items():
            zf.write(origin, member)
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(tmp / name)
    return tmp / name


def function_venv(requirements: Path) -> Path:
    """A virtual environment with only these requirements, built once per requirements hash."""
    digest = hashlib.sha256(requirements.read_bytes() + sys.version.encode()).hexdigest()[:16]
    venv = VENVS / digest
    VENVS.mkdir(parents=True, exist_ok=True)
    with (VENVS / f"{digest}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two pytest runs must not build the same venv at once
        if not (venv / ".complete").is_file():
            shutil.rmtree(venv, ignore_errors=True)
            base = getattr(sys, "_base_executable", sys.executable)
            subprocess.run([base, "-m", "venv", str(venv)], check=True, capture_output=True)
            pip = [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check"]
            result = subprocess.run(
                [*pip, "-r", str(requirements)], capture_output=True, text=True, timeout=900
            )
            assert result.returncode == 0, f"pip install -r {requirements}:\n{result.stderr}"
            (venv / ".complete").write_text(requirements.read_text())
    return venv


def deployed_env(env: dict[str, str]) -> dict[str, str]:
    """The test's environment minus everything that would make the repository importable."""
    hidden = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "VIRTUAL_ENV")
    return {
        **{k: v for k, v in os.environ.items() if k not in hidden},
        "PYTHONNOUSERSITE": "1",
        "PYTHONUNBUFFERED": "1",
        **env,
    }


class Function:
    """One functions-framework process serving one example function from its unpacked zip."""

    def __init__(
        self,
        name: str,
        env: dict[str, str],
        tmp: Path,
        target: str = "handle",
        signature: str = "cloudevent",
    ) -> None:
        self.name = name
        self.env = env
        self.port = free_port()
        self.log = tmp / f"{name}.log"
        self.source = build_archive(name, tmp)
        self.venv = function_venv(self.source / "requirements.txt")
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [
                    str(self.venv / "bin" / "functions-framework"),
                    f"--target={target}",
                    f"--signature-type={signature}",
                    "--source=main.py",
                    "--host=127.0.0.1",
                    f"--port={self.port}",
                ],
                cwd=self.source,
                env=deployed_env(env),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def python(self, code: str) -> subprocess.CompletedProcess[str]:
        """Run code the way the function runs: its venv, its directory, its environment."""
        return subprocess.run(
            [str(self.venv / "bin" / "python"), "-c", code],
            cwd=self.source,
            env=deployed_env(self.env),
            capture_output=True,
            text=True,
            timeout=60,
        )

    def logs(self) -> list[dict[str, Any]]:
        """The structured lines the function printed (what Cloud Logging would ingest)."""
        out = []
        for line in self.log.read_text().splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict) and "severity" in entry:
                    out.append(entry)
        return out

    def send(self, event: Any, message_id: str | None = None) -> requests.Response:
        return send(self.port, event, message_id)


@pytest.fixture(scope="module")
def webhook() -> Iterator[Recorder]:
    server = Recorder(WebhookHandler)
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def compute() -> Iterator[Recorder]:
    server = Recorder(ComputeHandler)
    server.members = {"web": {"demo-vm", "other-vm"}, "web-neg": {"demo-vm"}}  # type: ignore[attr-defined]
    server.metadata = {"meta-vm": "instanceGroups/special"}  # type: ignore[attr-defined]
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def firestore_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str | None]:
    """The official Firestore emulator (through gcloud), or None where it is not installed."""
    emulator = firestore_emulator()
    if emulator.missing:
        yield None
        return
    port = free_port()
    log = tmp_path_factory.mktemp("firestore") / "emulator.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                "gcloud",
                "emulators",
                "firestore",
                "start",
                f"--host-port=127.0.0.1:{port}",
                "--quiet",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    emulator.started(f"127.0.0.1:{port}")
    try:
        yield f"127.0.0.1:{port}"
    finally:
        stop(proc)


def skip_without_firestore() -> None:
    pytest.skip(f"needs the official Firestore emulator: {firestore_emulator().missing}")


@pytest.fixture(scope="module")
def functions(
    webhook: Recorder, compute: Recorder, firestore_host: str | None, tmp_path_factory
) -> Iterator[dict[str, Function]]:
    """All three functions, started together (start-up is the slow part) and stopped together."""
    tmp = tmp_path_factory.mktemp("functions")
    accepted = [f"{DEFAULT_TYPE_PREFIX}.{k}" for k in ("maintenance.started", "maintenance.ended")]
    targets = [
        {"type": "instance_group", "zone": ZONE, "name": "web"},
        {"type": "network_endpoint_group", "zone": ZONE, "name": "web-neg", "port": 8080},
        {"type": "instance_group", "zone": "europe-west1-b", "name": "elsewhere"},
    ]
    envs = {
        "notify": {
            "WEBHOOK_URL": f"http://127.0.0.1:{webhook.port}/v1/spaces/AAA/messages?key=k",
            "CHAT_FORMAT": "google_chat",
            "EVENT_FILTER": json.dumps({"ce-type": accepted}),
        },
        "drain": {
            "COMPUTE_API_BASE": f"http://127.0.0.1:{compute.port}/compute/v1",
            "COMPUTE_ANONYMOUS": "1",
            "DRAIN_TARGETS": json.dumps(targets),
            "DRAIN_METADATA_KEY": "drain-backends",
            # Load balancing itself, on unattested events: the policy off acts (and marks).
            # Verified origin, with the policy on, has its own functions (`verifying`).
            "REQUIRE_ATTESTATION": "false",
        },
    }
    if firestore_host:
        envs["ledger"] = {
            "FIRESTORE_EMULATOR_HOST": firestore_host,
            "GOOGLE_CLOUD_PROJECT": PROJECT,
            "LEDGER_COLLECTION": f"ledger-{uuid.uuid4().hex[:8]}",
        }
    running = {name: Function(name, env, tmp) for name, env in envs.items()}
    try:
        deadline = time.monotonic() + 60
        for fn in running.values():
            wait_for_port(fn.port, fn.proc, fn.log, deadline)
        if firestore_host:
            _wait_http(f"http://{firestore_host}/", deadline)
        yield running
    finally:
        for fn in running.values():
            stop(fn.proc)


def _wait_http(url: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.RequestException):
            if requests.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer in time")


def until(predicate: Any, timeout: float = 5.0) -> Any:
    """Poll for an effect that the function produces after answering (logs are flushed async)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


# --- the archive as deployed -----------------------------------------------------------------


def foreign_imports(source: str, own: set[str]) -> set[str]:
    """Top-level modules a Python source imports (at any depth) beyond the stdlib and `own`."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - own


def test_foreign_imports_sees_nested_and_from_imports() -> None:
    source = "import json\nfrom bridge import events\ndef f():\n    from requests import get\n"
    assert foreign_imports(source, {"bridge"}) == {"requests"}


@pytest.mark.parametrize("name", ["notify", "ledger", "drain", "autopilot", "system-events"])
def test_vendored_modules_import_only_the_standard_library(name: str) -> None:
    """Everything in the zip but main.py (bridge/events.py, subscriber.py) runs on any runtime:
    a new dependency of bridge/events.py would otherwise break every deployed function."""
    files = archive_files(name)
    own = {member.split("/")[0].removesuffix(".py") for member in files}
    for member, origin in files.items():
        if member.endswith(".py") and member != "main.py":
            assert not foreign_imports(origin.read_text(), own), member


def test_terraform_zips_exactly_what_the_tests_run(tmp_path: Path) -> None:
    """main.tf's own archive_file expressions, evaluated by Terraform, give the members and bytes
    build_archive() zips: the tested archive cannot drift from the deployed one."""
    terraform = shutil.which("terraform")
    if terraform is None:
        pytest.skip("no terraform binary on PATH; main.tf's archive expressions are not evaluated")
    import hcl2
    from hcl2.utils import SerializationOptions

    options = SerializationOptions(strip_string_quotes=True, explicit_blocks=False)
    with (REPO / "terraform" / "main.tf").open() as f:
        doc = hcl2.load(f, serialization_options=options)
    archive = next(d["archive_file"]["function"] for d in doc["data"] if "archive_file" in d)
    (dynamic,) = archive["dynamic"]
    source = dynamic["source"]
    (content,) = source["content"]

    def expr(value: str) -> str:
        assert value.startswith("${") and value.endswith("}"), value
        return value[2:-1].replace("source.key", "k").replace("source.value", "v")

    names = ["notify", "ledger", "drain", "autopilot", "system-events"]
    each, member, body = map(expr, (source["for_each"], content["filename"], content["content"]))
    inner = f"{{for k, v in {each} : {member} => {body}}}".replace("each.key", "fn")
    expression = f"jsonencode({{for fn in {json.dumps(names)} : fn => {inner}}})"
    module = tmp_path / "terraform"
    module.mkdir()
    (module / "functions").symlink_to(FUNCTIONS)
    (tmp_path / "bridge").symlink_to(REPO / "bridge")
    result = subprocess.run(
        [terraform, "console", "-no-color"],
        input=expression + "\n",
        capture_output=True,
        text=True,
        cwd=module,
        env={**os.environ, "TF_CLI_CONFIG_FILE": str(tmp_path / "none.tfrc")},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    zipped = json.loads(json.loads(result.stdout.strip().splitlines()[-1]))
    for name in names:
        tested = {m: path.read_text() for m, path in archive_files(name).items()}
        assert zipped[name] == tested, name


def test_deliveries_match_googles_message_published_schema() -> None:
    """What these tests send as Eventarc is what Google's schema of MessagePublishedData allows."""
    import jsonschema

    schema = json.loads((EVENTARC / "MessagePublishedData.schema.json").read_text())
    validator = jsonschema.Draft4Validator(schema)
    for example in sorted(EVENTARC.glob("data-*.json")):  # Google's own examples pass
        assert not list(validator.iter_errors(json.loads(example.read_text()))), example.name
    attributes, payload = maintenance("maintenance.started").to_pubsub()
    ours = message_published(attributes, payload, "m1")
    assert not list(validator.iter_errors(ours))
    assert list(validator.iter_errors({**ours, "message": {**ours["message"], "attributes": []}}))


def test_functions_run_from_their_archive_alone(functions) -> None:
    """What the running functions import is the unpacked zip and their own venv, never the repo."""
    probe = (
        "import json, os, sys, bridge.events, subscriber, functions_framework\n"
        "repo = [p for p in sys.path if os.path.isfile(os.path.join(p, 'bridge', 'cli.py'))]\n"
        "print(json.dumps([bridge.events.__file__, subscriber.__file__,"
        " functions_framework.__file__, repo]))"
    )
    for fn in functions.values():
        assert Path(os.readlink(f"/proc/{fn.proc.pid}/cwd")) == fn.source
        environ = Path(f"/proc/{fn.proc.pid}/environ").read_bytes().split(b"\0")
        assert not [v for v in environ if v.startswith(b"PYTHONPATH=")]
        result = fn.python(probe)
        assert result.returncode == 0, result.stderr
        events, subscriber, framework, repo_on_path = json.loads(result.stdout)
        assert Path(events) == fn.source / "bridge" / "events.py"
        assert Path(subscriber) == fn.source / "subscriber.py"
        assert Path(framework).is_relative_to(fn.venv)
        assert not repo_on_path, "the repository's bridge package is importable"
        outside = subprocess.run(
            [str(fn.venv / "bin" / "python"), "-c", "import bridge"],
            cwd=fn.source.parent,
            env=deployed_env(fn.env),
            capture_output=True,
            text=True,
        )
        assert "ModuleNotFoundError" in outside.stderr, "bridge importable outside the archive"


# --- notify -----------------------------------------------------------------------------------


def test_notify_posts_readable_google_chat_message(functions, webhook: Recorder) -> None:
    fn = functions["notify"]
    event = maintenance("maintenance.started", instance=vm("demo-vm", 1))
    assert fn.send(event).status_code == 200
    posted = webhook.take(lambda r: event.id in json.dumps(r["body"]))
    assert len(posted) == 1
    body, path = posted[0]["body"], posted[0]["path"]
    assert "demo-vm (us-central1-a): live migration starts in 60 s" in body["text"]
    # Unattested, so marked in the first words (it is posted all the same).
    assert body["text"].startswith("*[unverified origin: unattested] demo-vm")
    assert body["thread"]["threadKey"].endswith(vm("demo-vm", 1).id)
    assert "messageReplyOption=REPLY_MESSAGE_FALLBACK_TO_NEW_THREAD" in path
    received = [
        e for e in fn.logs() if e.get("event_id") == event.id and "received" in e["message"]
    ]
    # Eventarc mode, not the framework's silent plain-push fallback: source and subscription seen.
    assert received[0]["subscription"] == SUBSCRIPTION
    assert received[0]["ce_source"] == f"//pubsub.googleapis.com/{TOPIC}"


def test_notify_hand_crafted_message(functions, webhook: Recorder) -> None:
    attributes, payload = hand_crafted()
    resp = deliver(functions["notify"].port, message_published(attributes, payload, "hand-msg"))
    assert resp.status_code == 200
    posted = webhook.take(lambda r: "hand-1" in json.dumps(r["body"]))
    assert len(posted) == 1
    assert "hand-vm (us-central1-a): live migration starts in 60 s" in posted[0]["body"]["text"]


def test_notify_duplicate_posts_once(functions, webhook: Recorder) -> None:
    event = maintenance("maintenance.ended", previous=MIGRATE, current="NONE", sequence=2)
    # The same inner event delivered twice (a Pub/Sub redelivery and a bridge re-publish).
    for message_id in ("dup-1", "dup-1", "dup-2"):
        assert functions["notify"].send(event, message_id).status_code == 200
    posted = webhook.take(lambda r: event.id in json.dumps(r["body"]))
    assert len(posted) == 1
    assert "demo-vm (us-central1-a): live migration ended" in posted[0]["body"]["text"]


def test_notify_filter_drops_unwanted_kinds(functions, webhook: Recorder) -> None:
    event = maintenance("maintenance.changed", previous=MIGRATE, current="SOMETHING_NEW")
    assert functions["notify"].send(event).status_code == 200
    assert not webhook.take(lambda r: event.id in json.dumps(r["body"]))
    assert until(lambda: [e for e in functions["notify"].logs() if "filtered" in e["message"]])


def test_notify_retries_transient_webhook_failure(functions, webhook: Recorder) -> None:
    fn = functions["notify"]
    event = maintenance("maintenance.started", instance=vm("retry-vm", 2))
    webhook.fail_next.append(503)
    assert fn.send(event, "retry-1").status_code == 500  # raised: Eventarc retries it
    assert fn.send(event, "retry-1").status_code == 200  # the retry
    assert len(webhook.take(lambda r: event.id in json.dumps(r["body"]))) == 1


def test_notify_slack_format() -> None:
    """The Slack body, checked in-process (the server above runs the Google Chat format)."""
    module = _load_module("notify")
    event = maintenance("maintenance.started")
    body = module.payload(event, "slack")
    assert body["text"] == "demo-vm (us-central1-a): live migration starts in 60 s"
    assert body["blocks"][0]["text"]["type"] == "mrkdwn"
    stop_event = build_event(
        Transition(MAINTENANCE, "NONE", "TERMINATE_ON_HOST_MAINTENANCE", "maintenance.started"),
        event_id="x",
        sequence=3,
        observed_at=datetime(2026, 1, 1, tzinfo=timezone.utc),
        instance=vm("gpu-vm", 3),
        scheduling=Scheduling(),
        happened_while_down=True,
        notice_seconds=3600,
    )
    assert module.describe(stop_event) == (
        "gpu-vm (us-central1-a): host maintenance (the VM will be stopped) starts in 60 min"
        " (noticed when the bridge restarted)"
    )


def _load_module(name: str) -> Any:
    """A function's main.py imported in-process (for its pure helpers)."""
    spec = importlib.util.spec_from_file_location(f"{name}_main", FUNCTIONS / name / "main.py")
    assert spec and spec.loader
    sys.path.insert(0, str(SHARED))
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SHARED))
    return module


def golden(path: Path) -> tuple[dict[str, str], bytes]:
    """A golden binary-mode message from schemas/examples: attributes and the wire payload."""
    from bridge.events import dumps

    message = json.loads(path.read_text())
    return message["attributes"], dumps(message["data"])


def test_notify_describes_every_golden_example() -> None:
    from bridge.events import decode_pubsub

    assert GOLDEN, "schemas/examples has no golden messages"
    notify = _load_module("notify")
    texts = {}
    for path in GOLDEN:
        event = decode_pubsub(*golden(path))
        texts[event.kind] = notify.describe(event)
        who = f"{event.data.instance.name} ({event.data.instance.zone}): "
        assert texts[event.kind].startswith(who), path.name
        if event.kind != "bridge.heartbeat":
            assert " -> " not in texts[event.kind], f"{path.name}: generic fallback text"
    assert texts["maintenance.started"] == "demo-vm (us-central1-a): live migration starts in 60 s"
    assert "2030-01-15T02:00:00Z - 2030-01-15T06:00:00Z" in texts["upcoming.scheduled"]


def test_notify_never_posts_heartbeats(functions, webhook: Recorder) -> None:
    path = REPO / "schemas" / "examples" / "bridge.heartbeat.pubsub.json"
    attributes, payload = golden(path)
    notify = functions["notify"]
    data = message_published(attributes, payload, "heartbeat-1")
    assert deliver(notify.port, data).status_code == 200
    assert not webhook.take(lambda r: attributes["ce-id"] in json.dumps(r["body"]))


class SecretHandler(_Handler):
    """Secret Manager's `versions/latest:access`, for one secret."""

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.requests.append({"path": self.path, "body": None})
        if self.path == "/v1/projects/p/secrets/chat-webhook/versions/latest:access":
            data = base64.b64encode(b"https://chat.example/hook?key=k\n").decode()
            self._reply(
                200,
                {"name": "projects/p/secrets/chat-webhook/versions/3", "payload": {"data": data}},
            )
        else:
            self._reply(404, {"error": {"code": 404, "status": "NOT_FOUND"}})


def test_notify_reads_the_webhook_url_from_secret_manager(monkeypatch) -> None:
    from google.auth.credentials import AnonymousCredentials

    server = Recorder(SecretHandler)
    try:
        monkeypatch.delenv("WEBHOOK_URL", raising=False)
        notify = _load_module("notify")
        monkeypatch.setattr(notify, "SECRET_API", f"http://127.0.0.1:{server.port}/v1")
        monkeypatch.setattr(
            notify.google.auth, "default", lambda scopes: (AnonymousCredentials(), "p")
        )
        monkeypatch.setenv("WEBHOOK_SECRET", "projects/p/secrets/chat-webhook")
        assert notify.webhook_url() == "https://chat.example/hook?key=k"
        assert notify.webhook_url() == "https://chat.example/hook?key=k"
        assert len(server.take()) == 1  # cached
        notify._cached = None
        monkeypatch.setenv("WEBHOOK_SECRET", "projects/p/secrets/missing")
        with pytest.raises(notify.TransientError, match="404"):
            notify.webhook_url()  # raised: the delivery is retried until a version exists
    finally:
        server.shutdown()


# --- malformed input, every function ----------------------------------------------------------


@pytest.mark.parametrize("name", ["notify", "ledger", "drain"])
def test_malformed_messages_are_logged_and_acked(functions, name: str) -> None:
    if name not in functions:
        skip_without_firestore()
    fn = functions[name]
    for label, data in malformed():
        resp = deliver(fn.port, data, message_id=f"bad-{label}")
        assert resp.status_code == 200, (label, resp.text)
    errors = until(lambda: [e for e in fn.logs() if "malformed" in e["message"]])
    assert len(errors) >= len(malformed()), fn.log.read_text()[-2000:]
    assert all(e["severity"] == "ERROR" for e in errors)


# --- ledger -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ledger(functions) -> Iterator[tuple[Function, Any]]:
    """The ledger function and a Firestore client on the same emulator and collection."""
    if "ledger" not in functions:
        skip_without_firestore()
    from google.cloud import firestore

    fn = functions["ledger"]
    saved = os.environ.get("FIRESTORE_EMULATOR_HOST")
    os.environ["FIRESTORE_EMULATOR_HOST"] = fn.env["FIRESTORE_EMULATOR_HOST"]
    try:
        db = firestore.Client(project=PROJECT)
        yield fn, db.collection(fn.env["LEDGER_COLLECTION"])
    finally:
        if saved is None:
            os.environ.pop("FIRESTORE_EMULATOR_HOST", None)
        else:
            os.environ["FIRESTORE_EMULATOR_HOST"] = saved


def _doc(collection: Any, instance: Instance) -> dict[str, Any]:
    snap = collection.document(f"{PROJECT}_{instance.id}").get()
    return snap.to_dict() if snap.exists else {}


def test_ledger_keeps_state_and_history(ledger) -> None:
    fn, collection = ledger
    inst = vm("ledger-vm", 10)
    started = maintenance("maintenance.started", instance=inst, sequence=1)
    ended = maintenance(
        "maintenance.ended", instance=inst, sequence=2, previous=MIGRATE, current="NONE"
    )
    assert fn.send(started).status_code == 200
    doc = _doc(collection, inst)
    assert doc["disrupting"] is True
    assert doc["state"]["maintenance"]["current"] == MIGRATE
    assert doc["state"]["maintenance"]["subscription"] == SUBSCRIPTION  # Eventarc envelope seen
    assert fn.send(ended).status_code == 200
    doc = _doc(collection, inst)
    assert doc["disrupting"] is False
    assert doc["instance"]["name"] == "ledger-vm"
    assert [h["kind"] for h in doc["history"]] == ["maintenance.started", "maintenance.ended"]
    markers = list(collection.document(f"{PROJECT}_{inst.id}").collection("events").stream())
    assert len(markers) == 2


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_ledger_takes_the_bridges_event_straight_from_its_http_sink(ledger, mode: str) -> None:
    """terraform/examples/http-target points the HTTP sink at the ledger: no Eventarc envelope."""
    from bridge.sinks.http_post import on_the_wire

    fn, collection = ledger
    inst = vm(f"direct-{mode}", 20 if mode == "binary" else 21)
    event = maintenance("maintenance.started", instance=inst, sequence=1)
    headers, body = on_the_wire(event, mode)
    response = requests.post(f"http://127.0.0.1:{fn.port}/", data=body, headers=headers, timeout=10)
    assert response.status_code == 200
    doc = _doc(collection, inst)
    assert doc["disrupting"] is True
    assert doc["state"]["maintenance"]["current"] == MIGRATE
    assert [h["kind"] for h in doc["history"]] == ["maintenance.started"]


def test_ledger_duplicates_recorded_once(ledger) -> None:
    fn, collection = ledger
    inst = vm("dup-vm", 11)
    event = maintenance("maintenance.started", instance=inst)
    for message_id in ("a", "a", "b"):
        assert fn.send(event, message_id).status_code == 200
    doc = _doc(collection, inst)
    assert len(doc["history"]) == 1
    assert until(lambda: [e for e in fn.logs() if e["message"] == "ledger duplicate"])


def test_ledger_ignores_out_of_order_state(ledger) -> None:
    fn, collection = ledger
    inst = vm("late-vm", 12)
    ended = maintenance(
        "maintenance.ended", instance=inst, sequence=5, previous=MIGRATE, current="NONE"
    )
    late_start = maintenance("maintenance.started", instance=inst, sequence=4)
    assert fn.send(ended).status_code == 200
    assert fn.send(late_start).status_code == 200
    doc = _doc(collection, inst)
    assert doc["state"]["maintenance"]["sequence"] == 5
    assert doc["disrupting"] is False
    assert [h["sequence"] for h in doc["history"]] == [4, 5]


def test_ledger_answers_which_vms_are_about_to_be_disrupted(ledger) -> None:
    fn, collection = ledger
    busy = vm("busy-vm", 13)
    assert fn.send(maintenance("maintenance.started", instance=busy, sequence=1)).status_code == 200
    soon = vm("soon-vm", 14)
    window = {
        "type": "SCHEDULED",
        "can_reschedule": "true",
        "window_start_time": (datetime.now(timezone.utc) + timedelta(hours=2)).isoformat(),
        "window_end_time": (datetime.now(timezone.utc) + timedelta(hours=3)).isoformat(),
        "maintenance_status": "PENDING",
    }
    scheduled = build_event(
        Transition(
            "instance/upcoming-maintenance",
            "",
            json.dumps(window, sort_keys=True),
            "upcoming.scheduled",
        ),
        event_id=str(uuid.uuid4()),
        sequence=1,
        observed_at=datetime.now(timezone.utc),
        instance=soon,
        scheduling=Scheduling(),
        happened_while_down=False,
        notice_seconds=None,
    )
    assert fn.send(scheduled).status_code == 200
    module = _load_module("ledger")
    names = {
        vm_doc["instance"]["name"]
        for vm_doc in module.about_to_be_disrupted(
            collection._client, timedelta(hours=24), collection=collection.id
        )
    }
    assert {"busy-vm", "soon-vm"} <= names
    assert "ledger-vm" not in names  # its maintenance ended


def _in_stream(event: Any, stream_id: str) -> Any:
    return dataclasses.replace(event, data=dataclasses.replace(event.data, stream_id=stream_id))


def test_ledger_order_rules() -> None:
    """Within a stream the sequence decides; a new stream (a bridge on an empty state dir, which
    counts from 1 again) supersedes the old one at once; a late event of the old one does not."""
    ledger_main = _load_module("ledger")
    old, new = str(uuid.uuid4()), str(uuid.uuid4())
    stored = {"sequence": 9, "stream_id": old, "observed_at": "2026-01-01T12:00:09.000Z"}

    def at(sequence: int, second: int, stream: str) -> Any:
        moment = datetime(2026, 1, 1, 12, 0, second, tzinfo=timezone.utc)
        event = maintenance("maintenance.started", sequence=sequence, observed=moment)
        return _in_stream(event, stream)

    assert ledger_main._advances(at(10, 10, old), stored)
    assert not ledger_main._advances(at(9, 10, old), stored)  # the same event again
    assert not ledger_main._advances(at(8, 30, old), stored)  # late delivery, even if later
    assert ledger_main._advances(at(1, 11, new), stored)  # recreated: new stream, seconds later
    assert not ledger_main._advances(at(12, 5, new), stored)  # a stream that ended before
    assert ledger_main._advances(at(1, 0, old), None)


def test_ledger_expires_a_silent_vms_notice(ledger) -> None:
    """A VM deleted during a notice sends no `ended`: once its heartbeat is silent for
    SILENT_INTERVALS of its interval, the notice is expired; a beat brings it back."""
    fn, collection = ledger
    module = _load_module("ledger")
    inst, stream = vm("gone-vm", 15), str(uuid.uuid4())
    # Recent: the function's own sweep (on each beat, by the wall clock) must not expire it first.
    start = datetime.now(timezone.utc) - timedelta(seconds=600)

    def beat(sequence: int, seconds: int) -> Any:
        return _in_stream(
            build_event(
                Transition("bridge/heartbeat", "", "", "bridge.heartbeat"),
                event_id=str(uuid.uuid4()),
                sequence=sequence,
                observed_at=start + timedelta(seconds=seconds),
                instance=inst,
                scheduling=Scheduling(),
                happened_while_down=False,
                notice_seconds=None,
            ),
            stream,
        )

    started = maintenance(
        "maintenance.started", instance=inst, sequence=3, observed=start + timedelta(seconds=310)
    )
    for event in (beat(1, 0), beat(2, 300), _in_stream(started, stream)):
        assert fn.send(event).status_code == 200
    assert _doc(collection, inst)["heartbeat"]["interval_seconds"] == 300
    db, name = collection._client, collection.id
    assert module.expire_silent(db, start + timedelta(seconds=300 + 899), collection=name) == []
    expired = module.expire_silent(db, start + timedelta(seconds=300 + 901), collection=name)
    assert expired == [f"{PROJECT}_{inst.id}"]
    doc = _doc(collection, inst)
    assert doc["disrupting"] is False and "VM deleted" in doc["expired"]["reason"]
    assert doc["state"]["maintenance"]["current"] == MIGRATE  # the record stays
    assert fn.send(beat(4, 1300)).status_code == 200  # it was only a silent bridge
    doc = _doc(collection, inst)
    assert doc["disrupting"] is True and "expired" not in doc


def test_ledger_golden_sequence_and_heartbeat(ledger) -> None:
    """Every golden message, in order: each VM's document ends in the state the last ones say."""
    fn, collection = ledger
    messages = [golden(p) for p in GOLDEN]
    assert messages, "schemas/examples has no golden messages"
    messages.sort(key=lambda m: json.loads(m[1])["sequence"])
    for i, (attributes, payload) in enumerate(messages):
        data = message_published(attributes, payload, f"golden-{i}")
        assert deliver(fn.port, data).status_code == 200
    by_vm: dict[str, list[dict[str, Any]]] = {}
    for _, payload in messages:
        event = json.loads(payload)
        by_vm.setdefault(f"{event['instance']['project_id']}_{event['instance']['id']}", []).append(
            event
        )
    for doc_id, events in by_vm.items():
        doc = collection.document(doc_id).get().to_dict()
        changes = [e for e in events if e["key"] != "bridge/heartbeat"]
        assert len(doc["history"]) == len(changes), doc_id  # heartbeats are not history
        beats = [e for e in events if e["key"] == "bridge/heartbeat"]
        if beats:
            assert doc["heartbeat"]["sequence"] == beats[-1]["sequence"]
        for family, key in FAMILY_KEYS.items():
            last = [e for e in changes if e["key"] == key]
            if last:
                assert doc["state"][family]["current"] == last[-1]["current"], (doc_id, family)


FAMILY_KEYS = {key.family: key.path for key in KEYS.values()}


# --- drain ------------------------------------------------------------------------------------


def _calls(compute: Recorder, needle: str) -> list[str]:
    return [
        r["path"].split("/compute/v1/", 1)[1]
        for r in compute.take(
            lambda r: (
                needle in json.dumps(r["body"])
                and r["path"].endswith(("Instances", "NetworkEndpoints"))
            )
        )
    ]


def test_drain_removes_then_restores(functions, compute: Recorder) -> None:
    fn = functions["drain"]
    inst = vm("demo-vm", 1)
    started = maintenance("maintenance.started", instance=inst, sequence=1)
    assert fn.send(started).status_code == 200
    assert "demo-vm" not in compute.members["web"]  # type: ignore[attr-defined]
    assert "demo-vm" not in compute.members["web-neg"]  # type: ignore[attr-defined]
    assert "other-vm" in compute.members["web"]  # type: ignore[attr-defined]
    ended = maintenance(
        "maintenance.ended", instance=inst, sequence=2, previous=MIGRATE, current="NONE"
    )
    assert fn.send(ended).status_code == 200
    assert "demo-vm" in compute.members["web"]  # type: ignore[attr-defined]
    assert "demo-vm" in compute.members["web-neg"]  # type: ignore[attr-defined]
    calls = _calls(compute, "demo-vm")
    assert calls == [
        f"projects/{PROJECT}/zones/{ZONE}/instanceGroups/web/removeInstances",
        f"projects/{PROJECT}/zones/{ZONE}/networkEndpointGroups/web-neg/detachNetworkEndpoints",
        f"projects/{PROJECT}/zones/{ZONE}/instanceGroups/web/addInstances",
        f"projects/{PROJECT}/zones/{ZONE}/networkEndpointGroups/web-neg/attachNetworkEndpoints",
    ]  # never the group in another zone
    # A duplicate of `started` and a late, older one change nothing.
    assert fn.send(started, "again").status_code == 200
    late = maintenance("maintenance.started", instance=inst, sequence=1, event_id="late")
    assert fn.send(late).status_code == 200
    assert len(_calls(compute, "demo-vm")) == 4
    assert "demo-vm" in compute.members["web"]  # type: ignore[attr-defined]


def test_drain_retries_transient_compute_failure(functions, compute: Recorder) -> None:
    fn = functions["drain"]
    inst = vm("other-vm", 5)
    started = maintenance("maintenance.started", instance=inst, sequence=1)
    compute.fail_next.append(503)
    assert fn.send(started, "flaky").status_code == 500  # raised, so the trigger retries
    assert fn.send(started, "flaky").status_code == 200
    assert "other-vm" not in compute.members["web"]  # type: ignore[attr-defined]


def test_drain_uses_backends_named_in_instance_metadata(functions, compute: Recorder) -> None:
    fn = functions["drain"]
    compute.members["special"] = {"meta-vm"}  # type: ignore[attr-defined]
    event = maintenance("maintenance.started", instance=vm("meta-vm", 6), sequence=1)
    assert fn.send(event).status_code == 200
    assert _calls(compute, "meta-vm") == [
        f"projects/{PROJECT}/zones/{ZONE}/instanceGroups/special/removeInstances"
    ]
    assert compute.members["special"] == set()  # type: ignore[attr-defined]


def test_drain_ignores_other_kinds(functions, compute: Recorder) -> None:
    event = maintenance(
        "maintenance.changed",
        instance=vm("demo-vm", 1),
        sequence=9,
        previous=MIGRATE,
        current="TERMINATE_ON_HOST_MAINTENANCE",
    )
    before = len(compute.take())
    assert functions["drain"].send(event).status_code == 200
    assert len(compute.take()) == before


# --- end to end -------------------------------------------------------------------------------


def test_plain_pubsub_push_is_handled_too(functions, webhook: Recorder) -> None:
    """function_delivery = "push": Pub/Sub's own push body, which the framework converts."""
    event = maintenance("maintenance.started", instance=vm("push-vm", 20))
    attributes, payload = event.to_pubsub()
    body = message_published(attributes, payload, "push-1")
    resp = requests.post(f"http://127.0.0.1:{functions['notify'].port}/", json=body, timeout=30)
    assert resp.status_code == 200
    posted = webhook.take(lambda r: event.id in json.dumps(r["body"]))
    assert len(posted) == 1
    assert "push-vm (us-central1-a): live migration starts in 60 s" in posted[0]["body"]["text"]


def test_end_to_end_migration_reaches_each_function_once(
    functions, ledger, webhook: Recorder, compute: Recorder, pubsub, tmp_path: Path
) -> None:
    """bridge -> official Pub/Sub emulator -> push subscriptions -> functions -> effects."""
    _, collection = ledger
    from support.bridge import BridgeProcess
    from support.pubsub import admin

    from bridge.simulator import Simulator

    name, instance_id = "e2e-vm", "5550001112223334445"
    compute.members["web"].add(name)  # type: ignore[attr-defined]
    sim = Simulator(
        identity={
            "instance/id": instance_id,
            "instance/name": name,
            "instance/hostname": f"{name}.{ZONE}.c.demo-project.internal",
        }
    ).start()
    topic_name = f"e2e-{uuid.uuid4().hex[:8]}"
    with admin(pubsub) as ps:
        topic = ps.create_topic(topic_name)
        for fn in ("notify", "ledger", "drain"):
            endpoint = f"http://127.0.0.1:{functions[fn].port}/{topic}"
            ps.create_subscription(topic, f"{topic_name}-{fn}", push_endpoint=endpoint)
        bridge = BridgeProcess(sim.url, tmp_path / "state", "--topic", topic, env=pubsub.env())
        try:
            assert until(lambda: sim.stats().get(MAINTENANCE, 0) >= 2, timeout=10)
            sim.set_value(MAINTENANCE, MIGRATE)
            assert until(lambda: _posts_for(webhook, name), timeout=15), bridge.logs()[-5:]
            sim.set_value(MAINTENANCE, "NONE")
            assert until(lambda: len(_posts_for(webhook, name)) >= 2, timeout=15)
            assert until(lambda: len(_drain_calls(compute, name)) >= 2, timeout=15)
            assert until(lambda: len(_history(collection, instance_id)) >= 2, timeout=15)
            # Room for a duplicate delivery to show up: the functions must absorb it.
            holds_for("two posts", lambda: len(_posts_for(webhook, name)) == 2, 1.0)
        finally:
            assert bridge.terminate() == 0
            sim.stop()
    texts = [p["body"]["text"] for p in _posts_for(webhook, name)]
    assert len(texts) == 2, texts
    assert "e2e-vm (us-central1-a): live migration starts in 60 s" in texts[0]
    assert "e2e-vm (us-central1-a): live migration ended" in texts[1]
    assert [c.rsplit("/", 1)[1] for c in _drain_calls(compute, name)] == [
        "removeInstances",
        "addInstances",
    ]
    assert name in compute.members["web"]  # type: ignore[attr-defined]
    kinds = [h["kind"] for h in _history(collection, instance_id)]
    assert kinds == ["maintenance.started", "maintenance.ended"]


def _posts_for(webhook: Recorder, name: str) -> list[dict[str, Any]]:
    return webhook.take(lambda r: f"{name} (" in r["body"].get("text", ""))


def _drain_calls(compute: Recorder, name: str) -> list[str]:
    return [
        r["path"]
        for r in compute.take(lambda r: name in json.dumps(r["body"]))
        if r["path"].endswith("Instances")
    ]


def _history(collection: Any, instance_id: str) -> list[dict[str, Any]]:
    snap = collection.document(f"demo-project_{instance_id}").get()
    return (snap.to_dict() or {}).get("history", []) if snap.exists else []


# --- verified origin (issue 26) ---------------------------------------------------------------


@dataclasses.dataclass
class Verifying:
    """drain (REQUIRE_ATTESTATION on, its default), ledger and board, checking origin against
    the simulator's signing key; `sim` is the metadata server of whichever VM signs."""

    sim: Any
    drain: Function
    ledger: Function | None
    board: Function | None
    collection: Any

    def row(self, instance_id: str) -> dict[str, Any]:
        assert self.board is not None
        url = f"http://127.0.0.1:{self.board.port}/api/instances"
        rows = requests.get(url, timeout=30).json()["instances"]
        return next(r for r in rows if r["instance_id"] == instance_id)


@pytest.fixture(scope="module")
def verifying(
    compute: Recorder, firestore_host: str | None, tmp_path_factory
) -> Iterator[Verifying]:
    from bridge.simulator import Simulator

    sim = Simulator().start()
    tmp = tmp_path_factory.mktemp("verifying")
    policy = {
        "ATTESTATION_CERTS_URL": f"http://{sim.host_port}/simulator/v1/identity/certs",
        "CLOUD_EVENTS_IDENTITY": CLOUD_IDENTITY,
    }
    drain = Function(
        "drain",
        {
            **policy,
            "COMPUTE_API_BASE": f"http://127.0.0.1:{compute.port}/compute/v1",
            "COMPUTE_ANONYMOUS": "1",
            "DRAIN_TARGETS": json.dumps([{"type": "instance_group", "zone": ZONE, "name": "web"}]),
        },
        tmp,
    )
    running = [drain]
    ledger = board = collection = None
    saved = os.environ.get("FIRESTORE_EMULATOR_HOST")
    if firestore_host:
        from google.cloud import firestore

        store = {
            "FIRESTORE_EMULATOR_HOST": firestore_host,
            "GOOGLE_CLOUD_PROJECT": PROJECT,
            "LEDGER_COLLECTION": f"origin-{uuid.uuid4().hex[:8]}",
        }
        ledger = Function("ledger", {**policy, **store}, tmp)
        board = Function("board", {**store, "BOARD_CACHE_SECONDS": "0"}, tmp, "board", "http")
        running += [ledger, board]
        os.environ["FIRESTORE_EMULATOR_HOST"] = firestore_host
        collection = firestore.Client(project=PROJECT).collection(store["LEDGER_COLLECTION"])
    try:
        deadline = time.monotonic() + 60
        for fn in running:
            wait_for_port(fn.port, fn.proc, fn.log, deadline)
        yield Verifying(sim, drain, ledger, board, collection)
    finally:
        for fn in running:
            stop(fn.proc)
        sim.stop()
        if saved is None:
            os.environ.pop("FIRESTORE_EMULATOR_HOST", None)
        else:
            os.environ["FIRESTORE_EMULATOR_HOST"] = saved


# The simulator's default account (`<numeric-project-id>-compute@...`): the one signing here as
# the system-events function's service account.
CLOUD_IDENTITY = "123456789012-compute@developer.gserviceaccount.com"


def token_for(sim: Any, audience: str, signer: Instance | None, account: str = "default") -> str:
    """A token from the simulated metadata server, asked as the bridge asks: `format=full` as
    the VM `signer` (its instance, zone and project claims); None: a standard token of
    `account`, as a Cloud Run function gets one."""
    from bridge.metadata import MetadataClient

    params = {"audience": audience}
    if signer is not None:
        sim.set_value("instance/id", signer.id)
        sim.set_value("instance/zone", f"projects/{signer.project_number}/zones/{signer.zone}")
        sim.set_value("project/project-id", signer.project_id)
        params["format"] = "full"
    client = MetadataClient(sim.url)
    try:
        reading = client.get(f"instance/service-accounts/{account}/identity", params=params)
    finally:
        client.close()
    assert isinstance(reading.value, str), reading
    return reading.value


def signed(sim: Any, event: Any) -> Any:
    """`event` attested by its own VM, as a bridge with --attest on sends it."""
    return with_token(event, token_for(sim, binding_of(event), event.data.instance))


def send_now(fn: Function, event: Any) -> requests.Response:
    """Delivered as published now: the time a token is judged at."""
    attributes, payload = event.to_pubsub()
    now = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return deliver(fn.port, message_published(attributes, payload, uuid.uuid4().hex, now))


def started_of(name: str, number: int, sequence: int = 1) -> Any:
    return maintenance("maintenance.started", instance=vm(name, 700 + number), sequence=sequence)


def forgeries(sim: Any) -> dict[str, tuple[Any, str]]:
    """The four forgeries of issue 26, each on an event of its own VM, with the reason drain
    must give: what each would make drain do is take that VM out of its load balancer."""
    victim = started_of("victim-a", 1)
    other = vm("attacker", 799)  # VM A asks its own metadata server for B's audience
    by_another = with_token(victim, token_for(sim, binding_of(victim), other))
    earlier = signed(sim, started_of("victim-b", 2))
    fresh = started_of("victim-b", 2, sequence=2)
    replayed = with_token(fresh, token_of(earlier) or "")
    genuine = signed(sim, started_of("victim-c", 3))
    data = dataclasses.replace(genuine.data, notice_seconds=1)  # "drain me now"
    tampered = dataclasses.replace(genuine, data=data)
    return {
        "another VM's token": (by_another, "instance_id"),
        "replayed token": (replayed, "audience does not bind this event"),
        "tampered payload": (tampered, "audience does not bind this event"),
        "unattested": (started_of("victim-d", 4), "unattested"),
    }


def test_a_bridges_attested_event_verifies_in_drain_ledger_and_board(
    verifying: Verifying, compute: Recorder
) -> None:
    event = signed(verifying.sim, started_of("honest-vm", 10))
    compute.members["web"].add("honest-vm")  # type: ignore[attr-defined]
    assert send_now(verifying.drain, event).status_code == 200
    assert _calls(compute, "honest-vm") == [
        f"projects/{PROJECT}/zones/{ZONE}/instanceGroups/web/removeInstances"
    ]
    assert "honest-vm" not in compute.members["web"]  # type: ignore[attr-defined]
    if verifying.ledger is None:
        skip_without_firestore()
    assert send_now(verifying.ledger, event).status_code == 200
    doc = _doc(verifying.collection, event.data.instance)
    entry = doc["state"]["maintenance"]
    assert (entry["verified"], entry["origin_reason"]) == (True, "")
    row = verifying.row(event.data.instance.id)
    assert row["state"] == "maintenance" and row["unverified"] == []


@pytest.mark.parametrize(
    "case", ["another VM's token", "replayed token", "tampered payload", "unattested"]
)
def test_each_forgery_is_refused_by_drain_and_marked_by_ledger_and_board(
    verifying: Verifying, compute: Recorder, case: str
) -> None:
    event, reason = forgeries(verifying.sim)[case]
    name = event.data.instance.name
    compute.members["web"].add(name)  # type: ignore[attr-defined]
    assert send_now(verifying.drain, event).status_code == 200  # acknowledged, not retried
    refused = until(
        lambda: [
            r
            for r in verifying.drain.logs()
            if r.get("event_id") == event.id and r["message"].startswith("not acted on")
        ]
    )
    assert refused and reason in refused[0]["message"], verifying.drain.logs()[-3:]
    assert _calls(compute, name) == []
    assert name in compute.members["web"]  # type: ignore[attr-defined]
    if verifying.ledger is None:
        skip_without_firestore()
    assert send_now(verifying.ledger, event).status_code == 200
    entry = _doc(verifying.collection, event.data.instance)["state"]["maintenance"]
    assert entry["verified"] is False and reason in entry["origin_reason"]
    (mark,) = verifying.row(event.data.instance.id)["unverified"]
    assert mark["entry"] == "maintenance" and reason in mark["reason"]


def test_a_verified_event_supersedes_a_forgery_that_took_its_place(verifying: Verifying) -> None:
    """A forgery sent first, under the genuine event's stream and sequence, neither makes the
    genuine event a duplicate nor keeps the state it set."""
    if verifying.ledger is None:
        skip_without_firestore()
    genuine = signed(verifying.sim, started_of("raced-vm", 11))
    forged = dataclasses.replace(genuine, extensions={**genuine.extensions, "attestation2": "x"})
    assert send_now(verifying.ledger, forged).status_code == 200
    doc = _doc(verifying.collection, genuine.data.instance)
    assert doc["state"]["maintenance"]["verified"] is False
    assert send_now(verifying.ledger, genuine).status_code == 200
    doc = _doc(verifying.collection, genuine.data.instance)
    assert doc["state"]["maintenance"]["verified"] is True
    assert [h["verified"] for h in doc["history"]] == [False, True]


def cloud_event(kind: str, instance: Instance) -> Any:
    """The cloud's event about `instance`, as the system-events function makes it."""
    from bridge.system_events import convert

    entry = json.loads((REPO / "schemas" / "examples" / f"logentry.{kind}.json").read_text())
    entry["insertId"] = uuid.uuid4().hex
    entry["resource"]["labels"].update(instance_id=instance.id, zone=instance.zone)
    entry["resource"]["labels"]["project_id"] = instance.project_id
    entry["protoPayload"]["resourceName"] = (
        f"projects/{instance.project_id}/zones/{instance.zone}/instances/{instance.name}"
    )
    return convert(entry)


def test_a_cloud_event_verifies_by_the_system_events_identity_only(verifying: Verifying) -> None:
    """Signed by CLOUD_EVENTS_IDENTITY: verified; by any other account, or by the VM itself
    (a VM cannot speak as the cloud): marked."""
    if verifying.ledger is None:
        skip_without_firestore()
    sim = verifying.sim
    cases = {
        "cloud-vm": ("default", None, True, ""),
        "cloud-other": ("other@p.iam.gserviceaccount.com", None, False, "'other@p.iam"),
        "cloud-self": ("vm-sa@p.iam.gserviceaccount.com", "self", False, "'vm-sa@p.iam"),
    }
    for number, (name, (account, full, verified, reason)) in enumerate(cases.items(), 20):
        instance = vm(name, 700 + number)
        event = cloud_event("cloud.host_error", instance)
        signer = instance if full else None
        token = token_for(sim, binding_of(event), signer, account)
        assert send_now(verifying.ledger, with_token(event, token)).status_code == 200
        entry = _doc(verifying.collection, instance)["state"]["cloud"]
        assert (entry["verified"], reason in entry["origin_reason"]) == (verified, True), name


def test_a_real_bridges_attested_events_verify_end_to_end(
    verifying: Verifying, compute: Recorder, pubsub, tmp_path: Path
) -> None:
    """bridge --attest on -> official Pub/Sub emulator -> push -> drain acts (it verified) and
    the ledger and the board record the events as verified."""
    from support.bridge import BridgeProcess
    from support.pubsub import admin

    sim, name, instance_id = verifying.sim, "attesting-vm", "5550001112223337777"

    def doc() -> dict[str, Any]:
        snap = verifying.collection.document(f"demo-project_{instance_id}").get()
        return snap.to_dict() if snap.exists else {}

    for key, value in {
        "instance/id": instance_id,
        "instance/name": name,
        "instance/hostname": f"{name}.{ZONE}.c.demo-project.internal",
        "instance/zone": f"projects/123456789012/zones/{ZONE}",
        "project/project-id": "demo-project",
    }.items():
        sim.set_value(key, value)
    compute.members["web"].add(name)  # type: ignore[attr-defined]
    topic_name = f"attest-{uuid.uuid4().hex[:8]}"
    pushed = [verifying.drain] + ([verifying.ledger] if verifying.ledger else [])
    with admin(pubsub) as ps:
        topic = ps.create_topic(topic_name)
        for n, fn in enumerate(pushed):
            endpoint = f"http://127.0.0.1:{fn.port}/{topic}"
            ps.create_subscription(topic, f"{topic_name}-{n}", push_endpoint=endpoint)
        args = ("--topic", topic, "--attest", "on")
        bridge = BridgeProcess(sim.url, tmp_path / "state", *args, env=pubsub.env())
        try:
            assert until(lambda: sim.stats().get(MAINTENANCE, 0) >= 2, timeout=10)
            sim.set_value(MAINTENANCE, MIGRATE)
            assert until(lambda: _drain_calls(compute, name), timeout=15), bridge.logs()[-5:]
            if verifying.ledger is not None:
                started = until(lambda: (doc().get("state") or {}).get("maintenance"), 15)
                assert started, verifying.ledger.logs()[-3:]
        finally:
            assert bridge.terminate() == 0
            sim.set_value(MAINTENANCE, "NONE")
    assert [c.rsplit("/", 1)[1] for c in _drain_calls(compute, name)] == ["removeInstances"]
    refused = [
        r
        for r in verifying.drain.logs()
        if "not verified" in r.get("message", "")
        and r.get("event_source", "").endswith(f"/instances/{name}")
    ]
    assert not refused, refused
    if verifying.ledger is None:
        skip_without_firestore()
    entry = doc()["state"]["maintenance"]
    assert entry["verified"] is True, entry
    assert verifying.row(instance_id)["unverified"] == []


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_an_attested_event_posted_by_the_http_sink_verifies(
    verifying: Verifying, compute: Recorder, mode: str
) -> None:
    """No Pub/Sub envelope, no publish time: judged when received, the token in ce- headers
    (binary) or JSON members (structured), as the HTTP sink sends extensions."""
    from bridge.sinks.http_post import on_the_wire

    event = signed(verifying.sim, started_of(f"posted-{mode}", 30 if mode == "binary" else 31))
    name = event.data.instance.name
    compute.members["web"].add(name)  # type: ignore[attr-defined]
    headers, body = on_the_wire(event, mode)
    for fn in filter(None, (verifying.drain, verifying.ledger)):
        url = f"http://127.0.0.1:{fn.port}/"
        assert requests.post(url, data=body, headers=headers, timeout=10).status_code == 200
    assert [c.rsplit("/", 1)[1] for c in _calls(compute, name)] == ["removeInstances"]
    if verifying.ledger is None:
        skip_without_firestore()
    assert _doc(verifying.collection, event.data.instance)["state"]["maintenance"]["verified"]


def test_notify_marks_only_an_unverified_event_in_either_format() -> None:
    notify = _load_module("notify")
    event = maintenance("maintenance.started", instance=vm("demo-vm", 1))
    for fmt in ("google_chat", "slack"):
        plain = notify.payload(event, fmt)["text"]
        marked = notify.payload(event, fmt, unverified="audience does not bind this event")["text"]
        assert "unverified" not in plain, fmt
        assert marked.lstrip("*").startswith("[unverified origin: audience does not bind"), fmt


def test_a_certificate_fetch_that_fails_is_retried_not_a_verdict(
    verifying: Verifying, tmp_path: Path
) -> None:
    """Google's endpoint unreachable says nothing of who signed: the delivery fails (the trigger
    retries it); an unattested event needs no certificate and is refused at once."""
    closed = f"http://127.0.0.1:{free_port()}/certs"
    drain = Function("drain", {"ATTESTATION_CERTS_URL": closed, "COMPUTE_ANONYMOUS": "1"}, tmp_path)
    try:
        wait_for_port(drain.port, drain.proc, drain.log, time.monotonic() + 60)
        attested = signed(verifying.sim, started_of("no-certs-vm", 40))
        assert send_now(drain, attested).status_code >= 500
        assert send_now(drain, started_of("no-certs-vm", 40, sequence=2)).status_code == 200
    finally:
        stop(drain.proc)
    assert "TransientError: signing certificates unavailable" in drain.log.read_text()


def test_a_newer_bridges_event_verifies_by_the_message_as_published(
    verifying: Verifying, compute: Recorder
) -> None:
    """A field a later v1 bridge adds is dropped by this decoder, but the token digests it:
    the functions bind the message as published (origin.signed_part_of_message)."""
    from bridge.origin import signed_part_of_message

    event = started_of("newer-vm", 50)
    compute.members["web"].add("newer-vm")  # type: ignore[attr-defined]
    attributes, payload = event.to_pubsub()
    newer = json.dumps({**json.loads(payload), "added_in_v1_9": {"x": 1}}).encode()
    audience = binding(signed_part_of_message(attributes, newer))
    token = token_for(verifying.sim, audience, event.data.instance)
    attested, _ = with_token(event, token).to_pubsub()
    now = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    delivery = message_published(attested, newer, uuid.uuid4().hex, now)
    assert deliver(verifying.drain.port, delivery).status_code == 200
    assert [c.rsplit("/", 1)[1] for c in _calls(compute, "newer-vm")] == ["removeInstances"]
