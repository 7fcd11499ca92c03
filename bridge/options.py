"""What a run option is, shared by bridge/config.py and the sinks that declare their own.

Dependency-free on purpose: bridge/config.py collects the sinks' options from their registry,
so the sink modules cannot import bridge/config.py to declare them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """Bad configuration: the CLI prints the message as one line and exits 2."""


@dataclass(frozen=True)
class Option:
    """One run option: its flag, its BRIDGE_* variable, its parser and its help. A general
    option's default is the `Config` field of the same name; a sink's option brings its own
    `default` (it becomes a `Config` field too)."""

    name: str
    help: str
    parse: Any = str
    choices: tuple[str, ...] | None = None
    repeat: bool = False
    default: Any = None
    # (parsed value, environment) -> final value: e.g. `env:VAR` references read by `config`,
    # the one module that reads the environment. None: the parsed value is final.
    resolve: Any = None
    # A variable of Google's own tools read when neither the flag nor BRIDGE_* is given
    # (PUBSUB_EMULATOR_HOST, as the client libraries honour it); read by `config` too.
    fallback_env: str = ""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "BRIDGE_" + self.name.upper()


def boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def positive(parse: Any) -> Any:
    def check(text: str) -> Any:
        value = parse(text)
        if value <= 0:
            raise ValueError(f"must be positive: {text!r}")
        return value

    check.__name__ = parse.__name__
    return check
