"""Security: where the bridge may connect, what it never logs, and parsers that only fail cleanly.

- A metadata URL outside link-local, loopback and metadata.google.internal is refused (exit 2,
  one line) unless --allow-metadata-host; so is one carrying credentials.
- A full run (Pub/Sub emulator, metadata faults, failing publishes, DEBUG logging) with tokens
  planted in the environment, in a credentials file and in the metadata server: none of them,
  nor anything that looks like a credential, reaches the logs.
- Hypothesis fuzzing of every parser: the metadata response parser (only MetadataError), the
  configuration (only ConfigError, and only finite numbers get through), the event decoder
  (only DecodeError) and the example functions' shared unwrap (never raises).
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.harness import wait_for_text

from bridge.cli import main as cli_main
from bridge.config import RUN_OPTIONS, Config, ConfigError, build
from bridge.events import (
    MAINTENANCE,
    DecodeError,
    Event,
    Instance,
    Scheduling,
    Transition,
    build_event,
    decode_message_published,
    decode_pubsub,
    decode_push,
    decode_structured,
    dumps,
)
from bridge.http1 import Response
from bridge.metadata import FAILURE_CLASSES, MAX_BODY, MetadataError, Reading, _reading
from bridge.simulator import Simulator

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).with_name("maintenance-bridge")
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BRIDGE_", "GCE_", "PUBSUB"))}
    env.update(extra)
    return env


# -- where the bridge may connect ----------------------------------------------------------------

REFUSED = [
    "http://10.0.0.5/computeMetadata/v1/",
    "http://example.com/computeMetadata/v1/",
    "http://169.254.169.254.nip.io/computeMetadata/v1/",
    "http://metadata.google.internal.evil.example/computeMetadata/v1/",
    "http://metadata.google.internal@evil.example/computeMetadata/v1/",
    "http://0.0.0.0/computeMetadata/v1/",
    "http://[::ffff:10.0.0.1]/computeMetadata/v1/",
    "http://127.1/computeMetadata/v1/",  # resolvers read it as 127.0.0.1; refusing is the safe way
    "https://metadata.google.internal/computeMetadata/v1/",
    "file:///etc/passwd",
    "http://user:secret@169.254.169.254/computeMetadata/v1/",  # credentials in the URL
]
ALLOWED = [
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://METADATA.GOOGLE.INTERNAL/computeMetadata/v1/",
    "http://169.254.169.254/computeMetadata/v1/",
    "http://127.0.0.1:8089/computeMetadata/v1/",
    "http://localhost:8089/computeMetadata/v1/",
    "http://[::1]:8089/computeMetadata/v1/",
    "http://[fe80::1]/computeMetadata/v1/",
]


def _build(argv: list[str], env: dict[str, str] | None = None) -> Config:
    parser = argparse.ArgumentParser()
    from bridge.config import add_run_options

    add_run_options(parser)
    return build(parser.parse_args(argv), env or {}, check_dirs=False)


@pytest.mark.parametrize("url", REFUSED)
def test_metadata_url_refused(url, tmp_path, capsys):
    with pytest.raises(ConfigError) as refused:
        _build(["--metadata-url", url, "--state-dir", str(tmp_path)])
    assert "\n" not in str(refused.value)
    assert cli_main(["run", "--metadata-url", url, "--state-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("maintenance-bridge: error: --metadata-url")
    assert "secret" not in err  # the refusal does not repeat the credentials either


@pytest.mark.parametrize("url", ALLOWED)
def test_metadata_url_allowed(url, tmp_path):
    assert _build(["--metadata-url", url, "--state-dir", str(tmp_path)]).metadata_url == url


def test_gce_metadata_host_is_checked_too(tmp_path):
    with pytest.raises(ConfigError):
        _build(["--state-dir", str(tmp_path)], {"GCE_METADATA_HOST": "evil.example:80"})
    config = _build(["--state-dir", str(tmp_path)], {"GCE_METADATA_HOST": "169.254.169.254"})
    assert config.metadata_url == "http://169.254.169.254/computeMetadata/v1/"


def test_allow_metadata_host_is_explicit(tmp_path):
    url = "http://10.0.0.5/computeMetadata/v1/"
    assert _build(["--metadata-url", url, "--allow-metadata-host", "true"]).metadata_url == url
    env = {"BRIDGE_METADATA_URL": url, "BRIDGE_ALLOW_METADATA_HOST": "1"}
    assert _build(["--state-dir", str(tmp_path)], env).metadata_url == url


def test_refusal_from_the_real_command(tmp_path):
    """The installed command: exit 2, one line on stderr, nothing on stdout, nothing started."""
    proc = subprocess.run(
        [str(BIN), "run", "--state-dir", str(tmp_path / "state")],
        env=_clean_env(GCE_METADATA_HOST="203.0.113.7"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "203.0.113.7" in proc.stderr, proc.stderr
    assert "--allow-metadata-host" in proc.stderr


# -- nothing secret in the logs ------------------------------------------------------------------

PLANTED = {
    "token": "ya29.a0PLANTEDaccessTokenDoNotLog0123456789",
    "env_secret": "PLANTED-env-secret-0451",
    "private_key": "PLANTEDprivateKeyMaterialDoNotLog",
    "refresh": "1//0PLANTEDrefreshToken",
}
FORBIDDEN = [
    "ya29.",
    "Bearer",
    "private_key",
    "PRIVATE KEY",
    "refresh_token",
    "Authorization",
    "PLANTED",
    *PLANTED.values(),
]


def test_no_credentials_in_logs_of_a_full_run(tmp_path, pubsub):
    from support.pubsub import admin

    key_file = tmp_path / "sa.json"
    key_file.write_text(
        json.dumps(
            {
                "type": "service_account",
                "private_key_id": "0123",
                "private_key": "-----BEGIN PRIVATE KEY-----\n"
                + PLANTED["private_key"]
                + "\n-----END PRIVATE KEY-----\n",
                "client_email": "bridge@demo-project.iam.gserviceaccount.com",
            }
        )
    )
    sim = Simulator().start()
    server = pubsub  # the session's (conftest.py); the test only creates its own topic
    hook_log = tmp_path / "hook.out"
    try:
        # The metadata server holds a token (as the real one does); the bridge never asks for it.
        sim.set_value(
            "instance/service-accounts/default/token",
            json.dumps(
                {"access_token": PLANTED["token"], "expires_in": 3599, "token_type": "Bearer"}
            ),
        )
        sim.set_value("instance/attributes/ssh-keys", f"user:ssh-rsa {PLANTED['env_secret']}")
        with admin(server) as adm:
            suffix = uuid.uuid4().hex[:8]
            topic = adm.create_topic(f"security-{suffix}")
            adm.create_subscription(topic, f"security-sub-{suffix}")
        missing_topic = f"projects/{server.project}/topics/missing-{suffix}"
        env = _clean_env(
            GOOGLE_APPLICATION_CREDENTIALS=str(key_file),
            CLOUDSDK_AUTH_ACCESS_TOKEN=PLANTED["token"],
            GOOGLE_OAUTH_ACCESS_TOKEN=PLANTED["token"],
            BRIDGE_TEST_SECRET=PLANTED["env_secret"],
            REFRESH_TOKEN=PLANTED["refresh"],
            **server.env(),
        )
        logs: list[str] = []
        for run_topic in (topic, missing_topic):  # a healthy run, and one whose publishes fail
            sim.inject("status", 3, "instance/zone", status=503)  # identity retried
            sim.inject("status", 2, MAINTENANCE, status=403, body="Forbidden")
            sim.inject("reset", 2, MAINTENANCE)
            sim.inject("malformed", 2, "instance/preempted")
            state = tmp_path / f"state-{len(logs)}"
            out, err = tmp_path / f"out-{len(logs)}", tmp_path / f"err-{len(logs)}"
            with out.open("wb") as stdout, err.open("wb") as stderr:
                proc = subprocess.Popen(
                    [
                        str(BIN),
                        "run",
                        "--metadata-url",
                        sim.url,
                        "--state-dir",
                        str(state),
                        "--topic",
                        run_topic,
                        "--log-level",
                        "DEBUG",
                        "--retry-cap",
                        "0.2",
                        "--poll-timeout",
                        "1",
                        "--drain-timeout",
                        "0.5",
                        "--exec",
                        f"sh -c 'cat > {hook_log}; exit 3'",  # a failing hook is logged too
                    ],
                    env=env,
                    stdout=stdout,
                    stderr=stderr,
                )
            try:
                wait_for_text(err, "watching")
                steps = [
                    (MAINTENANCE, "MIGRATE_ON_HOST_MAINTENANCE", "maintenance.started"),
                    (MAINTENANCE, "NONE", "maintenance.ended"),
                    ("instance/preempted", "TRUE", "preemption.started"),
                ]
                for key, value, kind in steps:
                    sim.set_value(key, value)
                    wait_for_text(err, kind)
                wait_for_text(err, "hook")
                sim.set_value("instance/preempted", "FALSE")  # reset for the next run
                wait_for_text(err, "preemption.ended")
            finally:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
            logs.append(err.read_text(errors="replace") + out.read_text(errors="replace"))
    finally:
        sim.stop()
    everything = "\n".join(logs)
    # Not vacuous: the logs do tell of the faults, the failed publishes and the hook.
    assert "metadata http_4xx" in everything and "metadata connection" in everything
    assert "not_found" in everything and "hook" in everything
    assert "maintenance.started" in everything
    for needle in FORBIDDEN:
        assert needle.lower() not in everything.lower(), f"{needle!r} found in the logs"
    _write_figures(
        "security_logs",
        {
            "runs": len(logs),
            "log_lines_scanned": everything.count("\n"),
            "forbidden_strings_checked": len(FORBIDDEN),
            "forbidden_strings_found": 0,
        },
    )


def _write_figures(name: str, figures: dict[str, Any]) -> None:
    target = os.environ.get("BRIDGE_FIGURES_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        body = {"test": name, "finished": stamp, **figures}
        (Path(target) / f"{name}.json").write_text(json.dumps(body, indent=2) + "\n")


# -- fuzzing: the metadata response parser -------------------------------------------------------

_statuses = st.one_of(
    st.sampled_from([200, 200, 200, 301, 302, 307, 400, 403, 404, 429, 500, 503, 504]),
    st.integers(min_value=100, max_value=599),
)
_flavors = st.sampled_from(["Google", "Google", "Google", None, "google", "Google ", "Goog"])
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
_bodies = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=200).map(str.encode),
    _json_values.map(lambda v: json.dumps(v).encode()),
    st.just(b'{"error":"no notifications have been received yet, try again later"}'),
    st.integers(min_value=MAX_BODY - 2, max_value=MAX_BODY + 2).map(lambda n: b"1" * n),
    st.just(b"\xff\xfe\xfa"),
)


def _response(status: int, flavor: str | None, etag: str | None, body: bytes) -> Any:
    """What the metadata client's transport (bridge/http1.py) hands to the parser."""
    headers: dict[str, str] = {}
    if flavor is not None:
        headers["metadata-flavor"] = flavor
    if etag is not None:
        headers["etag"] = etag
    if 300 <= status < 400:
        headers["location"] = "http://evil.example/"
    return Response(status, headers, body)


