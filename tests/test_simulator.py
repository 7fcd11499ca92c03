"""The metadata simulator must behave like the real server (FACTS.md section 1)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests

from bridge.keys import MAINTENANCE as EVENT
from bridge.simulator import (
    NO_NOTIFICATION,
    SCENARIOS,
    Simulator,
    Step,
    load_scenario,
    open_simulator,
)

FLAVOR = {"Metadata-Flavor": "Google"}


@pytest.fixture
def sim():
    simulator = Simulator().start()
    yield simulator
    simulator.stop()


def get(sim, path="", timeout=5.0, headers=FLAVOR, **params):
    return requests.get(sim.url + path, params=params, headers=headers, timeout=timeout)


def poll(sim, path, etag, **params):
    return get(sim, path, wait_for_change="true", last_etag=etag, **params)


def in_thread(fn):
    """Run fn in a thread; the returned list receives its result (or exception)."""
    out = []

    def run():
        try:
            out.append(fn())
        except Exception as exc:
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def wait_for_requests(sim, path, n):
    """Block until the simulator has seen n requests for path (so a poll is hanging)."""
    deadline = time.monotonic() + 2
    while sim.stats().get(path, 0) < n:
        assert time.monotonic() < deadline, "request never reached the simulator"
        time.sleep(0.005)


def raw_get(sim, path):
    """A bare HTTP exchange, to tell a FIN (b"") from a reset."""
    with socket.create_connection(("127.0.0.1", sim.port), timeout=2) as s:
        s.sendall(
            f"GET /computeMetadata/v1/{path} HTTP/1.1\r\nHost: x\r\n"
            "Metadata-Flavor: Google\r\n\r\n".encode()
        )
        return s.recv(65536)


# -- header rules -----------------------------------------------------------------------


def test_flavor_header_required_except_on_root(sim):
    denied = get(sim, EVENT, headers={})
    assert denied.status_code == 403
    assert denied.text == "Missing Metadata-Flavor:Google header."
    assert denied.headers["Metadata-Flavor"] == "Google"
    root = requests.get(f"http://{sim.host_port}/", timeout=5)
    assert root.status_code == 200
    assert root.headers["Metadata-Flavor"] == "Google"
    assert get(sim, EVENT, headers={"Metadata-Flavor": "google-ish"}).status_code == 403


def test_forwarded_requests_rejected(sim):
    assert get(sim, EVENT, headers={**FLAVOR, "X-Forwarded-For": "10.0.0.1"}).status_code == 403


def test_percent_encoding_in_path_rejected(sim):
    assert get(sim, "instance%2Fid").status_code == 400
    # ... but fine in the query string: alt=t%65xt is alt=text
    assert requests.get(sim.url + EVENT + "?alt=t%65xt", headers=FLAVOR, timeout=5).ok


def test_value_response(sim):
    r = get(sim, EVENT)
    assert (r.status_code, r.text) == (200, "NONE")
    assert r.headers["Content-Type"] == "application/text"
    assert re.fullmatch(r"[0-9a-f]{16}", r.headers["ETag"])
    assert get(sim, "project/project-id").text == "demo-project"


def test_etag_is_content_derived(sim):
    first = get(sim, EVENT).headers["ETag"]
    sim.set_value(EVENT, "MIGRATE_ON_HOST_MAINTENANCE")
    second = get(sim, EVENT).headers["ETag"]
    sim.set_value(EVENT, "NONE")
    assert second != first
    assert get(sim, EVENT).headers["ETag"] == first


def test_identity_overrides_and_extends_defaults():
    with Simulator(identity={"instance/name": "vm-7", "instance/attributes/x": "1"}) as s:
        s.start()
        assert get(s, "instance/name").text == "vm-7"
        assert get(s, "instance/id").text == "4520031799277579481"
        assert get(s, "instance/attributes/x").text == "1"


def test_unknown_and_deleted_keys_404(sim):
    assert get(sim, "instance/nope").status_code == 404
    sim.delete_value("instance/scheduling/provisioning-model")
    assert get(sim, "instance/scheduling/provisioning-model").status_code == 404
    assert sim.get_value("instance/scheduling/provisioning-model") is None


def test_set_value_validates(sim):
    with pytest.raises(ValueError):
        sim.set_value("instance/", "x")
    with pytest.raises(ValueError):
        sim.set_value("instance/scheduling", "x")  # a directory already
    with pytest.raises(ValueError):
        sim.set_value("instance/id/x", "x")  # under a key


# -- upcoming-maintenance ------------------------------------------------------------------


def test_upcoming_absent_is_503_at_once_even_when_waiting(sim):
    started = time.monotonic()
    r = poll(sim, "instance/upcoming-maintenance", "abc")
    assert time.monotonic() - started < 0.5
    assert r.status_code == 503
    assert r.content == NO_NOTIFICATION
    assert r.json() == {"error": "no notifications have been received yet, try again later"}


def test_upcoming_set_then_deleted(sim):
    window = {"type": "SCHEDULED", "can_reschedule": "true", "maintenance_status": "PENDING"}
    sim.set_value("instance/upcoming-maintenance", json.dumps(window))
    r = get(sim, "instance/upcoming-maintenance", alt="json")
    assert (r.status_code, r.json()) == (200, window)
    etag = r.headers["ETag"]
    thread, out = in_thread(lambda: poll(sim, "instance/upcoming-maintenance", etag))
    wait_for_requests(sim, "instance/upcoming-maintenance", 2)
    sim.delete_value("instance/upcoming-maintenance")
    thread.join(2)
    assert out[0].status_code == 503
    assert out[0].content == NO_NOTIFICATION


# -- alt, directories, recursive -------------------------------------------------------------


def test_alt_json_and_text(sim):
    r = get(sim, EVENT, alt="json")
    assert (r.headers["Content-Type"], r.json()) == ("application/json", "NONE")
    sim.set_value("instance/upcoming-maintenance", '{"type": "SCHEDULED"}')
    as_is = get(sim, "instance/upcoming-maintenance", alt="json")
    assert as_is.text == '{"type": "SCHEDULED"}'
    assert get(sim, "instance/upcoming-maintenance").headers["Content-Type"] == "application/json"
    text = get(sim, "instance/upcoming-maintenance", alt="text")
    assert text.headers["Content-Type"] == "application/text"
    assert text.headers["ETag"] == as_is.headers["ETag"]
    assert get(sim, EVENT, alt="xml").status_code == 400


def test_plain_value_under_alt_json_is_a_switch():
    """Undocumented on the real server: a JSON string by default, raw text on request."""
    with Simulator(plain_alt_json="raw") as raw:
        raw.start()
        r = get(raw, EVENT, alt="json")
        assert (r.text, r.headers["Content-Type"]) == ("NONE", "application/json")
        assert get(raw, EVENT).text == "NONE"  # without alt nothing changes
        raw.set_value("instance/upcoming-maintenance", '{"type": "SCHEDULED"}')
        assert get(raw, "instance/upcoming-maintenance", alt="json").json() == {"type": "SCHEDULED"}
    with pytest.raises(ValueError, match="plain_alt_json"):
        Simulator(plain_alt_json="xml")


def test_scheduling_modes():
    """instance/scheduling/?recursive=true as a broken server answers it; the rest unchanged."""
    answers = {}
    for mode in ("json", "text", "404", "broken"):
        with Simulator(scheduling=mode) as s:
            s.start()
            answers[mode] = get(s, "instance/scheduling/", recursive="true", alt="json")
            assert get(s, "instance/", recursive="true").json()["name"] == "demo-vm"
            assert get(s, "instance/scheduling/on-host-maintenance").text == "MIGRATE"
    assert answers["json"].json()["onHostMaintenance"] == "MIGRATE"
    assert answers["text"].text.splitlines()[0] == "automatic-restart"
    assert answers["404"].status_code == 404
    broken = answers["broken"]
    assert broken.status_code == 200 and broken.text.startswith('{"')
    with pytest.raises(ValueError):
        broken.json()
    with pytest.raises(ValueError, match="scheduling"):
        Simulator(scheduling="slow")


def test_directory_listing(sim):
    r = get(sim, "instance/scheduling/")
    assert r.text.splitlines() == [
        "automatic-restart",
        "on-host-maintenance",
        "preemptible",
        "provisioning-model",
    ]
    assert "scheduling/" in get(sim, "instance/").text.splitlines()
    assert get(sim).text.splitlines() == ["instance/", "project/"]
    assert get(sim, "instance/scheduling/", alt="json").json()[0] == "automatic-restart"
    assert get(sim, "nothing/").status_code == 404
    moved = get(sim, "instance/scheduling")
    assert [h.status_code for h in moved.history] == [301]
    assert moved.url.endswith("/instance/scheduling/")


def test_recursive_json_is_camel_case_and_nested(sim):
    sim.set_value("instance/attributes/ssh-keys", "k")
    r = get(sim, "instance/", recursive="true")
    assert r.headers["Content-Type"] == "application/json"
    data = r.json()
    assert data["maintenanceEvent"] == "NONE"
    assert data["scheduling"]["onHostMaintenance"] == "MIGRATE"
    assert data["scheduling"]["automaticRestart"] == "TRUE"
    assert data["attributes"] == {"ssh-keys": "k"}  # user keys keep their names
    assert "upcomingMaintenance" not in data


# -- long polling ---------------------------------------------------------------------------


def test_hanging_poll_answers_quickly_after_a_change(sim):
    etag = get(sim, EVENT).headers["ETag"]
    thread, out = in_thread(lambda: (poll(sim, EVENT, etag), time.perf_counter()))
    wait_for_requests(sim, EVENT, 2)
    time.sleep(0.1)
    assert not out, "the poll should hang while the value is unchanged"
    changed_at = time.perf_counter()
    sim.set_value(EVENT, "MIGRATE_ON_HOST_MAINTENANCE")
    thread.join(2)
    response, answered_at = out[0]
    assert response.text == "MIGRATE_ON_HOST_MAINTENANCE"
    assert response.headers["ETag"] != etag
    assert answered_at - changed_at < 0.05


def test_stale_or_zero_etag_answers_at_once(sim):
    started = time.monotonic()
    assert poll(sim, EVENT, "0").text == "NONE"
    assert poll(sim, EVENT, "0123456789abcdef").text == "NONE"
    assert get(sim, EVENT, wait_for_change="true").text == "NONE"
    assert time.monotonic() - started < 0.5


def test_timeout_sec_returns_same_value(sim):
    etag = get(sim, EVENT).headers["ETag"]
    started = time.monotonic()
    r = poll(sim, EVENT, etag, timeout_sec="1")
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 1.5
    assert (r.status_code, r.text, r.headers["ETag"]) == (200, "NONE", etag)
    assert poll(sim, EVENT, etag, timeout_sec="0.5").status_code == 400


def test_server_cap_bounds_a_poll_without_timeout_sec():
    with Simulator(max_wait=0.2) as s:
        s.start()
        etag = get(s, EVENT).headers["ETag"]
        started = time.monotonic()
        assert poll(s, EVENT, etag).text == "NONE"
        assert time.monotonic() - started < 1


def test_poll_on_deleted_key_answers_404(sim):
    etag = get(sim, "instance/preempted").headers["ETag"]
    thread, out = in_thread(lambda: poll(sim, "instance/preempted", etag))
    wait_for_requests(sim, "instance/preempted", 2)
    sim.delete_value("instance/preempted")
    thread.join(2)
    assert out[0].status_code == 404


def test_wait_on_directory_needs_recursive(sim):
    assert poll(sim, "instance/", "0").status_code == 400
    etag = get(sim, "instance/", recursive="true").headers["ETag"]
    thread, out = in_thread(lambda: poll(sim, "instance/", etag, recursive="true"))
    wait_for_requests(sim, "instance/", 2)
    sim.set_value("instance/scheduling/automatic-restart", "FALSE")
    thread.join(2)
    assert out[0].json()["scheduling"]["automaticRestart"] == "FALSE"


def test_stop_releases_hanging_polls_quickly():
    s = Simulator().start()
    etag = get(s, EVENT).headers["ETag"]
    threads = [in_thread(lambda: poll(s, EVENT, etag)) for _ in range(3)]
    wait_for_requests(s, EVENT, 4)
    started = time.monotonic()
    s.stop()
    for thread, out in threads:
        thread.join(1)
        assert isinstance(out[0], requests.ConnectionError)
    assert time.monotonic() - started < 1


# -- faults ----------------------------------------------------------------------------------


def test_fault_status_counts_and_path_prefix(sim):
    sim.inject("status", count=2, path="instance/preempted", status=500, body="boom")
    assert get(sim, EVENT).status_code == 200
    first, second = get(sim, "instance/preempted"), get(sim, "instance/preempted")
    assert (first.status_code, first.text) == (500, "boom")
    assert second.status_code == 500
    assert get(sim, "instance/preempted").status_code == 200
    sim.inject("status")
    assert get(sim, EVENT).status_code == 503


def test_fault_delay_trips_client_timeout(sim):
    sim.inject("delay", seconds=2)
    with pytest.raises(requests.ReadTimeout):
        get(sim, EVENT, timeout=0.3)
    assert get(sim, EVENT).text == "NONE"


def test_fault_drop_closes_without_answer(sim):
    sim.inject("drop")
    assert raw_get(sim, EVENT) == b""
    sim.inject("drop")
    with pytest.raises(requests.ConnectionError):
        get(sim, EVENT)


def test_fault_reset_sends_rst(sim):
    sim.inject("reset")
    with pytest.raises(ConnectionResetError):
        raw_get(sim, EVENT)
    assert raw_get(sim, EVENT).startswith(b"HTTP/1.1 200 OK")


def test_fault_no_flavor_and_no_etag(sim):
    sim.inject("no_flavor")
    sim.inject("no_etag")
    first, second = get(sim, EVENT), get(sim, EVENT)
    assert first.text == "NONE"
    assert "Metadata-Flavor" not in first.headers
    assert "ETag" in first.headers
    assert "ETag" not in second.headers
    assert second.headers["Metadata-Flavor"] == "Google"


def test_fault_redirect(sim):
    sim.inject("redirect")
    r = requests.get(sim.url + EVENT, headers=FLAVOR, allow_redirects=False, timeout=5)
    assert r.status_code == 302
    assert r.headers["Location"] == f"{sim.url}{EVENT}?redirected=1"
    sim.inject("redirect")
    followed = get(sim, EVENT, alt="json")
    assert [h.status_code for h in followed.history] == [302]
    assert followed.json() == "NONE"  # the query survives the redirect


def test_fault_bad_bodies(sim):
    sim.inject("malformed")
    sim.inject("huge")
    sim.inject("invalid_utf8")
    malformed = get(sim, EVENT)
    assert malformed.headers["Content-Type"] == "application/json"
    with pytest.raises(ValueError):
        malformed.json()
    assert len(get(sim, EVENT).content) == 1 << 20
    assert get(sim, EVENT).content == b"\xff\xfe\xfa"
    assert get(sim, EVENT).text == "NONE"


def test_fault_validation_and_clear(sim):
    with pytest.raises(ValueError):
        sim.inject("explode")
    with pytest.raises(ValueError):
        sim.inject("drop", seconds=1)
    with pytest.raises(ValueError):
        sim.inject("status", status=999)
    sim.inject("status", count=5)
    sim.clear_faults()
    assert get(sim, EVENT).status_code == 200


def test_stats_count_requests_per_path(sim):
    for _ in range(3):
        get(sim, EVENT)
    get(sim, "instance/", recursive="true")
    get(sim, EVENT, headers={})
    stats = sim.stats()
    assert stats[EVENT] == 4
    assert stats["instance/"] == 1
    assert stats["total"] == 5


# -- control API -------------------------------------------------------------------------------


def test_control_api_over_http(sim):
    base = f"http://{sim.host_port}/simulator/v1/"
    put = requests.put(base + "values/" + EVENT, data="TERMINATE_ON_HOST_MAINTENANCE", timeout=5)
    assert put.status_code == 204
    assert get(sim, EVENT).text == "TERMINATE_ON_HOST_MAINTENANCE"
    assert requests.get(base + "values/" + EVENT, timeout=5).text == "TERMINATE_ON_HOST_MAINTENANCE"
    assert requests.delete(base + "values/" + EVENT, timeout=5).status_code == 204
    assert requests.get(base + "values/" + EVENT, timeout=5).status_code == 404
    assert get(sim, EVENT).status_code == 404

    fault = {"kind": "status", "count": 1, "path": "instance/id", "status": 429}
    assert requests.post(base + "faults", json=fault, timeout=5).status_code == 204
    assert get(sim, "instance/id").status_code == 429
    assert requests.post(base + "faults", json={"kind": "nope"}, timeout=5).status_code == 400
    requests.post(base + "faults", json={"kind": "drop", "count": 3}, timeout=5)
    assert requests.delete(base + "faults", timeout=5).status_code == 204
    assert get(sim, "instance/id").status_code == 200

    stats = requests.get(base + "stats", timeout=5).json()
    assert stats["instance/id"] == 2
    assert stats["total"] == sim.stats()["total"]

    assert requests.post(base + "scenario", json={"name": "x"}, timeout=5).status_code == 400
    r = requests.post(base + "scenario", json={"name": "preempt", "speed": 100}, timeout=5)
    assert r.status_code == 202
    deadline = time.monotonic() + 2
    while sim.get_value("instance/preempted") != "TRUE":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert sim.get_value("instance/scheduling/provisioning-model") == "SPOT"
    steps = {"steps": [{"at": 0, "path": "instance/name", "value": "renamed"}]}
    assert requests.post(base + "scenario", json=steps, timeout=5).status_code == 202
    deadline = time.monotonic() + 2
    while sim.get_value("instance/name") != "renamed":
        assert time.monotonic() < deadline
        time.sleep(0.01)


# -- scenarios -------------------------------------------------------------------------------


def test_migrate_scenario_at_high_speed(sim):
    seen = []

    def watch():
        etag = get(sim, EVENT).headers["ETag"]
        while seen[-1:] != ["NONE"] or len(seen) < 2:
            r = poll(sim, EVENT, etag)
            seen.append(r.text)
            etag = r.headers["ETag"]

    thread, _ = in_thread(watch)
    wait_for_requests(sim, EVENT, 2)
    speed = 200
    started = time.monotonic()
    sim.play(SCENARIOS["migrate"], speed=speed)
    assert 61 / speed <= time.monotonic() - started < 61 / speed + 0.3
    thread.join(2)
    assert seen == ["MIGRATE_ON_HOST_MAINTENANCE", "NONE"]


def test_play_stops_on_event(sim):
    stop = threading.Event()
    stop.set()
    sim.play(SCENARIOS["terminate"], stop_event=stop)
    assert sim.get_value(EVENT) == "NONE"
    with pytest.raises(ValueError):
        sim.play([], speed=0)


def test_builtin_scenarios_are_well_formed():
    assert set(SCENARIOS) == {"migrate", "terminate", "preempt", "upcoming"}
    upcoming = [s.value for s in SCENARIOS["upcoming"]]
    assert upcoming[0] is None and upcoming[-1] is None
    windows = [json.loads(v) for v in upcoming[1:-1]]
    assert windows[0]["window_start_time"] != windows[1]["window_start_time"]
    assert {w["type"] for w in windows} == {"SCHEDULED"}
    terminate = {s.value: s.at for s in SCENARIOS["terminate"] if s.path == EVENT}
    assert terminate["NONE"] - terminate["TERMINATE_ON_HOST_MAINTENANCE"] == 3600


def test_load_scenario(tmp_path):
    assert load_scenario("migrate") == SCENARIOS["migrate"]
    path = tmp_path / "s.json"
    path.write_text(
        json.dumps(
            [
                {"at": 0.5, "path": EVENT, "value": "X"},
                {"at": 1, "path": "instance/upcoming-maintenance", "value": {"type": "SCHEDULED"}},
                {"at": 2, "path": "instance/preempted", "value": None},
            ]
        )
    )
    assert load_scenario(str(path)) == [
        Step(0.5, EVENT, "X"),
        Step(1.0, "instance/upcoming-maintenance", '{"type": "SCHEDULED"}'),
        Step(2.0, "instance/preempted", None),
    ]
    path.write_text(json.dumps([{"at": -1, "path": EVENT, "value": "X"}]))
    with pytest.raises(ValueError):
        load_scenario(str(path))
    with pytest.raises(ValueError, match="migrate"):
        load_scenario("no-such-scenario")


def test_open_simulator_names_what_is_wrong(tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("[{")
    not_utf8 = tmp_path / "latin1.json"
    not_utf8.write_bytes(b"\xff\xfe")
    cases = {
        "no-such-scenario": "unknown scenario",
        str(bad_json): "Expecting",
        str(not_utf8): "codec",
    }
    for scenario, message in cases.items():
        with pytest.raises(ValueError, match=message) as caught:
            open_simulator("127.0.0.1", 0, scenario, False)
        assert str(caught.value).startswith(f"--scenario {scenario}: ")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ValueError, match="cannot listen on"):
            open_simulator("127.0.0.1", taken.getsockname()[1], None, False)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_serve_until_signal():
    code = (
        "from bridge.simulator import open_simulator, serve\n"
        "sim, steps = open_simulator('127.0.0.1', 0, 'preempt', False)\n"
        "raise SystemExit(serve(sim, steps, 100.0, False))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        line = proc.stderr.readline()
        match = re.fullmatch(
            r"simulator: listening on (http://127\.0\.0\.1:\d+/computeMetadata/v1/)\n", line
        )
        assert match, line
        deadline = time.monotonic() + 5
        while (
            requests.get(match[1] + "instance/preempted", headers=FLAVOR, timeout=5).text != "TRUE"
        ):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == 0
    finally:
        proc.kill()
        proc.stderr.close()


def test_stop_closes_idle_keep_alive_connections():
    s = Simulator().start()
    with socket.create_connection(("127.0.0.1", s.port), timeout=2) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert conn.recv(65536).startswith(b"HTTP/1.1 200")
        s.stop()
        assert conn.recv(65536) == b""  # FIN, not a recv timeout


# -- disruptions ----------------------------------------------------------------------------


def _hanging_raw_poll(sim, path):
    """A raw socket with a long-poll on `path`'s current ETag, hanging in the simulator."""
    etag = get(sim, path).headers["ETag"]
    conn = socket.create_connection(("127.0.0.1", sim.port), timeout=5)
    conn.sendall(
        f"GET /computeMetadata/v1/{path}?wait_for_change=true&last_etag={etag} HTTP/1.1\r\n"
        "Host: x\r\nMetadata-Flavor: Google\r\n\r\n".encode()
    )
    deadline = time.monotonic() + 5
    while sim.hanging(path) < 1:
        assert time.monotonic() < deadline, "the poll never hung"
        time.sleep(0.005)
    return conn


