"""board: the fleet board, one page over the ledger's collection (see docs/board.md).

An HTTP function (entry point `board`) that only reads the ledger's Firestore documents:
  GET /               server-rendered HTML, one row per instance, counts, a 7-day strip of
                      scheduled windows; works with scripts off (it reloads itself every 15 s)
  GET /api/instances  the same rows as JSON, with the same filters
  GET /board.js       the page's only script: re-renders from the JSON every 15 s, ticks the
                      countdowns (served from here, so the CSP needs no 'unsafe-inline')
  GET /board.css      the page's only style sheet
Filters (query string, on both): `zone` and `state` (repeat or comma-separate values), `page`,
`per_page` (default 100, at most 1000).

Every value in a ledger document came from an event that anyone with publisher rights can
forge: every value is escaped on the server and set with textContent in the browser, and the
Content-Security-Policy allows no inline script, style or event handler. What the ledger
could not verify (docs/events.md, "Verified origin": its `verified` and `origin_reason` on each
state entry and the heartbeat) is shown as such: the row's `unverified` lists which of its
current entries are, and why, and the page flags them ("unverified origin"). Nothing is hidden:
the board is a marking, it refuses nothing.

Configuration (environment):
  LEDGER_COLLECTION    the ledger's collection (default `maintenance-ledger`).
  FIRESTORE_DATABASE   database id (default `(default)`).
  SILENT_INTERVALS     heartbeat intervals after which a bridge is shown silent (default 3).
  BOARD_CACHE_SECONDS  age after which a request has the ledger read again, in the background
                       (default 10; 0: read on every request, as the tests do). The first read
                       costs one document read per instance; every later one reads only the
                       documents whose `updated_at` (every ledger write sets it) is newer than
                       the newest already read: reads in proportion to what changed.
  GOOGLE_CLOUD_PROJECT / FIRESTORE_EMULATOR_HOST as usual for google-cloud-firestore.
"""

from __future__ import annotations

import html
import json
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlencode

import flask
import functions_framework
from google.cloud import firestore
from subscriber import parse_time

COLLECTION = os.environ.get("LEDGER_COLLECTION", "maintenance-ledger")
DATABASE = os.environ.get("FIRESTORE_DATABASE", "(default)")
SILENT_INTERVALS = float(os.environ.get("SILENT_INTERVALS", "3"))
CACHE_SECONDS = float(os.environ.get("BOARD_CACHE_SECONDS", "10"))

REFRESH_SECONDS = 15
PER_PAGE, MAX_PER_PAGE = 100, 1000
STRIP_HOURS = 7 * 24
NAME_LIMIT = 120  # longer strings are cut on the page (the JSON keeps them whole)
# Only what the board shows: a projection keeps the history (up to 500 entries) out of the read.
FIELDS = ["instance", "state", "heartbeat", "expired", "disruptions", "has_bridge", "updated_at"]
# What the cloud logs with no notice a bridge could give, shown for the last 7 days.
RECENT_CAUSES = ("host_error", "preemption")
RECENT_LIMIT = 100
MAINTENANCE_CAUSES = ("migration", "maintenance_termination")
# The order rows sort in, most urgent first; also the filter's vocabulary.
STATES = ("maintenance", "preempted", "expired", "scheduled", "ok")

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}

_client: firestore.Client | None = None
Documents = list[tuple[str, dict[str, Any]]]
_cache: tuple[float, datetime, Documents] | None = None  # (monotonic, wall clock, documents)
_known: dict[str, dict[str, Any]] = {}  # every document read so far, by id
_newest: Any = None  # the newest `updated_at` read so far: the next read asks for later ones
last_read_count = 0  # documents the latest read returned (what it cost; docs/board.md)
_cache_lock = threading.Lock()
_refreshing = threading.Event()


def client() -> firestore.Client:
    """The Firestore client, created on first use so that importing needs no credentials."""
    global _client
    if _client is None:
        _client = firestore.Client(database=DATABASE)
    return _client


