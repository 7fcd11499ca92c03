"""The fleet board (terraform/functions/board): what an SRE reads off it, and that nothing an
event carries can run as script in their browser.

The pure parts (rows, filters, counts, strip, escaping, the 10,000-instance figure) run
in-process; the function itself runs from its unpacked zip under functions-framework (the
helpers of test_functions.py) over the official Firestore emulator, fed by the ledger function,
and end to end from the simulator through a real bridge and the official Pub/Sub emulator. A
headless Chromium (Debian's `chromium-headless-shell` or `chromium`) loads the page where one
is installed; that test skips, saying so, where none is.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import requests
from test_functions import (
    FUNCTIONS,
    MAINTENANCE,
    MIGRATE,
    PROJECT,
    ZONE,
    Function,
    _load_module,
    _wait_http,
    firestore_host,  # noqa: F401 - the module-scoped Firestore emulator fixture
    maintenance,
    skip_without_firestore,
    stop,
    until,
    vm,
    wait_for_port,
)
from werkzeug.datastructures import MultiDict

TERRAFORM = FUNCTIONS.parent
NOW = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)
HOSTILE = (
    "<script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned'\">\"'&"
)


board = _load_module("board")


def entry(kind: str, current: str, at: datetime, **extra: Any) -> dict[str, Any]:
    """A state entry as the ledger stores it (ledger/main.py `_entry`)."""
    return {"kind": kind, "current": current, "observed_at": board._iso(at), **extra}


def doc(
    name: str = "vm-1",
    zone: str = ZONE,
    *,
    maintenance_entry: dict[str, Any] | None = None,
    preemption: dict[str, Any] | None = None,
    upcoming: dict[str, Any] | None = None,
    heartbeat: dict[str, Any] | None = None,
    expired: dict[str, Any] | None = None,
) -> dict[str, Any]:
    state = {
        family: e
        for family, e in (
            ("maintenance", maintenance_entry),
            ("preemption", preemption),
            ("upcoming", upcoming),
        )
        if e
    }
    out: dict[str, Any] = {
        "instance": {"name": name, "zone": zone, "project_id": PROJECT, "id": "1"},
        "state": state,
    }
    if heartbeat:
        out["heartbeat"] = heartbeat
    if expired:
        out["expired"] = expired
    return out


def migrating(at: datetime = NOW - timedelta(seconds=30), **extra: Any) -> dict[str, Any]:
    return entry("maintenance.started", MIGRATE, at, notice_seconds=60, **extra)


def window(start: datetime, hours: int = 4, status: str = "PENDING") -> dict[str, Any]:
    upcoming = {
        "type": "SCHEDULED",
        "window_start_time": board._iso(start),
        "window_end_time": board._iso(start + timedelta(hours=hours)),
        "maintenance_status": status,
    }
    return entry("upcoming.scheduled", "{}", NOW - timedelta(hours=1), upcoming=upcoming)


def view(docs: list[tuple[str, dict[str, Any]]], **query: Any) -> dict[str, Any]:
    return board.fleet(docs, MultiDict(query), NOW)


class Page(HTMLParser):
    """What a browser would make of the page: scripts, event handlers, styles, text."""

    def __init__(self, source: str) -> None:
        super().__init__(convert_charrefs=True)
        self.scripts: list[dict[str, str | None]] = []
        self.inline: list[str] = []  # on* handlers, style attributes, <style> elements
        self.text: list[str] = []
        self.titles: list[str] = []  # title attributes (tooltips)
        self._tag = ""
        self.feed(source)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._tag = tag
        if tag == "script":
            self.scripts.append(dict(attrs))
        if tag == "style":
            self.inline.append("<style>")
        self.inline += [f"{tag} {k}" for k, _ in attrs if k.startswith("on") or k == "style"]
        self.titles += [v or "" for k, v in attrs if k == "title"]

    def handle_data(self, data: str) -> None:
        if self._tag == "script" and data.strip():
            self.inline.append(f"script text {data[:40]!r}")
        self.text.append(data)


# --- what the rows say ------------------------------------------------------------------------


def test_hostile_values_are_shown_as_text_and_run_nowhere() -> None:
    """A forged name, zone, value and reason are text on the page and exact in the JSON."""
    forged = doc(
        HOSTILE,
        zone=f'{ZONE}"><script>x</script>',
        maintenance_entry=entry("maintenance.started", HOSTILE, NOW, notice_seconds=60),
        upcoming=window(NOW + timedelta(days=1), status=HOSTILE),
        expired={"at": NOW, "reason": HOSTILE},
    )
    result = view([("p_1", forged)])
    page = board.render_page(result, NOW)
    parsed = Page(page)
    assert parsed.scripts == [{"src": "./board.js", "defer": None}]
    assert not parsed.inline
    text = "".join(parsed.text)
    assert text.count(HOSTILE) >= 2  # the name and the maintenance value
    assert f'{ZONE}"><script>x</script>' in text
    assert HOSTILE in parsed.titles  # the expired reason, in a tooltip
    assert "<script>document" not in page and "<img" not in page
    (row,) = json.loads(json.dumps(result))["instances"]
    assert row["name"] == HOSTILE and row["expired"]["reason"] == HOSTILE


def test_a_forged_notice_beyond_the_calendar_leaves_the_page_up() -> None:
    forged = entry("maintenance.started", MIGRATE, NOW, notice_seconds=10**20)
    result = view([("p_1", doc(maintenance_entry=forged)), ("p_2", doc("vm-2"))])
    assert [r["deadline"] for r in result["instances"]] == [None, None]
    assert "vm-2" in board.render_page(result, NOW)


def test_long_values_are_cut_on_the_page_and_whole_in_the_json() -> None:
    name = "v" * 5000
    result = view([("p_1", doc(name))])
    parsed = Page(board.render_page(result, NOW))
    assert "v" * board.NAME_LIMIT + "…" in "".join(parsed.text)
    assert "v" * (board.NAME_LIMIT + 1) not in "".join(parsed.text)
    assert name in parsed.titles
    assert result["instances"][0]["name"] == name


@pytest.mark.parametrize(
    ("flags", "latest"),
    [({}, False), ({"happened_while_down": True}, True), ({"at_startup": True}, True)],
)
def test_countdown_to_the_deadline_marked_at_the_latest(
    flags: dict[str, bool], latest: bool
) -> None:
    result = view([("p_1", doc(maintenance_entry=migrating(**flags)))])
    (row,) = result["instances"]
    assert row["state"] == "maintenance"
    assert row["deadline"] == {"at": "2026-01-01T12:00:30Z", "at_the_latest": latest}
    page = board.render_page(result, NOW)
    assert 'data-deadline="2026-01-01T12:00:30Z">in 30 s</time>' in page
    assert ("at the latest" in page) is latest


def test_preemption_deadline_and_expired_notice() -> None:
    preempted = entry("preemption.started", "TRUE", NOW - timedelta(seconds=40), notice_seconds=30)
    expired = {"at": NOW, "reason": "no heartbeat since ..."}
    result = view(
        [
            ("p_1", doc("spot", preemption=preempted)),
            ("p_2", doc("gone", maintenance_entry=migrating(), expired=expired)),
        ]
    )
    spot, gone = sorted(result["instances"], key=lambda r: r["name"], reverse=True)
    assert spot["state"] == "preempted" and spot["preempted"] is True
    assert spot["deadline"]["at"] == "2026-01-01T11:59:50Z"
    assert "10 s ago" in board.render_page(result, NOW)
    assert gone["state"] == "expired" and gone["expired"]["reason"].startswith("no heartbeat")


@pytest.mark.parametrize(("age", "silent"), [(179, False), (181, True)])
def test_silent_past_three_heartbeat_intervals(age: int, silent: bool) -> None:
    beat = {"observed_at": board._iso(NOW - timedelta(seconds=age)), "interval_seconds": 60}
    result = view([("p_1", doc(heartbeat=beat))])
    assert result["instances"][0]["heartbeat"]["silent"] is silent
    assert result["counts"]["silent"] == int(silent)
    assert ('<span class="flag">silent</span>' in board.render_page(result, NOW)) is silent


def test_one_heartbeat_is_not_enough_to_call_a_bridge_silent() -> None:
    beat = {"observed_at": board._iso(NOW - timedelta(hours=5))}  # no interval learnt yet
    (row,) = view([("p_1", doc(heartbeat=beat))])["instances"]
    assert row["heartbeat"] == {
        "observed_at": "2026-01-01T07:00:00Z",
        "age_seconds": 18000,
        "interval_seconds": None,
        "silent": False,
    }


def fleet_of_five() -> list[tuple[str, dict[str, Any]]]:
    return [
        ("p_1", doc("a-migrating", "zone-a", maintenance_entry=migrating())),
        ("p_2", doc("b-scheduled", "zone-a", upcoming=window(NOW + timedelta(days=2)))),
        ("p_3", doc("c-ok", "zone-b")),
        ("p_4", doc("d-ok", "zone-b")),
        ("p_5", doc("e-scheduled", "zone-c", upcoming=window(NOW + timedelta(hours=3)))),
    ]


def test_counts_cover_the_fleet_and_filters_choose_rows() -> None:
    everything = view(fleet_of_five())
    assert everything["counts"]["state"] == {"ok": 2, "scheduled": 2, "maintenance": 1}
    assert everything["counts"]["zone"] == {"zone-a": 2, "zone-b": 2, "zone-c": 1}
    # Most urgent first: under way, then the nearest window, then the rest by name.
    names = [r["name"] for r in everything["instances"]]
    assert names == ["a-migrating", "e-scheduled", "b-scheduled", "c-ok", "d-ok"]
    chosen = board.fleet(
        fleet_of_five(),
        MultiDict([("zone", "zone-a"), ("zone", "zone-c"), ("state", "scheduled")]),
        NOW,
    )
    assert [r["name"] for r in chosen["instances"]] == ["e-scheduled", "b-scheduled"]
    assert chosen["counts"] == everything["counts"]  # the counts stay the fleet's
    commas = view(fleet_of_five(), zone="zone-a,zone-c", state="scheduled")
    assert commas["instances"] == chosen["instances"]
    assert chosen["filters"] == {"zone": ["zone-a", "zone-c"], "state": ["scheduled"]}
    page = Page(board.render_page(chosen, NOW))
    assert "".join(page.text).count("-scheduled") == 2


def test_pages() -> None:
    second = view(fleet_of_five(), per_page="2", page="2")
    assert (second["page"], second["pages"], second["matching"]) == (2, 3, 5)
    assert [r["name"] for r in second["instances"]] == ["b-scheduled", "c-ok"]
    page = board.render_page(second, NOW)
    assert 'href="./?per_page=2&amp;page=1"' in page and 'href="./?per_page=2&amp;page=3"' in page
    assert view(fleet_of_five(), page="99")["page"] == 1 == view(fleet_of_five(), page="x")["page"]


def test_seven_day_strip_of_scheduled_windows() -> None:
    result = view(
        [
            ("p_1", doc("soon", upcoming=window(NOW + timedelta(days=2)))),  # hours 48..51
            ("p_2", doc("same-time", upcoming=window(NOW + timedelta(days=2, hours=2)))),  # 50..53
            ("p_3", doc("later", upcoming=window(NOW + timedelta(days=10)))),  # off the strip
        ]
    )
    hours = result["windows_by_hour"]
    assert len(hours) == 7 * 24
    assert {h: n for h, n in enumerate(hours) if n} == {48: 1, 49: 1, 50: 2, 51: 2, 52: 1, 53: 1}
    rows = {r["name"]: r["window"]["strip"] for r in result["instances"]}
    assert rows["later"] is None and rows["soon"] == [round(48 / 168, 5), round(52 / 168, 5)]
    page = board.render_page(result, NOW)
    assert page.count('<rect class="win pending"') == 2
    assert '<svg id="fleet-strip"' in page and "peak: 2 VMs" in page


def test_ten_thousand_instances_render_in_under_a_second() -> None:
    """The figure docs/board.md gives: rows, counts and strip over 10,000 documents, one page."""
    docs = [
        (
            f"p_{i}",
            doc(
                f"vm-{i:05d}",
                f"zone-{i % 12}",
                maintenance_entry=migrating() if i % 50 == 0 else None,
                upcoming=window(NOW + timedelta(hours=i % 160)) if i % 3 == 0 else None,
                heartbeat={
                    "observed_at": board._iso(NOW - timedelta(seconds=i % 400)),
                    "interval_seconds": 60,
                },
            ),
        )
        for i in range(10_000)
    ]
    started = time.perf_counter()
    result = view(docs)
    page = board.render_page(result, NOW)
    api = json.dumps(view(docs))
    elapsed = time.perf_counter() - started
    print(f"\n10,000 instances: page + JSON in {elapsed:.3f} s ({len(page)} + {len(api)} bytes)")
    assert elapsed < 1.0
    assert result["fleet"] == 10_000 and len(result["instances"]) == board.PER_PAGE
    assert result["counts"]["state"]["maintenance"] == 200


# --- the browser side --------------------------------------------------------------------------


def test_script_writes_text_only_and_parses() -> None:
    """board.js never hands data to an HTML parser or to eval."""
    for sink in (
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
        "Function(",
    ):
        assert sink not in board.SCRIPT, sink
    assert "textContent" in board.SCRIPT
    node = shutil.which("node")
    if node is None:
        pytest.skip("no node on PATH: board.js is not syntax-checked")
    result = subprocess.run(
        [node, "--check", "--input-type=commonjs"],
        input=board.SCRIPT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


# --- the function, over the ledger, in the Firestore emulator ---------------------------------


@pytest.fixture(scope="module")
def stack(firestore_host: str | None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:  # noqa: F811
    """The ledger and the board, each from its zip, on one emulator and one collection."""
    if firestore_host is None:
        skip_without_firestore()
    tmp = tmp_path_factory.mktemp("board")
    env = {
        "FIRESTORE_EMULATOR_HOST": firestore_host,
        "GOOGLE_CLOUD_PROJECT": PROJECT,
        "LEDGER_COLLECTION": f"board-{uuid.uuid4().hex[:8]}",
    }
    ledger = Function("ledger", env, tmp)
    page = Function("board", {**env, "BOARD_CACHE_SECONDS": "0"}, tmp, "board", "http")
    try:
        deadline = time.monotonic() + 60
        for fn in (ledger, page):
            wait_for_port(fn.port, fn.proc, fn.log, deadline)
        _wait_http(f"http://{firestore_host}/", deadline)
        yield ledger, page
    finally:
        stop(ledger.proc)
        stop(page.proc)


def get(fn: Function, path: str, **params: Any) -> requests.Response:
    return requests.get(f"http://127.0.0.1:{fn.port}{path}", params=params, timeout=30)


def test_board_serves_the_ledger_with_a_strict_policy(stack: Any) -> None:
    ledger, page = stack
    forged = dataclasses.replace(vm(), id="7001", name=HOSTILE)
    started = maintenance(
        "maintenance.started", instance=forged, observed=datetime.now(timezone.utc)
    )
    quiet = maintenance(
        "maintenance.ended", instance=vm("quiet-vm", 7002), previous=MIGRATE, current="NONE"
    )
    for event in (started, quiet):
        assert ledger.send(event).status_code == 200
    response = get(page, "/")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    csp = response.headers["Content-Security-Policy"]
    assert "script-src 'self';" in csp and "default-src 'none'" in csp and "unsafe" not in csp
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    parsed = Page(response.text)
    assert parsed.scripts == [{"src": "./board.js", "defer": None}] and not parsed.inline
    assert HOSTILE in "".join(parsed.text) and "quiet-vm" in "".join(parsed.text)
    assert re.search(r'data-deadline="[^"]+">in \d+ s</time>', response.text)
    api = get(page, "/api/instances", state="maintenance").json()
    assert [r["name"] for r in api["instances"]] == [HOSTILE]
    assert api["counts"]["state"] == {"maintenance": 1, "ok": 1}
    assert get(page, "/api/instances", zone="elsewhere").json()["instances"] == []
    script = get(page, "/board.js")
    assert (
        script.headers["Content-Type"].startswith("text/javascript")
        and "textContent" in script.text
    )
    assert get(page, "/board.css").headers["Content-Type"].startswith("text/css")
    assert get(page, "/nothing").status_code == 404
    assert requests.post(f"http://127.0.0.1:{page.port}/", timeout=30).status_code == 405


def chromium() -> str | None:
    for name in ("chromium-headless-shell", "chromium", "chromium-browser"):
        if found := shutil.which(name):
            return found
    shell = Path("/usr/lib/chromium/chromium-headless-shell")
    return str(shell) if shell.is_file() else None


def test_end_to_end_simulator_to_board(stack: Any, pubsub: Any, tmp_path: Path) -> None:
    """simulator -> bridge -> official Pub/Sub emulator -> ledger (Firestore emulator) -> board;
    then, where a headless Chromium is installed, the page as a browser runs it."""
    from support.bridge import BridgeProcess
    from support.pubsub import admin

    from bridge.keys import UPCOMING
    from bridge.simulator import Simulator

    ledger, page = stack
    name, instance_id = f"e2e-{HOSTILE}", "5550001112229990001"
    start = (datetime.now(timezone.utc) + timedelta(days=2)).replace(
        minute=0, second=0, microsecond=0
    )
    scheduled = {
        "type": "SCHEDULED",
        "can_reschedule": "true",
        "window_start_time": board._iso(start),
        "window_end_time": board._iso(start + timedelta(hours=4)),
        "maintenance_status": "PENDING",
    }
    sim = Simulator(identity={"instance/id": instance_id, "instance/name": name}).start()
    sim.set_value(UPCOMING, json.dumps(scheduled))
    topic_name = f"board-{uuid.uuid4().hex[:8]}"
    with admin(pubsub) as ps:
        topic = ps.create_topic(topic_name)
        endpoint = f"http://127.0.0.1:{ledger.port}/{topic}"
        ps.create_subscription(topic, f"{topic_name}-ledger", push_endpoint=endpoint)
        args = ("--topic", topic, "--heartbeat-interval", "1")
        bridge = BridgeProcess(sim.url, tmp_path / "state", *args, env=pubsub.env())
        try:
            deadline = time.monotonic() + 10
            while sim.stats().get(MAINTENANCE, 0) < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            sim.set_value(MAINTENANCE, MIGRATE)

            def mine() -> dict[str, Any] | None:
                rows = get(page, "/api/instances", state="maintenance").json()["instances"]
                row = next((r for r in rows if r["instance_id"] == instance_id), None)
                ready = row and row["window"] and row["heartbeat"]["interval_seconds"]
                return row if ready else None

            row = until(mine, timeout=30)
            assert row, bridge.logs()[-5:]
        finally:
            assert bridge.terminate() == 0
            sim.stop()
    assert row["name"] == name and row["maintenance"] == MIGRATE
    assert row["deadline"]["at_the_latest"] is False
    assert row["window"]["start"] == board._iso(start) and row["window"]["status"] == "PENDING"
    assert row["last_event"]["kind"] == "maintenance.started"
    assert row["heartbeat"]["silent"] is False
    # The bridge is gone: three of its 1 s intervals later the board calls it silent.
    silent = until(
        lambda: [
            r
            for r in get(page, "/api/instances").json()["instances"]
            if r["instance_id"] == instance_id and r["heartbeat"]["silent"]
        ],
        timeout=15,
    )
    assert silent

    browser = chromium()
    if browser is None:
        pytest.skip("no headless Chromium (apt install chromium-headless-shell): no browser check")
    url = f"http://127.0.0.1:{page.port}/?state=maintenance"
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000"]
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "<title>Fleet maintenance board</title>" in dom.stdout  # no forged script retitled it
    rows = dom.stdout.split('<tbody id="rows">', 1)[1]
    assert "e2e-&lt;script&gt;document.title='pwned'&lt;/script&gt;&lt;img" in rows  # as text
    assert re.search(r'<time class="countdown"[^>]*>(in \d+ s|\d+ (s|min \d+ s) ago)</time>', rows)
    shot = tmp_path / "board.png"
    subprocess.run(
        [*common, "--window-size=1400,700", f"--screenshot={shot}", url],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert shot.stat().st_size > 10_000
    print(f"\nscreenshot: {shot}", file=sys.stderr)


# --- Terraform ---------------------------------------------------------------------------------


def test_terraform_deploys_the_board_private_and_read_only(tmp_path: Path) -> None:
    from test_terraform import MODULE, _console, block, load

    source = (MODULE / "board.tf").read_text()
    found = {
        rtype: named for b in load(MODULE / "board.tf")["resource"] for rtype, named in b.items()
    }
    fn = found["google_cloudfunctions2_function"]["board"]
    assert block(fn, "build_config")["entry_point"] == "board"
    assert "event_trigger" not in fn and "dynamic" not in fn  # HTTP, not a subscriber
    service = block(fn, "service_config")
    assert service["service_account_email"] == "${google_service_account.board[0].email}"
    assert service["environment_variables"]["LEDGER_COLLECTION"] == "${var.ledger.collection}"
    viewers = found["google_cloud_run_v2_service_iam_member"]["board_viewers"]
    assert viewers["role"] == "roles/run.invoker" and viewers["member"] == "${each.value}"
    assert "var.board_viewers" in viewers["for_each"]
    reader = found["google_project_iam_member"]["board"]
    assert reader["role"] == "roles/datastore.viewer"
    assert "/databases/${var.ledger.database}" in block(reader, "condition")["expression"]
    assert "allUsers" not in source and "allAuthenticatedUsers" not in source
    console = _console(tmp_path, with_repo_files=True)
    board_locals = re.search(r"^locals \{\n.*?^\}\n", source, re.S | re.M)
    assert board_locals
    (console.dir / "board_locals.tf").write_text(board_locals.group(0))
    autopilot = (MODULE / "autopilot.tf").read_text()  # its zip joins function_archives too
    autopilot_locals = re.search(r"^locals \{\n.*?^\}\n", autopilot, re.S | re.M)
    assert autopilot_locals
    (console.dir / "autopilot_locals.tf").write_text(autopilot_locals.group(0))
    cloud = (MODULE / "system_events.tf").read_text()  # the system-events zip joins them too
    cloud_locals = re.search(r"^locals \{\n.*?^\}\n", cloud, re.S | re.M)
    assert cloud_locals
    (console.dir / "system_events_locals.tf").write_text(cloud_locals.group(0))
    zips = "local.function_archives"
    assert set(console.eval(zips, enable_board=True)) == {
        "notify",
        "ledger",
        "drain",
        "board",
        "system-events",
    }
    assert "system-events" not in console.eval(zips, system_events={"enabled": False})
    assert "board" not in console.eval(zips)
    assert "board" not in console.eval(zips, enable_board=True, ledger={"enabled": False})
    for public in ("allUsers", "allAuthenticatedUsers", "sre@example.com"):
        assert "Invalid value for variable" in console.run("1", board_viewers=[public]).stderr
    assert console.eval("var.board_viewers", board_viewers=["group:sre@example.com"]) == [
        "group:sre@example.com"
    ]
