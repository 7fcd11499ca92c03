"""The one configuration object: built once from flags and environment, passed down.

Every option has a flag and a `BRIDGE_*` environment variable (the flag wins). No other module
reads the environment; `GCE_METADATA_HOST` and `PUBSUB_EMULATOR_HOST` are honoured here, as
Google's client libraries do. Each sink is given only its own option type, filled from the
`Config` by bridge/sinks/ (`SinkType.settings_from`): the sinks never import this module.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bridge import sinks
from bridge.events import DEFAULT_TYPE_PREFIX
from bridge.keys import WATCHED_KEYS
from bridge.options import ConfigError, Option, boolean, positive

DEFAULT_METADATA_HOST = "metadata.google.internal"
METADATA_PATH = "/computeMetadata/v1/"
_TYPE_PREFIX = re.compile(r"^[a-z0-9]+(\.[a-z0-9-]+)+$")


def default_state_dir(environ: Mapping[str, str]) -> str:
    if sys.platform == "win32":
        return str(Path(environ.get("PROGRAMDATA", r"C:\ProgramData")) / "maintenance-bridge")
    return "/var/lib/maintenance-bridge"


GENERAL_OPTIONS: tuple[Option, ...] = (
    Option(
        "sink",
        f"where events go (default: the sink an option of its own selects, else {sinks.DEFAULT})",
        choices=sinks.names(),
    ),
    Option("state_dir", "directory of the SQLite state store and outbox"),
    Option(
        "metadata_url",
        "metadata server base URL (default from GCE_METADATA_HOST, "
        "else http://metadata.google.internal/computeMetadata/v1/)",
    ),
    Option(
        "allow_metadata_host",
        "accept a metadata URL outside link-local, loopback and metadata.google.internal",
        parse=boolean,
    ),
    Option("keys", "comma-separated metadata keys to watch"),
    Option("type_prefix", "CloudEvents type prefix (reverse-DNS, versioned)"),
    Option("poll_timeout", "timeout_sec of each long-poll, seconds", parse=positive(int)),
    Option(
        "absent_interval",
        "seconds between asks of a key that answers at once (404, or 503 'no notifications')",
        parse=positive(float),
    ),
    Option(
        "retry_cap",
        "cap of the retry back-off after a metadata error (once its quick retries are spent) "
        "or a publishing error, seconds",
        parse=positive(float),
    ),
    Option("drain_timeout", "seconds to flush the outbox on SIGTERM", parse=float),
    Option("outbox_max_events", "outbox bound by count", parse=positive(int)),
    Option("outbox_max_bytes", "outbox bound by bytes", parse=positive(int)),
    Option(
        "exec",
        "command run for each event (CloudEvent JSON on stdin); "
        "KIND_PREFIX=CMD limits it to events whose kind starts with KIND_PREFIX; repeatable",
        repeat=True,
    ),
    Option("exec_timeout", "seconds before a hook is killed", parse=positive(float)),
    Option("http_port", "port of /healthz, /readyz and /metrics (0: off)", parse=int),
    Option("http_host", "address the HTTP endpoint binds"),
    Option(
        "ready_max_outbox_age",
        "/readyz answers 503 while an event waits longer than this for the sink, seconds",
        parse=positive(float),
    ),
    Option("heartbeat_interval", "seconds between heartbeat events (0: off)", parse=float),
    Option(
        "attest",
        "on: each event carries this VM's identity token, bound to it (verified origin)",
        parse=boolean,
    ),
    Option("log_format", "log format on stderr", choices=("json", "text")),
    Option("log_level", "log level", choices=("DEBUG", "INFO", "WARNING", "ERROR")),
)
# The sinks' own options (bridge/sinks/): flags and variables like the rest, `Config` fields.
RUN_OPTIONS: tuple[Option, ...] = GENERAL_OPTIONS + sinks.options()


@dataclass(frozen=True)
class GeneralConfig:
    """The general run options and their defaults; `Config` adds the sinks' options."""

    sink: str = sinks.DEFAULT
    state_dir: Path = Path(default_state_dir({}))
    metadata_url: str = f"http://{DEFAULT_METADATA_HOST}{METADATA_PATH}"
    allow_metadata_host: bool = False
    keys: tuple[str, ...] = WATCHED_KEYS
    type_prefix: str = DEFAULT_TYPE_PREFIX
    poll_timeout: int = 60
    absent_interval: float = 60.0
    retry_cap: float = 2.0
    drain_timeout: float = 5.0
    outbox_max_events: int = 10000
    outbox_max_bytes: int = 16 * 1024 * 1024
    exec: tuple[str, ...] = ()
    exec_timeout: float = 30.0
    http_port: int = 0
    http_host: str = "127.0.0.1"
    ready_max_outbox_age: float = 30.0
    heartbeat_interval: float = 0.0
    attest: bool = False
    log_format: str = "json"
    log_level: str = "INFO"

    @property
    def db_path(self) -> Path:
        return self.state_dir / "bridge.sqlite3"