def _read() -> tuple[float, datetime, Documents]:
    """The whole collection the first time; then only what changed since (`updated_at` newer
    than the newest already read: a write committed before a read is seen by it, so nothing
    older can appear later). The ledger never deletes a document."""
    global _newest, last_read_count
    read_at = datetime.now(timezone.utc)
    query = client().collection(COLLECTION)
    if _newest is not None:
        query = query.where(filter=firestore.FieldFilter("updated_at", ">", _newest))
    changed = [(s.id, s.to_dict() or {}) for s in query.select(FIELDS).stream()]
    for doc_id, doc in changed:
        _known[doc_id] = doc
        stamp = doc.get("updated_at")
        if stamp is not None and (_newest is None or stamp > _newest):
            _newest = stamp
    last_read_count = len(changed)
    return time.monotonic(), read_at, sorted(_known.items())


def _refresh() -> None:
    global _cache
    try:
        _cache = _read()
    finally:
        _refreshing.clear()


def ledger_documents() -> tuple[datetime, Documents]:
    """Every instance document (projected) and when it was read.

    Only the first request waits for the read (10,000 documents take seconds, docs/board.md);
    later, a read older than CACHE_SECONDS is served once more while a thread reads again.
    CACHE_SECONDS = 0 reads on every request.
    """
    global _cache
    with _cache_lock:
        if _cache is None or CACHE_SECONDS <= 0:
            _cache = _read()
        elif time.monotonic() - _cache[0] > CACHE_SECONDS and not _refreshing.is_set():
            _refreshing.set()
            threading.Thread(target=_refresh, name="ledger-read", daemon=True).start()
        return _cache[1], _cache[2]


# --- the rows ---------------------------------------------------------------------------------


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _text(value: Any) -> str:
    return value if isinstance(value, str) else "" if value is None else str(value)


def _deadline(entry: dict[str, Any]) -> dict[str, Any] | None:
    """observed_at + notice_seconds; only a latest bound when the notice may be older than that
    (seen at start-up or while the bridge was down)."""
    at, notice = parse_time(entry.get("observed_at")), entry.get("notice_seconds")
    if at is None or not isinstance(notice, (int, float)):
        return None
    try:  # a forged notice of 10**20 s must not take the page down
        deadline = at + timedelta(seconds=notice)
    except OverflowError:
        return None
    return {
        "at": _iso(deadline),
        "at_the_latest": bool(entry.get("at_startup") or entry.get("happened_while_down")),
    }


def _window(entry: dict[str, Any], now: datetime) -> dict[str, Any] | None:
    """The scheduled window, with its place on the 7-day strip as fractions (0..1) of it."""
    upcoming = entry.get("upcoming")
    if entry.get("kind") == "upcoming.cleared" or not isinstance(upcoming, dict):
        return None
    start = parse_time(upcoming.get("window_start_time"))
    end = parse_time(upcoming.get("window_end_time")) or start
    strip = None
    if start and end:
        span = timedelta(hours=STRIP_HOURS)
        x0 = max(0.0, (start - now) / span)
        x1 = min(1.0, (end - now) / span)
        strip = [round(x0, 5), round(max(x1, x0 + 0.003), 5)] if x1 >= 0 and x0 <= 1 else None
    return {
        "start": _iso(start),
        "end": _iso(end),
        "status": _text(upcoming.get("maintenance_status")),
        "type": _text(upcoming.get("type")),
        "strip": strip,
    }


def _recent(disruptions: Any, now: datetime) -> list[dict[str, Any]]:
    """Host errors and preemptions of the last 7 days, newest first, with who saw them."""
    out = []
    for d in disruptions if isinstance(disruptions, list) else []:
        at = parse_time(d.get("started_at")) if isinstance(d, dict) else None
        if at is None or now - at > timedelta(hours=STRIP_HOURS):
            continue
        if d.get("cause") in RECENT_CAUSES or d.get("host_error") is True:
            cause = "host_error" if d.get("host_error") is True else _text(d.get("cause"))
            seen = [_text(x) for x in d.get("seen_by") or [] if isinstance(x, str)]
            out.append(
                {"cause": cause, "at": _iso(at), "seen_by": seen, "error": _text(d.get("error"))}
            )
    return sorted(out, key=lambda r: r["at"], reverse=True)