@FUZZ
@given(
    status=_statuses,
    flavor=_flavors,
    etag=st.none() | st.text(alphabet="0123456789abcdef", min_size=1, max_size=16),
    body=_bodies,
    alt=st.sampled_from(["json", "text"]),
)
def test_fuzz_metadata_response_parser(status, flavor, etag, body, alt):
    try:
        reading = _reading(
            "instance/maintenance-event", _response(status, flavor, etag, body), 1.0, alt
        )
    except MetadataError as exc:
        assert exc.failure_class in FAILURE_CLASSES
        return
    assert isinstance(reading, Reading)
    assert flavor == "Google", "a response without Metadata-Flavor: Google is never accepted"
    assert not 300 <= status < 400, "a redirect is never accepted"
    if reading.absent:
        assert status in (404, 503)
    else:
        assert status == 200 and len(body) <= MAX_BODY
        expected = json.loads(body.decode()) if alt == "json" else body.decode()
        assert reading.value == expected or (isinstance(expected, float) and math.isnan(expected))
        assert reading.etag == etag


def test_metadata_parser_against_the_simulator_faults():
    """The same parser on the simulator's real fault responses: only MetadataError."""
    from bridge.metadata import MetadataClient

    with Simulator() as sim:
        sim.start()
        client = MetadataClient(sim.url)
        try:
            kinds = ["malformed", "huge", "invalid_utf8", "no_flavor", "redirect", "drop", "reset"]
            for kind in kinds:
                sim.inject(kind, 1, MAINTENANCE)
                with pytest.raises(MetadataError):
                    client.get(MAINTENANCE)
            for status in (400, 403, 429, 500, 503, 504):
                sim.inject("status", 1, MAINTENANCE, status=status)
                with pytest.raises(MetadataError):
                    client.get(MAINTENANCE)
            assert client.get(MAINTENANCE).value == "NONE"
        finally:
            client.close()


