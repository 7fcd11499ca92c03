"""Prometheus metrics on a private registry, every label from a small fixed set.

Label values are event kinds, failure classes, hook results, watched keys and the bridge's
version only: never an instance name or a raw metadata value, so a fleet of any size cannot
blow up a scraper's memory. No `_created` series: they double every counter for a start time
that `process_start_time_seconds` already gives once.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from bridge import __version__
from bridge.events import KINDS
from bridge.metadata import FAILURE_CLASSES
from bridge.sinks import failure_classes

PUBLISH_FAILURE_CLASSES = failure_classes()  # what the registered sinks declare, and `other`
HOOK_RESULTS = ("ok", "failed", "timeout", "error", "dropped", "killed")
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    """The bridge's series; `render()` is what /metrics serves."""

    def __init__(self) -> None:
        prometheus_client.disable_created_metrics()  # process-wide, and the bridge wants it so
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # CPU, memory, open fds, start time (a crash loop shows)
        Gauge(
            "maintenance_bridge_build_info",
            "Always 1; the running version is in the label",
            ["version"],
            registry=r,
        ).labels(__version__).set(1)
        self.last_poll = Gauge(
            "maintenance_bridge_last_poll_timestamp_seconds",
            "Unix time of the last answer from the metadata server, by watched key",
            ["key"],
            registry=r,
        )
        self.events = Counter(
            "maintenance_bridge_events", "Events recorded, by kind", ["kind"], registry=r
        )
        self.published = Counter(
            "maintenance_bridge_publish_success", "Events acknowledged by the sink", registry=r
        )
        self.publish_failures = Counter(
            "maintenance_bridge_publish_failures",
            "Failed publish attempts, by class",
            ["reason"],
            registry=r,
        )
        self.dropped = Counter(
            "maintenance_bridge_outbox_dropped",
            "Events dropped to keep the outbox within its bound",
            registry=r,
        )
        self.outbox_depth = Gauge(
            "maintenance_bridge_outbox_depth", "Events waiting for the sink", registry=r
        )
        self.outbox_oldest = Gauge(
            "maintenance_bridge_outbox_oldest_age_seconds",
            "Age of the oldest event waiting for the sink",
            registry=r,
        )
        self.parked = Gauge(
            "maintenance_bridge_parked_events",
            "Events the sink refused for good, kept for `maintenance-bridge redrive`",
            registry=r,
        )
        self.metadata_errors = Counter(
            "maintenance_bridge_metadata_errors",
            "Failed metadata requests, by class",
            ["class"],
            registry=r,
        )
        self.hook_runs = Counter(
            "maintenance_bridge_hook_runs", "Local hook runs, by result", ["result"], registry=r
        )
        self.last_change = Gauge(
            "maintenance_bridge_last_change_timestamp_seconds",
            "Unix time of the last observed transition",
            registry=r,
        )
        self.store_errors = Counter(
            "maintenance_bridge_store_errors", "Failed writes to the state store", registry=r
        )
        self.latency = Histogram(
            "maintenance_bridge_change_to_publish_seconds",
            "From the metadata response to the sink's acknowledgement",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # Pre-create every label value so the series exist (at 0) from the first scrape.
        for kind in KINDS:
            self.events.labels(kind)
        for reason in PUBLISH_FAILURE_CLASSES:
            self.publish_failures.labels(reason)
        for cls in FAILURE_CLASSES:
            self.metadata_errors.labels(cls)
        for result in HOOK_RESULTS:
            self.hook_runs.labels(result)

    def unattested(self) -> Counter:
        """The count of events sent without an identity token, registered by the daemon with
        `--attest on` only: with it off every event is unattested by choice, and the series
        would say nothing."""
        return Counter(
            "maintenance_bridge_events_unattested",
            "Events sent without an identity token (--attest on, none could be had)",
            registry=self.registry,
        )

    def track_outbox(
        self,
        depth: Callable[[], int],
        oldest: Callable[[], float | None],
        parked: Callable[[], int],
    ) -> None:
        """Read the outbox (and the parked events) at scrape time rather than tracking every
        change: `redrive` changes the parked count from another process."""
        self.outbox_depth.set_function(depth)
        self.outbox_oldest.set_function(lambda: _age(oldest()))
        self.parked.set_function(parked)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _age(since: float | None) -> float:
    return 0.0 if since is None else max(0.0, time.monotonic() - since)