def test_forget_resets_every_connection_without_answering(sim):
    poll_conn = _hanging_raw_poll(sim, EVENT)
    idle = requests.Session()  # a kept-alive idle connection
    assert idle.get(sim.url + EVENT, headers=FLAVOR, timeout=5).text == "NONE"
    assert sim.forget() >= 2
    with pytest.raises(ConnectionResetError):  # the link is up here: the reset arrives
        poll_conn.recv(100)
    poll_conn.close()
    idle.close()
    deadline = time.monotonic() + 5
    while sim.hanging(EVENT):  # the forgotten poll ends on the server too
        assert time.monotonic() < deadline, "the forgotten poll still hangs"
        time.sleep(0.005)
    sim.set_value(EVENT, "MIGRATE_ON_HOST_MAINTENANCE")
    assert get(sim, EVENT).text == "MIGRATE_ON_HOST_MAINTENANCE"  # new connections are served


def test_a_frozen_server_takes_requests_and_never_answers_them(sim):
    before = _hanging_raw_poll(sim, EVENT)
    sim.freeze()
    with pytest.raises(requests.Timeout):
        get(sim, EVENT, timeout=0.5)
    sim.set_value(EVENT, "MIGRATE_ON_HOST_MAINTENANCE")  # would answer the hanging poll
    sim.thaw()
    before.settimeout(0.5)
    with pytest.raises(TimeoutError):  # taken before the freeze: lost for good
        before.recv(100)
    before.close()
    assert get(sim, EVENT).text == "MIGRATE_ON_HOST_MAINTENANCE"  # thawed: answered again


