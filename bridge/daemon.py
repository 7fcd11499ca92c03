"""`maintenance-bridge run`: wires the stream together and runs it until told to stop.

metadata server -> watchers -> recorder (transition, store + outbox) -> relay -> sink
                                                                      -> hooks

Start order: nothing slow comes before the watch. The first round of the
`instance/maintenance-event` long-poll (which arms Google's 60 s migration warning) goes out
before the rest of the bridge is even imported (prometheus_client, http.server, tenacity: the
bulk of the start-up time), and its answer becomes that watcher's first reading. The Pub/Sub
client is imported and connected last, in the background (~0.2 s); an event recorded
meanwhile waits in the outbox as it would during a Pub/Sub outage.
"""

from __future__ import annotations

import functools
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from bridge import __version__
from bridge.config import Config, ConfigError
from bridge.events import MAINTENANCE, Instance, Scheduling, rfc3339
from bridge.metadata import MetadataClient, MetadataError, Reading
from bridge.sinks import Sink, failures, make_sink, target
from bridge.store import Store
from bridge.supervise import supervised_thread

if TYPE_CHECKING:
    import tenacity

    from bridge.health import Health
    from bridge.metrics import Metrics
    from bridge.recorder import Recorder
    from bridge.relay import Relay
    from bridge.watcher import Watcher

log = logging.getLogger("bridge")


