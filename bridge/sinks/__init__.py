"""Where events go: the `Sink` protocol and the registry of sinks by name.

Each sink is one module of this package that registers itself when imported (as litestream's
replica backends do): its name, the run options it owns (bridge/config.py turns them into
flags, `BRIDGE_*` variables and `Config` fields), its own option type (a frozen dataclass: what
its factory, check, hint and target receive, never the whole `Config`), how its failures are
classified and explained. The relay and the metrics read only what is registered here, so
adding a sink is one module plus one import line at the bottom of this file (see
docs/architecture.md, "Adding a sink"). Nothing here imports bridge/config.py: a configuration
is anything with a `sink` name and attributes named like the option types' fields, and each
sink's options are read from it by those names (`settings_from`), so config and sinks do not
import each other.

A sink's `send` returns a future that resolves once the event is acknowledged (by Pub/Sub,
or written and flushed); only then does the event leave the outbox.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from functools import partial
from typing import Any, Protocol

from bridge.events import Event
from bridge.options import ConfigError, Option

OTHER = "other"  # the failure class of whatever a sink does not classify; every sink has it


class Permanent(Exception):
    """The sink refused this event for good (an HTTP 400, say): sending it again cannot help.
    The relay parks it (`Store.park`, with `status` and the message) and goes on with the next;
    `maintenance-bridge redrive` sends it again once the receiver is fixed."""

    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(message)
        self.status = status


class Sink(Protocol):
    name: str

    def send(self, event: Event) -> Any:
        """A future whose `result(timeout)` returns once the event is acknowledged."""

    def recover(self, event: Event) -> None:
        """Make the sink accept `event` again after a failure (e.g. resume an ordering key)."""

    def close(self) -> None: ...


def _unclassified(exc: BaseException) -> str:
    return OTHER


def _no_hint(failure_class: str) -> str:
    return ""


@dataclass(frozen=True)
class Failures:
    """How the relay tells a sink's failures: `classify` maps an exception to one of `classes`
    (a fixed set: they are metric labels), `hint` adds what an operator should check (" (...)"
    or ""), and a class in `follow_ups` is a consequence of an earlier failure, not news: it is
    logged only when it is the first of its outage."""

    classes: tuple[str, ...] = (OTHER,)
    classify: Callable[[BaseException], str] = _unclassified
    hint: Callable[[str], str] = _no_hint
    follow_ups: frozenset[str] = frozenset()

    def class_of(self, exc: BaseException) -> str:
        """`classify`, held to the declared classes (anything else counts as `other`)."""
        cls = self.classify(exc)
        return cls if cls in self.classes else OTHER


UNCLASSIFIED = Failures()  # a sink that declares no failure classes of its own


class Configured(Protocol):
    """What the registry reads of a configuration (bridge/config.py's `Config`): the chosen
    sink's name; each sink's option type is filled from attributes of the same names."""

    sink: str


@dataclass(frozen=True)
class NoOptions:
    """The option type of a sink without options of its own (stdout)."""


def _no_check(options: Any, chosen: bool) -> None:
    return None


def _no_target(options: Any) -> str:
    return ""


def _no_options_hint(failure_class: str, options: Any) -> str:
    return ""


@dataclass(frozen=True)
class SinkType:
    """One registered sink. `options` become flags, `BRIDGE_*` variables and `Config` fields;
    `settings` is its option type, a frozen dataclass whose fields are read from the
    configuration by name (its own options, and any general one it needs, such as
    `metadata_url`): the factory, `check`, `hint` and `target` receive that, nothing more.
    `selected_by` is the option whose value selects this sink when `--sink` is not given (a
    topic selects pubsub); `check(options, chosen)` raises ConfigError on a bad combination of
    its options (it sees every configuration, `chosen` or not); `failure_classes`, `classify`,
    `hint` and `follow_ups` make its `Failures`; `target` names where events go, for `status`."""

    name: str
    factory: Callable[[Any], Sink]
    settings: type = NoOptions
    options: tuple[Option, ...] = ()
    selected_by: str = ""
    check: Callable[[Any, bool], None] = _no_check
    failure_classes: tuple[str, ...] = ()
    classify: Callable[[BaseException], str] = _unclassified
    hint: Callable[[str, Any], str] = _no_options_hint
    follow_ups: frozenset[str] = frozenset()
    target: Callable[[Any], str] = _no_target

    def settings_from(self, config: Configured) -> Any:
        """This sink's option type, filled from the configuration's attributes of its names."""
        return self.settings(**{f.name: getattr(config, f.name) for f in fields(self.settings)})

    def failures(self, options: Any) -> Failures:
        return Failures(
            classes=(*self.failure_classes, OTHER),
            classify=self.classify,
            hint=partial(_bound_hint, self.hint, options),
            follow_ups=self.follow_ups,
        )


def _bound_hint(hint: Callable[[str, Any], str], options: Any, failure_class: str) -> str:
    return hint(failure_class, options)


_REGISTRY: dict[str, SinkType] = {}
DEFAULT = "stdout"  # the sink when neither --sink nor a selecting option is given


def register(sink_type: SinkType) -> None:
    """Add a sink; called by its module at import time."""
    if sink_type.name in _REGISTRY:
        raise ValueError(f"sink {sink_type.name!r} registered twice")
    _REGISTRY[sink_type.name] = sink_type


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def sink_type(name: str) -> SinkType:
    return _REGISTRY[name]


def options() -> tuple[Option, ...]:
    """Every sink's own run options, in registration order."""
    return tuple(opt for kind in _REGISTRY.values() for opt in kind.options)


def chosen(values: Mapping[str, Any]) -> str:
    """The sink a configuration without `--sink` gets: the one whose selecting option is set.
    Two set (a topic and a URL) is ambiguous: an error rather than a guess by import order."""
    picked = [k for k in _REGISTRY.values() if k.selected_by and values.get(k.selected_by)]
    if len(picked) > 1:
        flags = " and ".join("--" + k.selected_by.replace("_", "-") for k in picked)
        names = "|".join(k.name for k in picked)
        raise ConfigError(f"{flags} both given: choose one with --sink {names}")
    return picked[0].name if picked else DEFAULT


def make_sink(config: Configured) -> Sink:
    kind = _REGISTRY[config.sink]
    return kind.factory(kind.settings_from(config))


def failures(config: Configured) -> Failures:
    kind = _REGISTRY[config.sink]
    return kind.failures(kind.settings_from(config))


def target(config: Configured) -> str:
    kind = _REGISTRY[config.sink]
    return kind.target(kind.settings_from(config))


def check(config: Configured) -> None:
    """Every sink's own check of its options (raises ConfigError), the chosen one told so."""
    for kind in _REGISTRY.values():
        kind.check(kind.settings_from(config), config.sink == kind.name)


def failure_classes() -> tuple[str, ...]:
    """Every registered sink's failure classes, `other` last: the publish-failure metric's
    fixed label set."""
    declared = (cls for kind in _REGISTRY.values() for cls in kind.failure_classes)
    return (*dict.fromkeys(c for c in declared if c != OTHER), OTHER)


# The built-in sinks register themselves on import (one line per sink).
from bridge.sinks.http_post import HttpSink  # noqa: E402
from bridge.sinks.pubsub import PubSubSink  # noqa: E402
from bridge.sinks.stdout import StdoutSink  # noqa: E402

__all__ = [
    "Configured",
    "Failures",
    "HttpSink",
    "NoOptions",
    "Permanent",
    "PubSubSink",
    "Sink",
    "SinkType",
    "StdoutSink",
    "make_sink",
    "register",
]
