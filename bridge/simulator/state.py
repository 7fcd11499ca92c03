"""The simulator's state model: values, faults, stats, scenarios playing, and the rendering of
a metadata GET (long polls included) from that state; the HTTP side is in `handler`."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from types import TracebackType
from typing import Any

from bridge.keys import KEYS, UPCOMING
from bridge.simulator.handler import Server
from bridge.simulator.identity import Identity
from bridge.simulator.scenarios import Step
from bridge.simulator.wire import (
    JSON,
    NO_NOTIFICATION,
    TEXT,
    V1,
    Query,
    Reply,
    camel,
    container_of,
    etag_of,
    metadata_key,
)

log = logging.getLogger("bridge.simulator")

SCHEDULING = "instance/scheduling/"
PLAIN_ALT_JSON = ("string", "raw")  # how a plain value reads under alt=json: "NONE" or NONE
# What scheduling/?recursive=true answers: its JSON object (camelCase keys, flags as the text
# TRUE/FALSE), the same with flags as JSON booleans, the same with the keys as the paths spell
# them (on-host-maintenance), a text listing, a 404 or a truncated body.
SCHEDULING_MODES = ("json", "booleans", "path_keys", "text", "404", "broken")
EMPTY_UPCOMING = ("503", "404")  # what upcoming-maintenance answers when it holds no value

DEFAULT_IDENTITY: dict[str, str] = {
    # A watched key with a baseline holds it; one without (the window) starts absent.
    **{key.path: key.baseline for key in KEYS.values() if key.baseline},
    "instance/id": "4520031799277579481",
    "instance/name": "demo-vm",
    "instance/hostname": "demo-vm.us-central1-a.c.demo-project.internal",
    "instance/zone": "projects/123456789012/zones/us-central1-a",
    "project/project-id": "demo-project",
    "project/numeric-project-id": "123456789012",
    "instance/scheduling/on-host-maintenance": "MIGRATE",
    "instance/scheduling/automatic-restart": "TRUE",
    "instance/scheduling/preemptible": "FALSE",
    "instance/scheduling/provisioning-model": "STANDARD",
}


# Fault kind -> the parameters it accepts.
FAULT_PARAMS: dict[str, frozenset[str]] = {
    "status": frozenset({"status", "body"}),
    "delay": frozenset({"seconds"}),
    **dict.fromkeys(
        ("drop", "reset", "no_flavor", "redirect", "malformed", "no_etag", "huge", "invalid_utf8"),
        frozenset(),
    ),
}


@dataclass
class _Fault:
    kind: str
    remaining: int
    prefix: str
    params: dict[str, Any]


class Simulator:
    """A metadata server on a daemon thread; every method is thread-safe."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        identity: Mapping[str, str] | None = None,
        *,
        max_wait: float = 300.0,
        quiet: bool = True,
        plain_alt_json: str = "string",
        scheduling: str = "json",
        empty_upcoming: str = "503",
    ) -> None:
        """Bind at once so that ``port`` is known before ``start``.

        ``max_wait`` caps a hanging GET (the real cap is undocumented); ``quiet=False``
        logs every request to stderr; ``plain_alt_json`` and ``scheduling`` pick among the
        undocumented or broken renderings, ``empty_upcoming`` the answer of an empty
        ``upcoming-maintenance`` (see the module docstring).
        """
        self._values = dict(DEFAULT_IDENTITY)
        self._guard = threading.RLock()  # the values and the renderings
        self.plain_alt_json = self.scheduling = self.empty_upcoming = ""
        self.configure(
            plain_alt_json=plain_alt_json, scheduling=scheduling, empty_upcoming=empty_upcoming
        )
        # One condition per path asked with wait_for_change (on the values' lock): a change
        # wakes the polls on its own key and on the directories above it, as a real server
        # answers them, not every hanging poll of every key.
        self._waits: dict[str, threading.Condition] = {}
        self._hanging: Counter[str] = Counter()  # polls waiting for a change, by path
        self._forgets = 0  # a poll that began before a forget ends (its connection is gone)
        for key, value in (identity or {}).items():
            self.set_value(key, value)
        self._lock = threading.Lock()  # faults, stats and freezes
        self._frozen = False
        self._freezes = 0  # how many freezes began: a poll taken before one is never answered
        self._faults: list[_Fault] = []
        self._counts: Counter[str] = Counter()
        self._stopping = threading.Event()
        self._scenario_stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.max_wait = max_wait
        self.quiet = quiet
        self.identity = Identity()
        self._server = Server((host, port), self)
        self.host = host
        self.port: int = self._server.server_address[1]

    @property
    def host_port(self) -> str:
        """What ``GCE_METADATA_HOST`` takes."""
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host_port}{V1}"

    def start(self) -> Simulator:
        # Where stop() cannot wake the accept loop, the poll interval bounds its wait.
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.1,), name="simulator", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and drop every open connection, hanging polls included."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._scenario_stop.set()
        with self._guard:
            for waiting in self._waits.values():
                waiting.notify_all()
        self._server.drop_connections()
        if self._thread is not None:
            with contextlib.suppress(OSError):  # wakes the accept loop at once on Linux
                self._server.socket.shutdown(socket.SHUT_RDWR)
            self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> Simulator:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- values ---------------------------------------------------------------------

    def set_value(self, path: str, value: str) -> None:
        key = metadata_key(path)
        if not isinstance(value, str):
            raise TypeError(f"metadata values are strings, got {type(value).__name__}")
        with self._guard:
            parents = {key[: i + 1] for i, c in enumerate(key) if c == "/"}
            if any(k.startswith(key + "/") or k + "/" in parents for k in self._values):
                raise ValueError(f"{key!r} would clash with a directory of the same name")
            if self._values.get(key) != value:
                self._values[key] = value
                self._changed(key)

    def delete_value(self, path: str) -> None:
        """Remove a key: it then answers 404 (``upcoming-maintenance``: the 503)."""
        key = metadata_key(path)
        with self._guard:
            if self._values.pop(key, None) is not None:
                self._changed(key)

    def _changed(self, key: str) -> None:
        """Wake the polls on `key` and on every directory above it; `_guard` held."""
        for path, waiting in self._waits.items():
            if path == key or ((path == "" or path.endswith("/")) and key.startswith(path)):
                waiting.notify_all()

    def get_value(self, path: str) -> str | None:
        with self._guard:
            return self._values.get(metadata_key(path))

    def configure(self, **settings: str) -> None:
        """Switch renderings at run time (control API ``POST settings``): ``plain_alt_json``,
        ``scheduling``, ``empty_upcoming``."""
        choices = {
            "plain_alt_json": PLAIN_ALT_JSON,
            "scheduling": SCHEDULING_MODES,
            "empty_upcoming": EMPTY_UPCOMING,
        }
        for name, value in settings.items():
            if name not in choices:
                raise ValueError(f"unknown setting {name!r}; one of {sorted(choices)}")
            if value not in choices[name]:
                raise ValueError(f"{name} must be one of {choices[name]}")
        with self._guard:
            self.__dict__.update(settings)

    # -- disruptions -------------------------------------------------------------------

    def forget(self) -> int:
        """Drop every open connection with a reset, hanging polls included, without answering
        (control API ``POST forget``): the host after a live migration. Run it while the link
        is down and the reset is lost; returns how many connections there were."""
        forgotten = self._server.forget_connections()
        with self._guard:  # end their polls: nobody is left to answer
            self._forgets += 1
            for waiting in self._waits.values():
                waiting.notify_all()
        return forgotten

    def freeze(self) -> None:
        """Take requests and never answer them, from now on and the polls already hanging
        (``POST freeze``): a server that keeps connections but lost their requests."""
        with self._lock:
            self._frozen = True
            self._freezes += 1

    def thaw(self) -> None:
        """Answer new requests again (``DELETE freeze``); the ones taken while frozen stay lost."""
        with self._lock:
            self._frozen = False

    def _freezes_so_far(self) -> int:
        with self._lock:
            return self._freezes

    def _swallowed(self, freezes_before: int) -> bool:
        """Whether a request that began after `freezes_before` freezes goes unanswered."""
        with self._lock:
            return self._frozen or self._freezes > freezes_before

    # -- faults and stats ------------------------------------------------------------

    def inject(self, kind: str, count: int = 1, path: str | None = None, **params: Any) -> None:
        """Misbehave on the next ``count`` metadata requests under ``path`` (any if None).

        Kinds: status (status=503, body), delay (seconds=5), drop, reset, no_flavor,
        redirect, malformed, no_etag, huge, invalid_utf8. Faults queue up in order.
        """
        if kind not in FAULT_PARAMS:
            raise ValueError(f"unknown fault kind {kind!r}; one of {sorted(FAULT_PARAMS)}")
        if unknown := set(params) - FAULT_PARAMS[kind]:
            raise ValueError(f"fault {kind!r} takes no {sorted(unknown)}")
        if not isinstance(count, int) or count < 1:
            raise ValueError("count must be a positive integer")
        if kind == "status":
            params["status"] = HTTPStatus(int(params.get("status", 503)))
            params.setdefault("body", params["status"].phrase)
        if kind == "delay" and float(params.setdefault("seconds", 5.0)) < 0:
            raise ValueError("seconds must be >= 0")
        prefix = "" if path is None else path.lstrip("/").removeprefix(V1.lstrip("/"))
        with self._lock:
            self._faults.append(_Fault(kind, count, prefix, params))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def stats(self) -> dict[str, int]:
        """Requests per metadata path (relative to v1, faulted ones too) plus ``total``."""
        with self._lock:
            return {"total": sum(self._counts.values()), **self._counts}

    def _begin(self, key: str) -> _Fault | None:
        """Count a metadata request and take the first fault that applies to it."""
        with self._lock:
            self._counts[key] += 1
            for fault in self._faults:
                if key.startswith(fault.prefix):
                    fault.remaining -= 1
                    if not fault.remaining:
                        self._faults.remove(fault)
                    return fault
        return None

    # -- scenarios --------------------------------------------------------------------

    def play(
        self, steps: Sequence[Step], speed: float = 1.0, stop_event: threading.Event | None = None
    ) -> None:
        """Apply ``steps`` on their schedule (divided by ``speed``); blocks until done.

        Returns early when ``stop_event`` (default: the simulator stopping) is set.
        """
        if speed <= 0:
            raise ValueError("speed must be > 0")
        stop = stop_event if stop_event is not None else self._stopping
        start = time.monotonic()
        for step in sorted(steps, key=lambda s: s.at):
            if stop.wait(max(0.0, start + step.at / speed - time.monotonic())):
                return
            if step.value is None:
                self.delete_value(step.path)
            else:
                self.set_value(step.path, step.value)
            log.info("t=%.3fs %s = %s", time.monotonic() - start, step.path, step.value)

    def _play_background(self, steps: Sequence[Step], speed: float) -> None:
        """Control API: a new scenario replaces the one playing."""
        if speed <= 0:
            raise ValueError("speed must be > 0")
        self._scenario_stop.set()
        self._scenario_stop = stop = threading.Event()
        threading.Thread(
            target=self.play, args=(steps, speed, stop), name="simulator-scenario", daemon=True
        ).start()

    # -- rendering ----------------------------------------------------------------------

    def _respond(self, rel: str, q: Query) -> Reply:
        """Answer a metadata GET, hanging first if it is a long poll on the current ETag."""
        is_dir = rel == "" or rel.endswith("/")
        if q.wait and is_dir and not q.recursive:
            return Reply(400, b"wait_for_change needs recursive=true on a directory")
        limit = self.max_wait if q.timeout is None else min(q.timeout, self.max_wait)
        deadline = time.monotonic() + limit
        with self._guard:
            forgets = self._forgets
            while True:
                reply = self._render(rel, q)
                if (
                    not q.wait
                    or reply.status != 200
                    or reply.etag != q.last_etag
                    or self._stopping.is_set()
                    or self._forgets != forgets
                ):
                    return reply
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return reply
                waiting = self._waits.get(rel)
                if waiting is None:
                    waiting = self._waits[rel] = threading.Condition(self._guard)
                self._hanging[rel] += 1
                try:
                    waiting.wait(remaining)
                finally:
                    self._hanging[rel] -= 1

    def hanging(self, path: str) -> int:
        """How many polls on `path` are waiting for a change right now (a watcher that is armed;
        forgotten or frozen ones still count until their own time-out)."""
        with self._guard:
            return self._hanging[metadata_key(path)]

    def _identity_token(self, rel: str, query: str) -> Reply:
        with self._guard:
            values = dict(self._values)
        return self.identity.reply(rel, query, values)

    def _render(self, rel: str, q: Query) -> Reply:
        with self._guard:
            if rel == "" or rel.endswith("/"):
                return self._render_dir(rel, q)
            value = self._values.get(rel)
        if value is None:
            if rel == UPCOMING and self.empty_upcoming == "503":
                return Reply(503, NO_NOTIFICATION, JSON)
            return Reply(404, b"Not Found")
        etag = etag_of(value.encode())
        is_json = container_of(value) is not None
        if q.alt == "json":
            raw = is_json or self.plain_alt_json == "raw"
            return Reply(200, (value if raw else json.dumps(value)).encode(), JSON, etag)
        return Reply(200, value.encode(), JSON if is_json and q.alt != "text" else TEXT, etag)

    def _render_dir(self, rel: str, q: Query) -> Reply:
        keys = sorted(k for k in self._values if k.startswith(rel))
        odd = self.scheduling if rel == SCHEDULING and q.recursive else "json"
        if not keys or odd == "404":
            return Reply(404, b"Not Found")
        if q.recursive and odd != "text":
            tree: dict[str, Any] = {}
            for key in keys:
                *dirs, leaf = key[len(rel) :].split("/")
                node = tree
                for d in dirs:
                    node = node.setdefault(camel(d), {})
                # User-chosen attribute names are not camelCased by the real server.
                plain = dirs[-1:] == ["attributes"] or odd == "path_keys"
                name = leaf if plain else camel(leaf)
                value = self._values[key]
                if odd == "booleans" and value in ("TRUE", "FALSE"):
                    node[name] = value == "TRUE"
                else:
                    node[name] = value if (parsed := container_of(value)) is None else parsed
            body, ctype = json.dumps(tree, separators=(",", ":")).encode(), JSON
            if odd == "broken":
                body = body[: len(body) // 2]
        else:
            depth = rel.count("/")
            children = sorted(
                k[len(rel) :].split("/")[0] + ("/" if k.count("/") > depth else "") for k in keys
            )
            children = list(dict.fromkeys(children))
            if q.alt == "json" and odd != "text":
                body, ctype = json.dumps(children).encode(), JSON
            else:
                body, ctype = "".join(c + "\n" for c in children).encode(), TEXT
        return Reply(200, body, ctype, etag_of(body))

    def _is_dir(self, rel: str) -> bool:
        with self._guard:
            return any(k.startswith(rel + "/") for k in self._values)