# Everything `maintenance-bridge run` needs, validated: a field per run option, the sinks' own
# (`config.topic`) declared with their defaults in their modules rather than here.
Config = make_dataclass(
    "Config",
    [(opt.name, Any, field(default=opt.default)) for opt in sinks.options()],
    bases=(GeneralConfig,),
    frozen=True,
    namespace={
        "__module__": __name__,
        "__doc__": "Everything `maintenance-bridge run` needs, validated; each option's default.",
    },
)


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Flags for every run option; defaults stay None so that env and defaults apply later."""
    for opt in RUN_OPTIONS:
        kwargs: dict[str, Any] = {"help": f"{opt.help} [{opt.env}]", "default": None}
        if opt.choices:
            kwargs["choices"] = opt.choices
        if opt.repeat:
            kwargs["action"] = "append"
        parser.add_argument(opt.flag, dest=opt.name, **kwargs)


def build(
    args: argparse.Namespace, environ: Mapping[str, str], *, check_dirs: bool = True
) -> Config:
    """Flags over `BRIDGE_*` variables over `Config` defaults, then validation. Raises
    ConfigError."""
    values: dict[str, Any] = {}
    for opt in RUN_OPTIONS:
        flagged = getattr(args, opt.name, None)
        raw: Any
        if flagged is not None:
            raw = flagged
        elif opt.env in environ:
            raw = environ[opt.env]
            if opt.repeat:
                raw = [line for line in raw.splitlines() if line.strip()]
        elif opt.fallback_env and environ.get(opt.fallback_env):
            raw = environ[opt.fallback_env]
        else:
            continue
        values[opt.name] = _parse(opt, raw)
        if opt.resolve is not None:
            values[opt.name] = opt.resolve(values[opt.name], environ)
    values["state_dir"] = Path(values.get("state_dir", default_state_dir(environ)))
    if "exec" in values:
        values["exec"] = tuple(values["exec"])
    if "keys" in values:
        values["keys"] = tuple(k.strip() for k in str(values["keys"]).split(",") if k.strip())
    values["metadata_url"] = _metadata_url(values.get("metadata_url", ""), environ)
    if not values.get("sink"):
        values["sink"] = sinks.chosen(values)
    config = Config(**values)
    _validate(config)
    if check_dirs:
        check_state_dir(config.state_dir)
    return config


def _parse(opt: Option, raw: Any) -> Any:
    if opt.repeat:
        return list(raw)
    if opt.choices and raw not in opt.choices:
        raise ConfigError(f"{opt.flag}: {raw!r} is not one of {', '.join(opt.choices)}")
    try:
        return opt.parse(raw) if isinstance(raw, str) else raw
    except ValueError:
        raise ConfigError(f"{opt.flag} / {opt.env}: invalid value {raw!r}") from None


def _metadata_url(flag: str, environ: Mapping[str, str]) -> str:
    if flag:
        url = flag
    elif environ.get("GCE_METADATA_HOST"):
        url = f"http://{environ['GCE_METADATA_HOST']}{METADATA_PATH}"
    else:
        url = f"http://{DEFAULT_METADATA_HOST}{METADATA_PATH}"
    return url if url.endswith("/") else url + "/"


def metadata_host_allowed(url: str) -> bool:
    """Link-local, loopback or the metadata server's own name: where credentials may not leak."""
    host = urlsplit(url).hostname or ""
    if host in (DEFAULT_METADATA_HOST, "localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_link_local


def _validate(config: Config) -> None:
    for opt in RUN_OPTIONS:  # inf or nan would reach a wait() and crash the loop using it
        value = getattr(config, opt.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{opt.flag} / {opt.env}: {value} is not a finite number")
    sinks.check(config)
    parts = urlsplit(config.metadata_url)
    if parts.scheme != "http" or not parts.hostname:
        raise ConfigError(f"--metadata-url: {config.metadata_url!r} is not an http:// URL")
    if parts.username is not None or parts.password is not None:  # not echoed: it may be secret
        raise ConfigError("--metadata-url: no user or password in the URL (it would be logged)")
    if not config.allow_metadata_host and not metadata_host_allowed(config.metadata_url):
        raise ConfigError(
            f"--metadata-url: {parts.hostname!r} is not link-local, loopback or "
            f"{DEFAULT_METADATA_HOST}; pass --allow-metadata-host true "
            "(BRIDGE_ALLOW_METADATA_HOST=true) to use it anyway"
        )
    unknown = [k for k in config.keys if k not in WATCHED_KEYS]
    if unknown or not config.keys:
        raise ConfigError(
            f"--keys: choose among {', '.join(WATCHED_KEYS)} (got {unknown or 'none'})"
        )
    if not _TYPE_PREFIX.match(config.type_prefix):
        raise ConfigError(f"--type-prefix: {config.type_prefix!r} is not a reverse-DNS name")
    for spec in config.exec:
        if not spec.strip():
            raise ConfigError("--exec: empty command")
    if not 0 <= config.http_port <= 65535:
        raise ConfigError(f"--http-port: {config.http_port} is not a port number")
    if config.drain_timeout < 0 or config.heartbeat_interval < 0:
        raise ConfigError("--drain-timeout, --heartbeat-interval: must be >= 0")


def check_state_dir(path: Path) -> None:
    """Create the state dir and prove it writable now, before any watching starts."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"--state-dir: {path} is not writable ({exc.strerror or exc})") from None