@pytest.mark.parametrize(
    ("settings", "value", "status", "body"),
    [
        ({"empty_upcoming": "503"}, None, 503, NO_NOTIFICATION),
        ({"empty_upcoming": "404"}, None, 404, b"Not Found"),
        ({"plain_alt_json": "raw"}, "NONE", 200, b"NONE"),
        ({"plain_alt_json": "string"}, "NONE", 200, b'"NONE"'),
        ({}, "{}", 200, b"{}"),
        ({}, "{ }", 200, b"{ }"),
    ],
)
def test_every_nothing_scheduled_form_can_be_served(sim, settings, value, status, body):
    path = "instance/upcoming-maintenance"
    control = f"http://{sim.host_port}/simulator/v1/"
    assert requests.post(control + "settings", json=settings, timeout=5).status_code == 204
    if value is None:
        sim.delete_value(path)
    else:
        sim.set_value(path, value)
    answer = get(sim, path, alt="json")
    assert (answer.status_code, answer.content) == (status, body)


def test_settings_refuse_unknown_names_and_values(sim):
    control = f"http://{sim.host_port}/simulator/v1/settings"
    assert requests.post(control, json={"empty_upcoming": "418"}, timeout=5).status_code == 400
    assert requests.post(control, json={"colour": "red"}, timeout=5).status_code == 400
    assert sim.empty_upcoming == "503"