# -- fuzzing: the configuration -----------------------------------------------------------------

_ENV_NAMES = [opt.env for opt in RUN_OPTIONS] + ["GCE_METADATA_HOST"]
_env_values = st.one_of(
    st.text(max_size=30),
    st.sampled_from(
        ["0", "-1", "1", "1e309", "inf", "-inf", "nan", "NaN", "1_0", " 5 ", "true", "yes", "", "٣"]
    ),
    st.sampled_from(
        [
            "projects/demo-project/topics/t-1",
            "http://169.254.169.254/computeMetadata/v1/",
            "127.0.0.1:8089",
            "pubsub",
            "stdout",
            "structured",
            "instance/preempted",
        ]
    ),
)


@FUZZ
@given(env=st.dictionaries(st.sampled_from(_ENV_NAMES), _env_values, max_size=8))
def test_fuzz_configuration(env):
    try:
        config = build(argparse.Namespace(), env, check_dirs=False)
    except ConfigError as exc:
        assert str(exc) and "\n" not in str(exc).strip("\n")
        return
    # What gets through is usable: finite numbers (a NaN or inf wait would crash a loop later).
    for name in ("poll_timeout", "absent_interval", "retry_cap", "drain_timeout", "exec_timeout"):
        assert math.isfinite(getattr(config, name)), (name, getattr(config, name))
    for name in ("heartbeat_interval", "publish_latency"):
        assert math.isfinite(getattr(config, name)), (name, getattr(config, name))


