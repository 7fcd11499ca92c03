"""Promises of the watcher and the metadata client that mutation testing found unguarded
(docs/reliability.md, "Mutation testing", "watcher and metadata"): each test failed on a mutant
of bridge/watcher.py or bridge/metadata.py that the other in-process tests let through.

- a watcher hanging on a calm long-poll is not called stuck by /healthz: its promise covers the
  long-poll, the client's slack over it and the longest back-off, and no more;
- an identity key the server does not have is a failure of the fixed class `http_4xx` (the
  classes are the only metric labels and log words), retried by the caller;
- the metadata server's own URL, which names no port, is asked on port 80;
- every scheduling field is read whichever plausible way the server renders it;
- a failed poll (a 429) is followed by a back-off pause before the next request.

Each runs in about a second against the simulator in the test process.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from support.harness import enrichment_under, wait_for

from bridge.cli import parser
from bridge.config import Config
from bridge.events import Scheduling
from bridge.health import GRACE_SECONDS, Health
from bridge.keys import MAINTENANCE
from bridge.metadata import CLIENT_SLACK, FAILURE_CLASSES, MetadataClient, MetadataError
from bridge.metrics import Metrics
from bridge.retry import metadata_policy
from bridge.simulator import SCHEDULING_MODES, Simulator
from bridge.watcher import Watcher

POLL_TIMEOUT = 60
RETRY_CAP = 2.0


def test_a_hanging_calm_poll_is_not_stuck_until_its_whole_promise_is_overdue(
    sim: Simulator, tmp_path: Path
) -> None:
    """While the poll hangs, /healthz is green up to poll_timeout + CLIENT_SLACK + retry_cap
    (+ grace) from the poll's start, and red after it: a shorter promise would call a healthy
    watcher stuck (a restart by the supervisor of the VM), a longer one hide a stuck one."""
    config = Config(
        metadata_url=sim.url, state_dir=tmp_path, poll_timeout=POLL_TIMEOUT, retry_cap=RETRY_CAP
    )
    health, stop = Health(), threading.Event()
    watcher = Watcher(MAINTENANCE, config, lambda *_: None, stop, health, Metrics())
    watcher.start()
    try:
        wait_for("the calm poll hanging", lambda: sim.hanging(MAINTENANCE) > 0)
        asked = time.monotonic()  # the promise was made just before the poll was sent
        promise = POLL_TIMEOUT + CLIENT_SLACK + RETRY_CAP + GRACE_SECONDS
        assert health.problems(asked + promise - 1.5) == []
        # Named by its key: three watchers filing their promises under one name would let a
        # healthy one's fresh promise hide a stuck one's.
        late = health.problems(asked + promise + 1.5)
        assert [line.split(" is ")[0] for line in late] == [MAINTENANCE], late
    finally:
        stop.set()
        watcher.hurry()
        watcher.thread.join(10)
    assert not watcher.thread.is_alive()


@pytest.mark.parametrize("path", ["instance/id", "instance/name", "project/project-id"])
def test_a_missing_identity_key_is_an_http_4xx_failure(sim: Simulator, path: str) -> None:
    sim.delete_value(path)
    client = MetadataClient(sim.url)
    try:
        with pytest.raises(MetadataError, match=path) as caught:
            client.identity()
    finally:
        client.close()
    assert caught.value.failure_class == "http_4xx"
    assert caught.value.failure_class in FAILURE_CLASSES


def test_a_url_without_a_port_is_asked_on_port_80() -> None:
    """The production URL (config's default) names no port; nothing is connected here."""
    client = MetadataClient("http://metadata.google.internal/computeMetadata/v1/")
    assert (client.connection.host, client.connection.port) == ("metadata.google.internal", 80)
    assert client.prefix == "/computeMetadata/v1/"


SPOT = {
    "instance/scheduling/on-host-maintenance": "TERMINATE",
    "instance/scheduling/automatic-restart": "FALSE",
    "instance/scheduling/preemptible": "TRUE",
    "instance/scheduling/provisioning-model": "SPOT",
}


@pytest.mark.parametrize("mode", ["json", "booleans", "path_keys"])
def test_every_scheduling_field_is_read_in_every_plausible_rendering(mode: str) -> None:
    """Events carry the VM's scheduling (docs/events.md): a Spot VM's every field, whichever
    way the server renders the directory (FACTS.md documents camelCase keys, not how a flag is
    typed): flags as TRUE/FALSE or as JSON booleans, keys camelCase or as the paths spell them.
    Subscribers route on these fields (a preemptible VM's notice is its end)."""
    _, scheduling, problems = enrichment_under(mode, SPOT)
    assert problems == []
    assert scheduling == Scheduling(
        on_host_maintenance="TERMINATE",
        automatic_restart="FALSE",
        preemptible="TRUE",
        provisioning_model="SPOT",
    )


def test_the_simulator_command_offers_every_scheduling_rendering() -> None:
    """`maintenance-bridge simulate --scheduling` spells its choices out (the parser does not
    import the simulator, for the start-up of `run`): each of the simulator's is among them."""
    for mode in SCHEDULING_MODES:
        assert parser().parse_args(["simulate", "--scheduling", mode]).scheduling == mode


def test_a_failed_poll_is_followed_by_a_pause_before_the_server_is_asked_again(
    sim: Simulator, tmp_path: Path
) -> None:
    """A rate-limited server (429) is not asked again at once: the first retry waits the
    policy's first delay (0.1 s for a 429, less its jitter), as every later one does."""
    sim.inject("status", path=MAINTENANCE, status=429)
    seen: list[float] = []
    config = Config(metadata_url=sim.url, state_dir=tmp_path, retry_cap=RETRY_CAP)
    health, stop = Health(), threading.Event()
    watcher = Watcher(
        MAINTENANCE, config, lambda *_: seen.append(time.monotonic()), stop, health, Metrics()
    )
    started = time.monotonic()
    watcher.start()
    try:
        wait_for("the value after the 429", lambda: seen)
    finally:
        stop.set()
        watcher.hurry()
        watcher.thread.join(10)
    least = metadata_policy(RETRY_CAP).delay(1, "http_429", rand=1.0)
    assert least == pytest.approx(0.05)
    assert seen[0] - started >= least
