"""Configuration: flags over BRIDGE_* over defaults; bad input is one line and exit 2."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from bridge.config import ConfigError, add_run_options, build


def _build(argv: list[str], env: dict[str, str], tmp_path: Path):
    parser = argparse.ArgumentParser()
    add_run_options(parser)
    env = {"BRIDGE_STATE_DIR": str(tmp_path), **env}
    return build(parser.parse_args(argv), env)


def test_flags_win_over_environment(tmp_path: Path) -> None:
    config = _build(
        ["--poll-timeout", "30"],
        {"BRIDGE_POLL_TIMEOUT": "45", "BRIDGE_DRAIN_TIMEOUT": "2.5"},
        tmp_path,
    )
    assert config.poll_timeout == 30
    assert config.drain_timeout == 2.5


def test_sink_follows_the_topic(tmp_path: Path) -> None:
    assert _build([], {}, tmp_path).sink == "stdout"
    config = _build([], {"BRIDGE_TOPIC": "projects/my-proj/topics/maint"}, tmp_path)
    assert (config.sink, config.topic) == ("pubsub", "projects/my-proj/topics/maint")


def test_gce_metadata_host_is_honoured(tmp_path: Path) -> None:
    config = _build([], {"GCE_METADATA_HOST": "169.254.169.254:8080"}, tmp_path)
    assert config.metadata_url == "http://169.254.169.254:8080/computeMetadata/v1/"
    assert _build([], {}, tmp_path).metadata_url == (
        "http://metadata.google.internal/computeMetadata/v1/"
    )


def test_pubsub_emulator_host_is_honoured_and_the_transport_defaults_to_rest(
    tmp_path: Path,
) -> None:
    topic = {"BRIDGE_TOPIC": "projects/my-proj/topics/maint"}
    config = _build([], {**topic, "PUBSUB_EMULATOR_HOST": "127.0.0.1:8085"}, tmp_path)
    assert (config.pubsub_emulator_host, config.pubsub_transport) == ("127.0.0.1:8085", "rest")
    assert _build([], topic, tmp_path).pubsub_emulator_host == ""
    flagged = _build(
        ["--pubsub-emulator-host", "127.0.0.1:9"],
        {**topic, "PUBSUB_EMULATOR_HOST": "127.0.0.1:8085"},
        tmp_path,
    )
    assert flagged.pubsub_emulator_host == "127.0.0.1:9", "the flag wins over Google's variable"
    regional = _build(["--pubsub-endpoint", "us-east1-pubsub.googleapis.com"], topic, tmp_path)
    assert regional.pubsub_endpoint == "us-east1-pubsub.googleapis.com"


def test_config_and_sinks_do_not_import_each_other() -> None:
    """The sinks receive their own option types; no module of bridge/sinks imports config."""
    sinks = Path(__file__).resolve().parents[1] / "bridge" / "sinks"
    for path in sinks.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "bridge.config" not in text, f"{path.name} imports bridge.config"
        assert "from bridge import config" not in text, path.name


def test_exec_hooks_repeat_from_flags_and_env(tmp_path: Path) -> None:
    assert _build(["--exec", "a", "--exec", "b"], {}, tmp_path).exec == ("a", "b")
    assert _build([], {"BRIDGE_EXEC": "a\nmaintenance.=b"}, tmp_path).exec == (
        "a",
        "maintenance.=b",
    )


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--topic", "my-topic"], {}, "is not a topic path"),
        (["--sink", "pubsub"], {}, "needs --topic"),
        ([], {"BRIDGE_POLL_TIMEOUT": "soon"}, "invalid value"),
        ([], {"BRIDGE_POLL_TIMEOUT": "-1"}, "invalid value"),
        ([], {"BRIDGE_CONTENT_MODE": "xml"}, "is not one of"),
        (["--metadata-url", "http://example.com/computeMetadata/v1/"], {}, "not link-local"),
        (["--metadata-url", "ftp://169.254.169.254/"], {}, "not an http:// URL"),
        (["--keys", "instance/hostname"], {}, "--keys"),
        (["--type-prefix", "Not A Prefix"], {}, "reverse-DNS"),
        ([], {"BRIDGE_PUBSUB_TRANSPORT": "http2"}, "is not one of"),
        (["--pubsub-endpoint", "https://pubsub.googleapis.com/v1"], {}, "not a host"),
        ([], {"PUBSUB_EMULATOR_HOST": "localhost:8085/"}, "PUBSUB_EMULATOR_HOST"),
    ],
)
def test_bad_configuration_is_one_clear_error(
    argv: list[str], env: dict[str, str], message: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=message):
        _build(argv, env, tmp_path)


def test_metadata_host_can_be_allowed_explicitly(tmp_path: Path) -> None:
    config = _build(
        ["--metadata-url", "http://10.0.0.5/computeMetadata/v1/", "--allow-metadata-host", "true"],
        {},
        tmp_path,
    )
    assert config.metadata_url.startswith("http://10.0.0.5/")


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args], capture_output=True, text=True, timeout=30, env=env
    )


@pytest.mark.parametrize(
    "args",
    [
        ["run", "--topic", "projects/x/topics/t", "--state-dir", "{tmp}/s"],
        ["run", "--state-dir", "/proc/forbidden"],
        ["run", "--sink", "kafka"],
        ["run", "--no-such-flag"],
    ],
)
def test_cli_exits_2_with_one_line(args: list[str], tmp_path: Path) -> None:
    result = _cli(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("maintenance-bridge: error: ")
    assert result.stdout == ""


def test_python_dash_m_and_version() -> None:
    result = _cli("--version")
    assert result.returncode == 0 and "maintenance-bridge" in result.stdout


def test_readme_documents_every_option() -> None:
    from bridge.config import RUN_OPTIONS

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for opt in RUN_OPTIONS:
        assert f"| `{opt.flag}` | `{opt.env}`" in readme, opt.flag


def test_a_sinks_options_are_run_options_like_the_rest(tmp_path: Path) -> None:
    """Declared in the sink's module, they are flags, BRIDGE_* variables and `Config` fields
    with the sink's defaults; `--sink` offers every registered sink."""
    import dataclasses

    from bridge import sinks
    from bridge.config import RUN_OPTIONS, Config

    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    assert sinks.options(), "no sink declares an option"
    for opt in sinks.options():
        assert opt in RUN_OPTIONS and defaults[opt.name] == opt.default, opt.name
    config = _build(
        ["--publish-latency", "0.5"],
        {"BRIDGE_CONTENT_MODE": "structured", "BRIDGE_TOPIC": "projects/my-proj/topics/maint"},
        tmp_path,
    )
    assert (config.sink, config.content_mode, config.publish_latency) == (
        "pubsub",
        "structured",
        0.5,
    )
    (sink,) = (o for o in RUN_OPTIONS if o.name == "sink")
    assert sink.choices == sinks.names() and {"pubsub", "stdout"} <= set(sinks.names())


