"""Where events go: the `Sink` protocol and the registry of sinks by name.

Each sink is one module of this package that registers itself when imported (as litestream's
replica backends do): its name, how to build it from the `Config`, the run options it owns
(bridge/config.py turns them into flags, `BRIDGE_*` variables and `Config` fields), how to
check them, and how its failures are classified and explained. The relay and the metrics read
only what is registered here, so adding a sink is one module plus one import line at the
bottom of this file (see docs/architecture.md, "Adding a sink").

A sink's `send` returns a future that resolves once the event is acknowledged (by Pub/Sub,
or written and flushed); only then does the event leave the outbox.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from bridge.events import Event
from bridge.options import ConfigError, Option

if TYPE_CHECKING:
    from bridge.config import Config

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


def _no_check(config: Config) -> None:
    return None


def _no_target(config: Config) -> str:
    return ""


def _no_config_hint(failure_class: str, config: Config) -> str:
    return ""


@dataclass(frozen=True)
class SinkType:
    """One registered sink. `options` become flags, `BRIDGE_*` variables and `Config` fields;
    `selected_by` is the option whose value selects this sink when `--sink` is not given (a
    topic selects pubsub); `check` raises ConfigError on a bad combination of its options (it
    sees every configuration, chosen sink or not); `failure_classes`, `classify`, `hint` and
    `follow_ups` make its `Failures`; `target` names where events go, for `status`."""

    name: str
    factory: Callable[[Config], Sink]
    options: tuple[Option, ...] = ()
    selected_by: str = ""
    check: Callable[[Config], None] = _no_check
    failure_classes: tuple[str, ...] = ()
    classify: Callable[[BaseException], str] = _unclassified
    hint: Callable[[str, Config], str] = _no_config_hint
    follow_ups: frozenset[str] = frozenset()
    target: Callable[[Config], str] = _no_target

    def failures(self, config: Config) -> Failures:
        return Failures(
            classes=(*self.failure_classes, OTHER),
            classify=self.classify,
            hint=partial(_bound_hint, self.hint, config),
            follow_ups=self.follow_ups,
        )


def _bound_hint(hint: Callable[[str, Config], str], config: Config, failure_class: str) -> str:
    return hint(failure_class, config)


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


def make_sink(config: Config) -> Sink:
    return _REGISTRY[config.sink].factory(config)


def failures(config: Config) -> Failures:
    return _REGISTRY[config.sink].failures(config)


def target(config: Config) -> str:
    return _REGISTRY[config.sink].target(config)


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
    "Failures",
    "HttpSink",
    "Permanent",
    "PubSubSink",
    "Sink",
    "SinkType",
    "StdoutSink",
    "make_sink",
    "register",
]