def _seen_by(status: str, disruptions: Any) -> list[str]:
    """Who saw the disruption under way: the VM's notice (bridge), the cloud's record, or both."""
    causes = {"maintenance": MAINTENANCE_CAUSES, "preempted": ("preemption",)}.get(status)
    if not causes:
        return []
    open_ = [
        d
        for d in (disruptions if isinstance(disruptions, list) else [])
        if isinstance(d, dict) and d.get("cause") in causes and d.get("ended_at") is None
    ]
    latest = max(open_, key=lambda d: _text(d.get("started_at")), default=None)
    seen = (latest or {}).get("seen_by") or ["bridge"]
    return [_text(x) for x in seen if isinstance(x, str)]


def _autopilot(record: Any) -> dict[str, str] | None:
    """What the autopilot (functions/autopilot, docs/autopilot.md) wrote on the document: its
    state for the window, when it started it, and for one that waits the next slot it would use
    and Google's deadline."""
    if not isinstance(record, dict):
        return None
    fields = ("state", "started_at", "next_slot", "deadline", "reason")
    return {name: _text(record.get(name)) for name in fields}


def _unverified(entries: dict[str, Any]) -> list[dict[str, str]]:
    """The current entries (by name) the ledger recorded as not verified, with the reason;
    entries of a ledger older than verified origin say nothing and are not flagged."""
    return [
        {"entry": name, "reason": _text(entry.get("origin_reason")) or "not verified"}
        for name, entry in entries.items()
        if isinstance(entry, dict) and entry.get("verified") is False
    ]


def summarize(doc_id: str, doc: dict[str, Any], now: datetime) -> dict[str, Any]:
    """One ledger document as the board's row (the JSON API's element)."""
    inst = doc.get("instance") or {}
    state = doc.get("state") or {}
    maintenance, preemption = state.get("maintenance") or {}, state.get("preemption") or {}
    upcoming = state.get("upcoming") or {}
    current = _text(maintenance.get("current")) or "NONE"
    preempted = preemption.get("current") == "TRUE"
    window = _window(upcoming, now)
    expired = doc.get("expired")
    if current != "NONE":
        status, active = "maintenance", maintenance
    elif preempted:
        status, active = "preempted", preemption
    else:
        status, active = ("scheduled" if window else "ok"), {}
    if expired:
        status = "expired"
    entries = [e for e in (maintenance, preemption, upcoming) if e.get("observed_at")]
    last = max(entries, key=lambda e: _text(e.get("observed_at")), default=None)
    beat = doc.get("heartbeat") or {}
    beat_at, interval = parse_time(beat.get("observed_at")), beat.get("interval_seconds")
    age = (now - beat_at).total_seconds() if beat_at else None
    return {
        "id": doc_id,
        "name": _text(inst.get("name")),
        "zone": _text(inst.get("zone")),
        "project": _text(inst.get("project_id")),
        "instance_id": _text(inst.get("id")),
        "state": status,
        "maintenance": current,
        "preempted": preempted,
        "deadline": _deadline(active) if active else None,
        "window": window,
        "last_event": {"kind": _text(last.get("kind")), "observed_at": _text(last["observed_at"])}
        if last
        else None,
        "heartbeat": {
            "observed_at": _iso(beat_at),
            "age_seconds": None if age is None else round(age),
            "interval_seconds": interval,
            "silent": bool(age is not None and interval and age > SILENT_INTERVALS * interval),
        },
        "expired": {
            "at": _iso(parse_time(expired.get("at"))),
            "reason": _text(expired.get("reason")),
        }
        if isinstance(expired, dict)
        else None,
        # Only the cloud's events ever named it (ledger has_bridge false): no bridge publishes.
        "no_bridge": doc.get("has_bridge") is False,
        "seen_by": _seen_by(status, doc.get("disruptions")),
        "recent": _recent(doc.get("disruptions"), now),
        "autopilot": _autopilot(doc.get("autopilot")),
        "unverified": _unverified(
            {
                "maintenance": maintenance,
                "preemption": preemption,
                "upcoming": upcoming,
                "cloud": state.get("cloud") or {},
                "heartbeat": beat,
            }
        ),
    }