# -- fuzzing: the decoder -----------------------------------------------------------------------

_INSTANCE = Instance("4520031799277579481", "demo-vm", "us-central1-a", "demo-project", "1234")


def _valid_event() -> Event:
    from datetime import datetime, timezone

    return build_event(
        Transition(MAINTENANCE, "NONE", "MIGRATE_ON_HOST_MAINTENANCE", "maintenance.started"),
        event_id="0f4b7c2e-1111-4222-8333-944445555666",
        sequence=7,
        observed_at=datetime(2030, 1, 15, 2, 0, tzinfo=timezone.utc),
        instance=_INSTANCE,
        scheduling=Scheduling("MIGRATE", "TRUE", "FALSE", "STANDARD"),
        happened_while_down=False,
        notice_seconds=60,
    )


def _mutate(obj: Any, path: list[str | int], value: Any, delete: bool) -> Any:
    """A copy of obj with the node at (a prefix of) path replaced or deleted."""
    if not path or not isinstance(obj, dict | list):
        return value
    head, rest = path[0], path[1:]
    if isinstance(obj, dict):
        keys = list(obj)
        if not keys:
            return obj
        key = keys[hash(head) % len(keys)]
        out = dict(obj)
        if delete and not rest:
            del out[key]
        else:
            out[key] = _mutate(obj[key], rest, value, delete)
        return out
    if not obj:
        return obj
    index = hash(head) % len(obj)
    out_list = list(obj)
    out_list[index] = _mutate(obj[index], rest, value, delete)
    return out_list


_paths = st.lists(st.text(max_size=3) | st.integers(), min_size=1, max_size=4)


def _only_decode_errors(fn: Any, *args: Any) -> Event | None:
    try:
        event = fn(*args)
    except DecodeError as exc:
        assert str(exc)
        return None
    assert isinstance(event, Event)
    return event