def run(
    config: Config,
    stop: threading.Event,
    *,
    sink: Sink | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    """Run until `stop` is set; returns the exit code. Raises ConfigError before watching."""
    armed = _arm(config)
    # Slow to import (prometheus_client, http.server, tenacity, ...): after the watch is armed.
    from bridge.endpoints import serve
    from bridge.health import Health
    from bridge.hooks import Hooks
    from bridge.metrics import Metrics
    from bridge.recorder import STORE_RETRY, Recorder
    from bridge.relay import Relay
    from bridge.status import daemon_record
    from bridge.watcher import NoticeBoard, Watcher

    try:
        store = Store(
            config.db_path, max_events=config.outbox_max_events, max_bytes=config.outbox_max_bytes
        )
        snapshot = store.load()
        store.reserve_wal()
    except sqlite3.Error as exc:
        raise ConfigError(f"--state-dir: cannot open {config.db_path}: {exc}") from None
    if sink is None:
        sink = make_sink(config)
    connect = _deferred_connect(sink)
    metrics, health = Metrics(), Health(max_outbox_age=config.ready_max_outbox_age)
    if config.attest:
        sink = _attesting(sink, config, metrics)
    relay = Relay(sink, store, metrics, retry_cap=config.retry_cap, failures=failures(config))
    relay.thread = supervised_thread(
        "relay", relay.run, health, finished=lambda: relay.stopping, stop=stop
    )
    relay.parked = _parked(store)
    health.outbox = relay
    for seq, event, recorded_at in snapshot.pending:
        relay.enqueue(seq, event, None, [], since=_restored_since(recorded_at, config))
    if snapshot.pending:
        log.info("resuming: %d events from the outbox go out first", len(snapshot.pending))
    metrics.track_outbox(relay.depth, relay.oldest_seen, store.parked_count)
    server = (
        serve(config.http_host, config.http_port, health, metrics, store.report)
        if config.http_port
        else None
    )
    record = daemon_record(
        version=__version__,
        sink=sink.name,
        target=target(config),
        started_at=rfc3339(datetime.now(timezone.utc)),
        endpoint=(config.http_host, server.server_address[1]) if server else None,
    )
    _note_daemon(store, record)
    relay.start()
    watchers: list[Watcher] = []
    watching = threading.Event()
    failed: list[BaseException] = []  # why the sink could not be created, if it could not
    if connect is not None:
        threading.Thread(
            target=_connect,
            args=(connect, watching, watchers, stop, failed),
            name="connect",
            daemon=True,
        ).start()
    hooks = Hooks(config.exec, config.exec_timeout, metrics, environ or os.environ)
    try:
        identity = _identity(config, stop, health)
        if identity is None:
            return _stopped(sink, failed)
        instance, scheduling = identity
        log.info(
            "watching %s for %s (%s) in %s, sink %s",
            ", ".join(config.keys),
            instance.name,
            instance.id,
            instance.zone,
            sink.name,
        )
        recorder = Recorder(
            config, store, snapshot, instance, scheduling, relay, hooks, health, metrics
        )
        board = NoticeBoard()  # while any key says a notice is on, every watcher polls briefly
        for key in config.keys:
            first = armed if key == MAINTENANCE else None
            watcher = Watcher(key, config, recorder.observe, stop, health, metrics, first, board)
            watchers.append(watcher)
            watcher.start()
        watching.set()
        every = [(recorder.retry_store, STORE_RETRY, "store retry")]
        if config.heartbeat_interval:
            every.append((_heartbeat(recorder), config.heartbeat_interval, "heartbeat"))
        for task, interval, name in every:
            loop = functools.partial(_every, task, interval, stop)
            supervised_thread(name, loop, health, finished=stop.is_set, stop=stop).start()
        health.ready = True
        while not stop.wait(0.5):  # a short wait keeps Ctrl+C working on Windows
            _take_redrives(store, relay)
        return _stopped(sink, failed)
    finally:
        health.ready = False
        emptied = relay.drain(config.drain_timeout)
        left = relay.depth()
        if not emptied:
            log.warning(
                "stopping with %d events in the outbox; they go out on the next start", left
            )
        if not relay.stopped:
            log.warning("the sink %s is still blocked in a send: stopping without it", sink.name)
        hooks.close()
        sink.close()
        _note_daemon(store, {**record, "stopped_at": rfc3339(datetime.now(timezone.utc))})
        store.close()
        if server is not None:
            server.shutdown()
        log.info("stopped")


def _take_redrives(store: Store, relay: Relay) -> None:
    """`maintenance-bridge redrive` only marks parked events: the daemon, which owns the
    outbox's queue, takes them back into it."""
    try:
        taken = store.take_redrives()
    except sqlite3.Error as exc:
        log.warning("could not take redriven events from the state store: %s", exc)
        return
    for seq, event, _ in taken:
        relay.enqueue(seq, event, None, [])
    relay.unparked(len(taken))
    if taken:
        log.info("redrive: %d parked events back in the outbox", len(taken))


def _note_daemon(store: Store, record: dict[str, Any]) -> None:
    """Tell `status` who runs here; a store that refuses it is reported by the recorder."""
    try:
        store.note_daemon(record)
    except sqlite3.Error as exc:
        log.warning("could not record the daemon in the state store: %s", exc)


def _arm(config: Config) -> Reading | None:
    """The first round of the `instance/maintenance-event` watch, asked before anything slow:
    the server gives its 60 s migration warning only if the key itself was queried since the
    last event. One attempt (with a short connect time-out: off GCE it must not delay start-up);
    if it fails, the watcher asks again under the retry policy."""
    if MAINTENANCE not in config.keys:
        return None
    client = MetadataClient(config.metadata_url, connect_timeout=0.5)
    try:
        return client.watch(MAINTENANCE, "0", config.poll_timeout)
    except MetadataError:
        return None
    finally:
        client.close()


def _deferred_connect(sink: Sink) -> Callable[[], None] | None:
    """The sink's slow connection, if it has one: from now on `send` does not wait for it."""
    start = getattr(sink, "start_connecting", None)
    if start is None:
        return None
    start()
    connect: Callable[[], None] = sink.connect  # type: ignore[attr-defined]
    return connect


def _attesting(sink: Sink, config: Config, metrics: Metrics) -> Sink:
    """The sink, each event given its token on the relay's thread, over a metadata connection
    of that thread's own (a watcher's is busy with its long-poll)."""
    from bridge.attestation import AttestingSink, Attestor

    client = MetadataClient(config.metadata_url)  # each request's own deadline bounds connecting
    return AttestingSink(sink, Attestor(client, metrics.unattested().inc))


def _stopped(sink: Sink, failed: list[BaseException]) -> int:
    """Exit code 0, or the configuration error that stopped the bridge (one line)."""
    if failed:  # e.g. google.auth's DefaultCredentialsError off GCE
        raise ConfigError(f"--sink {sink.name}: {failed[0]}".splitlines()[0])
    return 0


def _connect(
    connect: Callable[[], None],
    watching: threading.Event,
    watchers: list[Watcher],
    stop: threading.Event,
    failed: list[BaseException],
) -> None:
    """Connect the sink once every watcher has had its first answer, or after 2 s: a metadata
    server that fails must not hold up what the outbox holds. A sink that cannot be created at
    all (no credentials) is a configuration error: the bridge stops."""
    deadline = time.monotonic() + 2.0
    watching.wait(2.0)
    for watcher in watchers:
        watcher.answered.wait(max(0.0, deadline - time.monotonic()))
    try:
        connect()
    except Exception as exc:
        failed.append(exc)
        stop.set()


def _identity(
    config: Config, stop: threading.Event, health: Health
) -> tuple[Instance, Scheduling] | None:
    """Read who we are: what names the event source is retried as the watchers retry (nothing
    can be published without it); the rest is read once, best effort. None if stopped first."""
    from bridge.outage import Outage
    from bridge.retry import metadata_policy

    client = MetadataClient(config.metadata_url)

    def sleep(seconds: float) -> None:
        if stop.wait(seconds):
            raise InterruptedError

    outage = Outage(log, f"reading identity from {config.metadata_url} succeeded")

    def warn(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        cls = getattr(exc, "failure_class", "other")
        if cls == "connection":  # off GCE, most likely
            outage.failed(
                cls,
                "the metadata server %s cannot be reached (%s): not on Compute Engine? To try "
                "the bridge elsewhere run `maintenance-bridge simulate` and set "
                "GCE_METADATA_HOST=127.0.0.1:8089 (retrying)",
                config.metadata_url,
                exc,
            )
        else:
            outage.failed(
                cls, "reading identity from %s failed: %s (retrying)", config.metadata_url, exc
            )

    health.expect("identity", 30.0)
    try:
        instance = metadata_policy(config.retry_cap).retrying(sleep, warn)(client.identity)
        outage.recovered()
        hostname, scheduling, problems = client.enrichment()
    except InterruptedError:
        return None
    finally:
        client.close()
        health.done("identity")
    if problems:
        log.warning(
            "events will carry these fields empty, watching regardless: %s", "; ".join(problems)
        )
    return replace(instance, hostname=hostname), scheduling


def _parked(store: Store) -> int:
    try:
        return store.parked_count()
    except sqlite3.Error:
        return 0


def _restored_since(recorded_at: float, config: Config) -> float:
    """The monotonic time a restored event entered the outbox. Its wall-clock stamp may be
    off by any step of the clock since: the age is clamped between 0 and the readiness
    limit, so that it is neither negative nor huge, and a restored event still past the
    limit turns /readyz red only if it does not go out at once."""
    age = min(max(0.0, time.time() - recorded_at), config.ready_max_outbox_age)
    return time.monotonic() - age


def _heartbeat(recorder: Recorder) -> Callable[[], None]:
    return lambda: recorder.heartbeat(datetime.now(timezone.utc), time.monotonic())


def _every(task: Callable[[], None], interval: float, stop: threading.Event) -> None:
    """`task` every `interval` seconds (monotonic: a step of the wall clock changes none)."""
    while not stop.wait(interval):
        task()