def test_a_topic_and_a_url_without_sink_is_one_clear_error(tmp_path: Path) -> None:
    """Which sink wins must not depend on import order: an error that names the way out."""
    both = {"BRIDGE_TOPIC": "projects/my-proj/topics/maint", "BRIDGE_HTTP_URL": "https://x.test/"}
    with pytest.raises(ConfigError, match=r"both given: choose one with --sink (http|pubsub)"):
        _build([], both, tmp_path)
    assert _build(["--sink", "pubsub"], both, tmp_path).sink == "pubsub"
    assert _build(["--sink", "http"], both, tmp_path).sink == "http"


HTTP = ["--sink", "http", "--http-url"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sink", "http"], "needs --http-url"),
        ([*HTTP, "http://receiver.example.com/events"], "neither loopback nor private"),
        ([*HTTP, "http://34.120.1.1/events"], "neither loopback nor private"),
        ([*HTTP, "ftp://10.0.0.1/x"], "not an http:// or https:// URL"),
        ([*HTTP, "https:///events"], "not an http:// or https:// URL"),
        ([*HTTP, "https://user:pw@rx.example/e"], "no user or password"),
        ([*HTTP, "https://user@rx.example/e"], "no user or password"),
        (
            [
                *HTTP,
                "https://rx.example/e",
                "--http-audience",
                "a",
                "--http-header",
                "authorization=x",
            ],
            "sets it already",
        ),
        ([*HTTP, "https://rx.example/e", "--http-refusal-grace", "-1"], "invalid value"),
        ([*HTTP, "https://rx.example/e", "--http-refusal-grace", "inf"], "invalid value"),
        (["--topic", "projects/p/topics/t"], "is not a topic path"),
        (["--topic", "projects/my-proj/topics/ab"], "is not a topic path"),
        (["--topic", "projects/my-proj/topics/maint", "--publish-latency", "-0.1"], "must be >= 0"),
        (
            ["--topic", "projects/my-proj/topics/maint", "--pubsub-endpoint=-x.example"],
            "not a host",
        ),
        (
            ["--topic", "projects/my-proj/topics/maint", "--pubsub-endpoint", "h:123456"],
            "not a host",
        ),
    ],
)
def test_each_sink_refuses_its_bad_options_with_one_clear_line(
    argv: list[str], message: str, tmp_path: Path
) -> None:
    """In the process (the exit-2 path is test_http_sink's and the CLI tests'): what each
    sink's `check` refuses, and why, as the one line the operator reads."""
    with pytest.raises(ConfigError, match=message) as refused:
        _build(argv, {}, tmp_path)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    "argv",
    [
        [*HTTP, "http://10.1.2.3/events"],
        [*HTTP, "http://192.168.1.1/events"],
        [*HTTP, "http://127.0.0.1:8080/events"],
        [*HTTP, "http://localhost/events"],
        [*HTTP, "http://[::1]/events"],
        [*HTTP, "http://rx.example/events", "--http-allow-insecure", "true"],
        [*HTTP, "https://rx.example/events", "--http-audience", "a", "--http-header", "X-K=v"],
        [*HTTP, "https://rx.example/events", "--http-refusal-grace", "0"],
        ["--topic", "projects/my-proj/topics/abc"],
        ["--topic", "projects/my-proj/topics/maint", "--pubsub-endpoint", "h.example:443"],
        ["--topic", "projects/my-proj/topics/maint", "--pubsub-emulator-host", "localhost:8085"],
    ],
)
def test_the_forms_each_sink_accepts(argv: list[str], tmp_path: Path) -> None:
    """Plain http to loopback and private addresses (a receiver beside the VM), or anywhere
    when the operator says so; the shortest topic name the API allows."""
    _build(argv, {}, tmp_path)