@FUZZ
@given(path=_paths, value=_json_values, delete=st.booleans())
def test_fuzz_decoder_structured_mutations(path, value, delete):
    structured = _valid_event().to_structured()
    mutated = _mutate(structured, path, value, delete)
    _only_decode_errors(decode_structured, mutated)
    # The same, as the JSON line the stdout sink writes and as a structured Pub/Sub message.
    line = dumps(mutated)
    _only_decode_errors(
        decode_pubsub, {"content-type": "application/cloudevents+json; charset=UTF-8"}, line
    )


@FUZZ
@given(
    attr_path=_paths,
    attr_value=st.one_of(st.text(max_size=30), _json_values),
    data_path=_paths,
    data_value=_json_values,
    delete=st.booleans(),
    raw=st.booleans(),
)
def test_fuzz_decoder_binary_mutations(attr_path, attr_value, data_path, data_value, delete, raw):
    attributes, data = _valid_event().to_pubsub("binary")
    attributes = _mutate(attributes, attr_path, attr_value, delete)
    payload = json.loads(data)
    if raw:
        _only_decode_errors(decode_pubsub, attributes, data[: len(data) // 2])
    payload = _mutate(payload, data_path, data_value, delete)
    _only_decode_errors(decode_pubsub, attributes, dumps(payload))


@FUZZ
@given(
    anything=_json_values,
    attributes=st.dictionaries(st.text(max_size=12), st.text(max_size=12), max_size=5)
    | _json_values,
    data=st.binary(max_size=200) | st.text(max_size=100),
)
def test_fuzz_decoder_arbitrary_input(anything, attributes, data):
    _only_decode_errors(decode_structured, anything)
    _only_decode_errors(decode_message_published, anything)
    _only_decode_errors(decode_push, data)
    _only_decode_errors(decode_push, dumps(anything))
    _only_decode_errors(decode_pubsub, attributes, data)
    envelope = {
        "message": {"data": base64.b64encode(dumps(anything)).decode(), "attributes": attributes}
    }
    _only_decode_errors(decode_message_published, envelope)


# -- fuzzing: the example functions' envelope handling -------------------------------------------


def _load_subscriber() -> Any:
    path = ROOT / "terraform" / "functions" / "_shared" / "subscriber.py"
    if not path.is_file():
        pytest.skip("example functions not present")
    spec = importlib.util.spec_from_file_location("_bridge_example_subscriber", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _FakeCloudEvent:
    """The parts of functions-framework's CloudEvent that `unwrap` uses."""

    def __init__(self, attributes: dict[str, Any], data: Any) -> None:
        self._attributes = attributes
        self._data = data

    def get_data(self) -> Any:
        return self._data

    def get(self, name: str, default: Any = None) -> Any:
        return self._attributes.get(name, default)

    def get_attributes(self) -> dict[str, Any]:
        return dict(self._attributes)


@FUZZ
@given(
    ce_type=st.sampled_from(
        ["google.cloud.pubsub.topic.v1.messagePublished", "com.example.forged", ""]
    ),
    path=_paths,
    value=_json_values,
    delete=st.booleans(),
    anything=_json_values,
)
def test_fuzz_example_functions_unwrap(ce_type, path, value, delete, anything):
    subscriber = _load_subscriber_cached()
    attributes, data = _valid_event().to_pubsub("binary")
    envelope = {
        "subscription": "projects/demo-project/subscriptions/s",
        "message": {
            "data": base64.b64encode(data).decode(),
            "attributes": attributes,
            "messageId": "1",
        },
    }
    for payload in (_mutate(envelope, path, value, delete), anything):
        event = _FakeCloudEvent({"type": ce_type, "source": "//pubsub", "id": "1"}, payload)
        result = subscriber.unwrap(event, {})
        assert result is None or isinstance(result, Event)
        if ce_type != "google.cloud.pubsub.topic.v1.messagePublished":
            # Not an Eventarc envelope: only the bridge's own event, sent directly, is accepted.
            assert result is None, "a forged envelope is never taken for a bridge event"


_SUBSCRIBER: list[Any] = []


def _load_subscriber_cached() -> Any:
    if not _SUBSCRIBER:
        _SUBSCRIBER.append(_load_subscriber())
    return _SUBSCRIBER[0]
