"""Shared fixtures: a simulator per test, one Pub/Sub (emulator or fake) per session."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.pubsub import PubSubServer, start_pubsub

from bridge.simulator import Simulator

_PUBSUB_KINDS: list[str] = []


@pytest.fixture
def sim() -> Iterator[Simulator]:
    simulator = Simulator().start()
    try:
        yield simulator
    finally:
        simulator.stop()


@pytest.fixture(scope="session")
def pubsub() -> Iterator[PubSubServer]:
    server = start_pubsub()
    name = "official Pub/Sub emulator" if server.kind == "emulator" else "in-repo fake Pub/Sub"
    _PUBSUB_KINDS.append(f"{name} on {server.host_port}")
    try:
        yield server
    finally:
        server.stop()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say which Pub/Sub the integration tests ran against: the official emulator or the fake."""
    if _PUBSUB_KINDS:
        terminalreporter.write_line(f"pubsub: tests ran against the {', '.join(_PUBSUB_KINDS)}")