def _values(args: Any, name: str) -> set[str]:
    return {v for raw in args.getlist(name) for v in raw.split(",") if v}


def _page_number(args: Any, name: str, default: int, limit: int) -> int:
    try:
        return min(max(1, int(args.get(name, default))), limit)
    except ValueError:
        return default


def fleet(
    documents: Iterable[tuple[str, dict[str, Any]]],
    args: Any,
    now: datetime,
    read_at: datetime | None = None,
) -> dict[str, Any]:
    """Everything the page and the API show: counts over the fleet, the filtered page of rows,
    and the hourly number of windows on the 7-day strip."""
    rows = [summarize(doc_id, doc, now) for doc_id, doc in documents]
    zones, states = _values(args, "zone"), _values(args, "state")
    chosen = [
        r
        for r in rows
        if (not zones or r["zone"] in zones) and (not states or r["state"] in states)
    ]
    rank = {s: i for i, s in enumerate(STATES)}
    chosen.sort(
        key=lambda r: (
            rank[r["state"]],
            (r["deadline"] or {}).get("at") or (r["window"] or {}).get("start") or "~",
            r["name"],
            r["id"],
        )
    )
    per_page = _page_number(args, "per_page", PER_PAGE, MAX_PER_PAGE)
    pages = max(1, math.ceil(len(chosen) / per_page))
    page = _page_number(args, "page", 1, pages)
    hours = [0] * STRIP_HOURS
    hour = timedelta(hours=1)
    for r in chosen:
        w = r["window"]
        if w and w["strip"]:  # on the strip, so both times parse
            first = max(0, math.floor((parse_time(w["start"]) - now) / hour))
            last = math.ceil((parse_time(w["end"]) - now) / hour)
            for h in range(first, min(STRIP_HOURS, max(first + 1, last))):
                hours[h] += 1
    return {
        "generated_at": _iso(now),
        "read_at": _iso(read_at or now),
        "filters": {"zone": sorted(zones), "state": sorted(states)},
        "fleet": len(rows),
        "matching": len(chosen),
        "page": page,
        "pages": pages,
        "per_page": per_page,
        "counts": {
            "state": {s: n for s, n in Counter(r["state"] for r in rows).most_common()},
            "zone": dict(sorted(Counter(r["zone"] for r in rows).items())),
            "silent": sum(r["heartbeat"]["silent"] for r in rows),
            "no_bridge": sum(r["no_bridge"] for r in rows),
            "unverified": sum(bool(r["unverified"]) for r in rows),
            "host_errors_7d": sum(d["cause"] == "host_error" for r in rows for d in r["recent"]),
            "preemptions_7d": sum(d["cause"] == "preemption" for r in rows for d in r["recent"]),
        },
        "recent_disruptions": sorted(
            (
                {"name": r["name"], "zone": r["zone"], "no_bridge": r["no_bridge"], **d}
                for r in rows
                for d in r["recent"]
            ),
            key=lambda d: d["at"],
            reverse=True,
        )[:RECENT_LIMIT],
        "windows_by_hour": hours,
        "instances": chosen[(page - 1) * per_page : page * per_page],
    }


# --- the page ---------------------------------------------------------------------------------


def e(value: Any) -> str:
    """Escaped for text and for quoted attributes alike."""
    return html.escape(_text(value), quote=True)


def cut(value: str) -> str:
    """Escaped, at most NAME_LIMIT characters shown; the whole value in the tooltip."""
    if len(value) <= NAME_LIMIT:
        return e(value)
    return f'<span title="{e(value)}">{e(value[:NAME_LIMIT])}…</span>'


