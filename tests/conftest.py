"""Shared fixtures: a simulator per test, the official Pub/Sub emulator per session, seeded
randomness.

The run's header names the emulators found (path and version) and its summary the servers the
tests actually ran against, so a green run says what it was green against.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.gcloud import USED, emulators_required, firestore_emulator, pubsub_emulator
from support.pubsub import PubSubServer, emulator_or_skip

from bridge.simulator import Simulator

_SEED = pytest.StashKey[int]()


def pytest_configure(config: pytest.Config) -> None:
    if emulators_required():
        missing = [e.describe() for e in (pubsub_emulator(), firestore_emulator()) if e.missing]
        if missing:
            raise pytest.UsageError("BRIDGE_TEST_EMULATORS=required: " + "; ".join(missing))


def pytest_report_header(config: pytest.Config) -> list[str]:
    emulators = (pubsub_emulator(), firestore_emulator())
    return [e.describe() + ("; tests that need it skip" if e.missing else "") for e in emulators]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say which servers the integration tests ran against."""
    for line in USED:
        terminalreporter.write_line(f"tests ran against the {line}")


@pytest.fixture
def sim() -> Iterator[Simulator]:
    simulator = Simulator().start()
    try:
        yield simulator
    finally:
        simulator.stop()


@pytest.fixture(scope="session")
def pubsub() -> Iterator[PubSubServer]:
    """The official Pub/Sub emulator (skipped, with the reason, where it is not installed).
    BRIDGE_TEST_PUBSUB=host:port names one already running, used as it is and never stopped:
    scripts/mutation starts one for its thousands of short pytest runs (a JVM start each would
    cost seconds a mutant)."""
    if shared := os.environ.get("BRIDGE_TEST_PUBSUB"):
        yield PubSubServer(shared, "emulator", "test-project")
        return
    server = emulator_or_skip()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """From BRIDGE_TEST_SEED, else at random; a failed test's report shows it, for a replay."""
    value = int(os.environ.get("BRIDGE_TEST_SEED") or random.SystemRandom().randrange(2**32))
    request.node.stash[_SEED] = value
    return value


@pytest.fixture
def rng(seed: int) -> random.Random:
    """Randomness a failure can replay (see `seed`)."""
    return random.Random(seed)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and _SEED in item.stash:
        seed = item.stash[_SEED]
        report.sections.append(("seed", f"BRIDGE_TEST_SEED={seed} replays its random choices"))
    return report