def duration(seconds: float) -> str:
    """`4 min 10 s`, `2 h 5 min`, `3 d 4 h`: the same words board.js writes."""
    s = int(abs(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def countdown(deadline: dict[str, Any] | None, now: datetime) -> str:
    if not deadline:
        return ""
    left = ((parse_time(deadline["at"]) or now) - now).total_seconds()
    text = f"in {duration(left)}" if left >= 0 else f"{duration(left)} ago"
    latest = ' <span class="latest">at the latest</span>' if deadline["at_the_latest"] else ""
    return (
        f'<time class="countdown" datetime="{e(deadline["at"])}"'
        f' data-deadline="{e(deadline["at"])}">{text}</time>{latest}'
    )


def strip_svg(window: dict[str, Any] | None) -> str:
    """The row's 7-day strip: day ticks and the window's bar."""
    ticks = "".join(f'<line x1="{d * 24}" y1="0" x2="{d * 24}" y2="10"/>' for d in range(1, 7))
    bar = ""
    if window and window["strip"]:
        x0, x1 = window["strip"]
        bar = (
            f'<rect class="win {e(window["status"].lower())}" x="{x0 * 168:.2f}" y="1" '
            f'width="{(x1 - x0) * 168:.2f}" height="8"><title>{e(window["start"])} .. '
            f"{e(window['end'])}</title></rect>"
        )
    return f'<svg class="mini" viewBox="0 0 168 10" width="168" height="10">{ticks}{bar}</svg>'


def row(r: dict[str, Any], now: datetime) -> str:
    window, beat, last = r["window"], r["heartbeat"], r["last_event"]
    window_text = (
        f"{e(window['start'])} .. {e(window['end'])} {e(window['status'])}" if window else ""
    )
    beat_text = "" if beat["age_seconds"] is None else f"{duration(beat['age_seconds'])} ago"
    silent = ' <span class="flag">silent</span>' if beat["silent"] else ""
    state = e(r["state"]) + (
        f" <small>{e(r['maintenance'])}</small>" if r["state"] == "maintenance" else ""
    )
    if r["expired"]:
        state += f' <small title="{e(r["expired"]["reason"])}">(notice expired)</small>'
    if r["seen_by"]:
        state += f"<br><small>seen by {e(' + '.join(r['seen_by']))}</small>"
    for mark in r["unverified"]:
        state += (
            f'<br><span class="flag unverified" title="{e(mark["reason"])}">'
            f"unverified origin: {e(mark['entry'])}</span>"
        )
    no_bridge = ' <span class="flag">no bridge</span>' if r["no_bridge"] else ""
    pilot = r.get("autopilot")
    if pilot and pilot["state"] in ("starting", "started"):
        window_text += f"<br>started by the autopilot {e(pilot['started_at'])}"
    elif pilot and pilot["next_slot"]:
        window_text += (
            f"<br>autopilot: next slot {e(pilot['next_slot'])}, deadline {e(pilot['deadline'])}"
        )
    return (
        f'<tr class="s-{e(r["state"])}">'
        f"<td>{cut(r['name'])}<br><small>{cut(r['project'])}</small></td>"
        f"<td>{cut(r['zone'])}</td><td>{state}</td><td>{countdown(r['deadline'], now)}</td>"
        f"<td>{'yes' if r['preempted'] else ''}</td>"
        f"<td>{strip_svg(window)}<br><small>{window_text}</small></td>"
        f"<td>{e(last['kind']) if last else ''}<br>"
        f"<small>{e(last['observed_at']) if last else ''}</small></td>"
        f"<td>{beat_text}{silent}{no_bridge}</td></tr>"
    )


def recent_row(d: dict[str, Any]) -> str:
    flag = ' <span class="flag">no bridge</span>' if d["no_bridge"] else ""
    return (
        f"<tr><td>{e(d['at'])}</td><td>{cut(d['name'])}{flag}</td><td>{cut(d['zone'])}</td>"
        f"<td>{e(d['cause'])}</td><td>{e(' + '.join(d['seen_by']))}</td>"
        f"<td>{cut(d['error'])}</td></tr>"
    )


def link(args: dict[str, Any], label: str) -> str:
    return f'<a href="./?{e(urlencode(args, doseq=True))}">{label}</a>'


def fleet_strip(hours: list[int]) -> str:
    """Windows per hour over the next 7 days (of the filtered rows), one bar per hour."""
    top = max(hours) or 1
    bars = "".join(
        f'<rect x="{h * 4}" y="{48 - 34 * n / top:.2f}" width="3.5" height="{34 * n / top:.2f}"/>'
        for h, n in enumerate(hours)
        if n
    )
    days = "".join(
        f'<line x1="{d * 96}" y1="0" x2="{d * 96}" y2="48"/>'
        f'<text x="{d * 96 + 3}" y="11">+{d} d</text>'
        for d in range(1, 7)
    )
    return (
        f'<svg id="fleet-strip" viewBox="0 0 {STRIP_HOURS * 4} 48"'
        f' role="img" aria-label="scheduled windows per hour, next 7 days">'
        f'<g class="days">{days}</g><g id="fleet-bars">{bars}</g></svg>'
        f"<p><small>peak: {top if any(hours) else 0} VMs in a window in the same hour</small></p>"
    )


def render_page(view: dict[str, Any], now: datetime) -> str:
    filters = view["filters"]
    counts = view["counts"]

    def chips(kind: str) -> str:
        return " ".join(
            f'<span class="chip" data-count="{e(kind)}:{e(name)}">'
            f"{link({kind: name}, cut(name) or '(none)')} <b>{n}</b></span>"
            for name, n in counts[kind].items()
        )

    def options(kind: str, names: Iterable[str]) -> str:
        return "".join(
            f'<option value="{e(n)}"{" selected" if n in filters[kind] else ""}>{e(n)}</option>'
            for n in names
        )

    query = {**filters, "per_page": view["per_page"]}
    pager = []
    if view["page"] > 1:
        pager.append(link({**query, "page": view["page"] - 1}, "&larr; previous"))
    pager.append(f"page {view['page']} of {view['pages']}")
    if view["page"] < view["pages"]:
        pager.append(link({**query, "page": view["page"] + 1}, "next &rarr;"))
    rows = "".join(row(r, now) for r in view["instances"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<noscript><meta http-equiv="refresh" content="{REFRESH_SECONDS}"></noscript>
<title>Fleet maintenance board</title>
<link rel="stylesheet" href="./board.css"><script src="./board.js" defer></script>
</head><body>
<header><h1>Fleet maintenance board</h1>
<p>{view["fleet"]} instances, <b id="silent">{counts["silent"]}</b> silent bridges,
<b id="no-bridge">{counts["no_bridge"]}</b> with no bridge,
<b id="unverified">{counts["unverified"]}</b> with events of unverified origin;
ledger read at <time id="read-at">{e(view["read_at"])}</time>.</p>
<p>By state: {chips("state")}</p><p>By zone: {chips("zone")}</p>
<form method="get" action="./">
<label>zone <select name="zone" multiple size="3">{options("zone", counts["zone"])}</select></label>
<label>state <select name="state" multiple size="3">{options("state", STATES)}</select></label>
<button type="submit">filter</button> {link({}, "clear")}
</form></header>
<section><h2>Scheduled windows, next 7 days</h2>{fleet_strip(view["windows_by_hour"])}</section>
<section><h2>Host errors and preemptions, last 7 days:
<span id="host-errors">{counts["host_errors_7d"]}</span> host errors,
<span id="preemptions">{counts["preemptions_7d"]}</span> preemptions</h2>
<table><thead><tr><th>at</th><th>instance</th><th>zone</th><th>what</th><th>seen by</th>
<th>the cloud's message</th></tr></thead>
<tbody id="recent">{"".join(recent_row(d) for d in view["recent_disruptions"])}</tbody></table>
</section>
<section><h2><span id="matching">{view["matching"]}</span> matching</h2>
<p class="pager">{" &middot; ".join(pager)}</p>
<table><thead><tr><th>instance</th><th>zone</th><th>state</th><th>deadline</th><th>preempted</th>
<th>next window (7 days)</th><th>last event</th><th>heartbeat</th></tr></thead>
<tbody id="rows">{rows}</tbody></table></section>
</body></html>
"""


# --- the browser side --------------------------------------------------------------------------

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1rem;color:#1b1b1b}
table{border-collapse:collapse;width:100%}td,th{border-bottom:1px solid #ddd;padding:.3rem;
text-align:left;vertical-align:top;overflow-wrap:anywhere;max-width:22rem}
small{color:#555}.chip{display:inline-block;margin:0 .5rem .3rem 0}
tr.s-maintenance{background:#fde7e7}tr.s-preempted{background:#fff0d6}
tr.s-expired{background:#eee;color:#666}tr.s-scheduled{background:#eef5ff}
.latest,.flag{font-weight:bold;color:#a40000}
svg.mini{background:#eee}svg.mini line,#fleet-strip line{stroke:#bbb;stroke-width:1}
svg.mini rect.win{fill:#3465a4}svg.mini rect.ongoing{fill:#c00}
#fleet-strip{width:100%;max-height:6rem;background:#f7f7f7}#fleet-bars rect{fill:#3465a4}
#fleet-strip text{font-size:10px;fill:#777}header p{margin:.3rem 0}form{margin:.5rem 0}
h2{font-size:1.1rem;margin:.8rem 0 .3rem}
"""

SCRIPT = """\
"use strict";
// Refreshes the rows from ./api/instances every 15 s and ticks the countdowns every second.
// Every value goes in through textContent or setAttribute: nothing from the data is parsed as HTML.
(() => {
  const REFRESH_MS = @REFRESH_MS@;
  const SVG = "http://www.w3.org/2000/svg";
  const el = (tag, text, cls) => {
    const node = document.createElement(tag);
    if (text) node.textContent = text;
    if (cls) node.className = cls;
    return node;
  };
  const duration = (seconds) => {
    const s = Math.floor(Math.abs(seconds));
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
    return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
  };
  const tick = () => {
    for (const t of document.querySelectorAll("time[data-deadline]")) {
      const left = (Date.parse(t.dataset.deadline) - Date.now()) / 1000;
      t.textContent = left >= 0 ? `in ${duration(left)}` : `${duration(left)} ago`;
    }
  };
  const cell = (tr, main, sub) => {
    const td = el("td", main);
    if (sub !== undefined) { td.append(el("br"), el("small", sub)); }
    tr.append(td);
    return td;
  };
  const strip = (w) => {
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("class", "mini");
    svg.setAttribute("viewBox", "0 0 168 10");
    svg.setAttribute("width", "168");
    svg.setAttribute("height", "10");
    for (let d = 1; d < 7; d++) {
      const line = document.createElementNS(SVG, "line");
      const ends = [["x1", d * 24], ["y1", 0], ["x2", d * 24], ["y2", 10]];
      for (const [k, v] of ends) line.setAttribute(k, v);
      svg.append(line);
    }
    if (w && w.strip) {
      const rect = document.createElementNS(SVG, "rect");
      rect.setAttribute("class", `win ${w.status.toLowerCase()}`);
      rect.setAttribute("x", (w.strip[0] * 168).toFixed(2));
      rect.setAttribute("y", "1");
      rect.setAttribute("width", ((w.strip[1] - w.strip[0]) * 168).toFixed(2));
      rect.setAttribute("height", "8");
      svg.append(rect);
    }
    return svg;
  };
  const row = (r) => {
    const tr = el("tr", "", `s-${r.state}`);
    cell(tr, r.name, r.project);
    cell(tr, r.zone);
    const state = cell(tr, r.state);
    if (r.state === "maintenance") state.append(" ", el("small", r.maintenance));
    if (r.expired) state.append(" ", el("small", "(notice expired)"));
    if (r.seen_by.length) state.append(el("br"), el("small", `seen by ${r.seen_by.join(" + ")}`));
    for (const mark of r.unverified) {
      const flag = el("span", `unverified origin: ${mark.entry}`, "flag unverified");
      flag.title = mark.reason;
      state.append(el("br"), flag);
    }
    const deadline = cell(tr, "");
    if (r.deadline) {
      const t = el("time", "", "countdown");
      t.dateTime = r.deadline.at;
      t.dataset.deadline = r.deadline.at;
      deadline.append(t);
      if (r.deadline.at_the_latest) deadline.append(" ", el("span", "at the latest", "latest"));
    }
    cell(tr, r.preempted ? "yes" : "");
    const w = r.window;
    const win = cell(tr, "", w ? `${w.start} .. ${w.end} ${w.status}` : "");
    win.prepend(strip(w));
    cell(tr, r.last_event ? r.last_event.kind : "", r.last_event ? r.last_event.observed_at : "");
    const age = r.heartbeat.age_seconds;
    const beat = cell(tr, age === null ? "" : `${duration(age)} ago`);
    if (r.heartbeat.silent) beat.append(" ", el("span", "silent", "flag"));
    if (r.no_bridge) beat.append(" ", el("span", "no bridge", "flag"));
    return tr;
  };
  const recent = (d) => {
    const tr = el("tr");
    cell(tr, d.at);
    const name = cell(tr, d.name);
    if (d.no_bridge) name.append(" ", el("span", "no bridge", "flag"));
    for (const text of [d.zone, d.cause, d.seen_by.join(" + "), d.error]) cell(tr, text);
    return tr;
  };
  const refresh = async () => {
    try {
      const response = await fetch(`./api/instances${location.search}`, { cache: "no-store" });
      if (!response.ok) return;
      const view = await response.json();
      document.getElementById("rows").replaceChildren(...view.instances.map(row));
      document.getElementById("matching").textContent = view.matching;
      document.getElementById("silent").textContent = view.counts.silent;
      document.getElementById("recent").replaceChildren(...view.recent_disruptions.map(recent));
      for (const [id, key] of [["no-bridge", "no_bridge"], ["unverified", "unverified"],
        ["host-errors", "host_errors_7d"], ["preemptions", "preemptions_7d"]]) {
        document.getElementById(id).textContent = view.counts[key];
      }
      document.getElementById("read-at").textContent = view.read_at;
      for (const chip of document.querySelectorAll("[data-count]")) {
        const [kind, name] = chip.dataset.count.split(/:(.*)/s);
        chip.querySelector("b").textContent = view.counts[kind][name] || 0;
      }
      const top = Math.max(1, ...view.windows_by_hour);
      const bars = view.windows_by_hour.flatMap((n, h) => {
        if (!n) return [];
        const rect = document.createElementNS(SVG, "rect");
        const height = (34 * n) / top;
        const box = [["x", h * 4], ["y", 48 - height], ["width", 3.5], ["height", height]];
        for (const [k, v] of box) rect.setAttribute(k, v);
        return [rect];
      });
      document.getElementById("fleet-bars").replaceChildren(...bars);
      tick();
    } catch (error) {
      console.warn("board refresh failed", error);
    }
  };
  tick();
  setInterval(tick, 1000);
  setInterval(refresh, REFRESH_MS);
})();
""".replace("@REFRESH_MS@", str(REFRESH_SECONDS * 1000))


# --- the function ------------------------------------------------------------------------------


def respond(body: str, status: int, content_type: str) -> flask.Response:
    return flask.Response(body, status=status, headers={**HEADERS, "Content-Type": content_type})


@functions_framework.http
def board(request: flask.Request) -> flask.Response:
    """Route GET requests; anything else is 405, an unknown path 404."""
    if request.method not in ("GET", "HEAD"):
        return respond("method not allowed\n", 405, "text/plain; charset=utf-8")
    path = request.path.rstrip("/") or "/"
    if path == "/board.js":
        return respond(SCRIPT, 200, "text/javascript; charset=utf-8")
    if path == "/board.css":
        return respond(STYLE, 200, "text/css; charset=utf-8")
    if path not in ("/", "/api/instances"):
        return respond("not found\n", 404, "text/plain; charset=utf-8")
    now = datetime.now(timezone.utc)
    read_at, documents = ledger_documents()
    view = fleet(documents, request.args, now, read_at)
    if path == "/api/instances":
        return respond(json.dumps(view), 200, "application/json")
    return respond(render_page(view, now), 200, "text/html; charset=utf-8")
