"""Run the reliability suite at full size and write its figures into docs/reliability.md.

    .venv/bin/python bench/reliability_figures.py            # 100 crash rounds, 10,000 soak
    .venv/bin/python bench/reliability_figures.py --rounds 300 --soak 20000
    .venv/bin/python bench/reliability_figures.py --render-only DIR   # re-render saved figures

Every test of tests/test_faults.py, test_crash.py, test_soak.py and test_security.py writes what
it measured as JSON into BRIDGE_FIGURES_DIR; this script sets that directory, runs them, keeps
the JSON next to the docs (docs/reliability-figures/) and replaces each
`<!-- figures:NAME -->...<!-- /figures -->` block of docs/reliability.md with tables built from
those files. Nothing in the blocks is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"
KEPT = ROOT / "docs" / "reliability-figures"
FILES = [
    "tests/test_faults.py",
    "tests/test_crash.py",
    "tests/test_soak.py",
    "tests/test_security.py",
]
BLOCK = re.compile(r"(<!-- figures:(\w+) -->\n).*?(<!-- /figures -->)", re.S)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100, help="kill -9 rounds")
    parser.add_argument("--soak", type=int, default=10000, help="soak transitions per sink")
    parser.add_argument("--render-only", type=Path, help="render figures saved in this dir")
    args = parser.parse_args()
    if args.render_only:
        render(load(args.render_only))
        return 0
    out = Path(tempfile.mkdtemp(prefix="reliability-figures-"))
    env = {
        **os.environ,
        "BRIDGE_FIGURES_DIR": str(out),
        "BRIDGE_CRASH_ROUNDS": str(args.rounds),
        "BRIDGE_SOAK_TRANSITIONS": str(args.soak),
    }
    command = [sys.executable, "-m", "pytest", *FILES, "-q", "-p", "no:cacheprovider"]
    started = time.monotonic()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - started
    summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1].strip("= ")
    print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n")
    run = {
        "test": "run",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": (
            f"BRIDGE_CRASH_ROUNDS={args.rounds} BRIDGE_SOAK_TRANSITIONS={args.soak} "
            ".venv/bin/pytest " + " ".join(FILES)
        ),
        "result": summary,
        "exit_code": proc.returncode,
        "seconds": round(seconds),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, {pubsub_kind()}",
    }
    (out / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    if KEPT.exists():
        shutil.rmtree(KEPT)
    shutil.copytree(out, KEPT)
    render(load(KEPT))
    print(f"figures: {KEPT}; {DOC} updated")
    return proc.returncode


def pubsub_kind() -> str:
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from support.pubsub import emulator_unavailable_reason, emulator_version

        reason = emulator_unavailable_reason()
        return f"Pub/Sub emulator {emulator_version()}" if reason is None else f"fake ({reason})"
    finally:
        sys.path.pop(0)


def load(directory: Path) -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))}


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def mib(value: float) -> str:
    return f"{value:.1f} MiB"


def block_run(f: dict[str, dict[str, Any]]) -> str:
    run = f.get("run")
    if not run:
        return "_No full run recorded yet: run `bench/reliability_figures.py`._\n"
    return (
        f"Last full run: **{run['date']}**, `{run['command']}`: **{run['result']}** "
        f"({run['seconds']} s on {run['machine']}).\n"
    )


def block_metadata(f: dict[str, dict[str, Any]]) -> str:
    rows = []
    for name, fig in f.items():
        if name.startswith("metadata_") and "log_lines_for_the_burst" in fig:
            rows.append(
                [
                    name.removeprefix("metadata_"),
                    fig["faults_injected"],
                    ", ".join(sorted(fig["failure_classes_logged"])),
                    fig["log_lines_for_the_burst"],
                    f"{fig['events_published']} / {fig['transitions_made']}",
                    fig["events_lost"],
                    fig["redirect_target_requests"],
                ]
            )
    out = table(
        [
            "burst",
            "faults injected",
            "classes logged",
            "warning lines",
            "events / transitions",
            "lost",
            "redirect target requests",
        ],
        rows,
    )
    if etag := f.get("metadata_no_etag"):
        out += (
            f"\nNo ETag: {etag['faults_injected']} answers without one, "
            f"{etag['log_lines']} warning line.\n"
        )
    if rnd := f.get("metadata_random"):
        out += (
            "\nRandom faults on all three keys while they change: "
            f"{rnd['faults_injected']} faults, "
            f"{rnd['transitions_made']} transitions made, {rnd['events_published']} published, "
            f"**{rnd['events_lost']} lost**.\n"
        )
    return out


def _each(f: dict[str, dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """The figures of test `name`, one per parametrisation (`name_rest`, `name_grpc`)."""
    return [fig for key, fig in sorted(f.items()) if key == name or key.startswith(name + "_")]


def block_pubsub(f: dict[str, dict[str, Any]]) -> str:
    rows = []
    for fig in _each(f, "pubsub_restart"):
        rows.append(
            [
                "emulator SIGKILLed, restarted",
                fig["pubsub"],
                f"{fig['events_during_outage']} events waited, {fig['failed_attempts']:.0f} "
                f"failed attempts, {fig['error_lines']} error line",
                fig["events_lost"],
            ]
        )
    for fig in _each(f, "pubsub_no_topic"):
        rows.append(
            [
                "topic does not exist",
                fig["pubsub"],
                f"{fig['failed_attempts']:.0f} failed attempts, {fig['error_lines']} error line",
                fig["events_lost"],
            ]
        )
    for fig in _each(f, "pubsub_permission"):
        rows.append(
            [
                "permission denied",
                fig["pubsub"],
                f"{fig['denied_attempts']} denied attempts, {fig['error_lines']} error line",
                fig["events_lost"],
            ]
        )
    for fig in _each(f, "pubsub_paused"):
        rows.append(
            [
                "paused ordering key",
                fig["pubsub"],
                f"{fig['paused_attempts']:.0f} paused attempt(s), resumed, "
                f"{fig['error_lines']} error line",
                fig["events_lost"],
            ]
        )
    return table(["fault", "against", "what happened", "events lost"], rows)


def block_disk(f: dict[str, dict[str, Any]]) -> str:
    how = {
        "disk_full_tmpfs": "state dir on a 1 MiB tmpfs, filled to ENOSPC",
        "disk_read_only_query_only": "SQLite query_only on the bridge's own connection",
    }
    rows = [
        [
            how.get(name, name),
            fig["events_while_broken"],
            f"{fig['events_published']}",
            fig["events_lost"],
            fig["critical_lines"],
            fig["ack_error_lines"],
        ]
        for name, fig in f.items()
        if name.startswith("disk_") and "events_while_broken" in fig
    ]
    broken = table(
        [
            "failure",
            "events while broken",
            "published",
            "lost",
            "CRITICAL lines",
            "other error lines",
        ],
        rows,
    )
    freed = f.get("disk_full_then_freed")
    if freed is None:
        return broken
    test = "test_disk_full_then_freed_heals_without_a_transition_and_repeats_nothing"
    return (
        f"{broken}\nA full disk then freed (tests/test_faults.py::{test}): /healthz green "
        f"{freed['seconds_to_green']:.2f} s after space was freed, with no new transition; "
        "after a restart nothing went out a second time.\n"
    )


def block_outbox(f: dict[str, dict[str, Any]]) -> str:
    rows = [
        [
            ", ".join(f"{k}={v}" for k, v in fig["limit"].items()),
            fig["events_recorded"],
            fig["dropped"],
            fig["maintenance_or_preemption_published"],
            fig["maintenance_or_preemption_dropped"],
        ]
        for name, fig in f.items()
        if name.startswith("outbox_")
    ]
    return table(
        [
            "bound",
            "events recorded",
            "dropped (upcoming, heartbeat)",
            "maintenance/preemption published",
            "maintenance/preemption dropped",
        ],
        rows,
    )


def block_crash(f: dict[str, dict[str, Any]]) -> str:
    fig = f.get("crash")
    if not fig:
        return "_not run_\n"
    rows = [
        ["rounds (kill -9)", fig["rounds"]],
        [
            "... during start-up / while events flowed",
            f"{fig['kills_during_startup']} / {fig['kills_while_watching']}",
        ],
        [
            "rounds whose restart resumed a non-empty outbox",
            fig["rounds_that_resumed_a_non_empty_outbox"],
        ],
        ["metadata changes made", fig["metadata_changes_made"]],
        ["transitions recorded", fig["transitions_recorded"]],
        ["distinct event ids published", fig["events_published_distinct_ids"]],
        [
            "lines published in all (same id again: at least once)",
            f"{fig['lines_published_total']} ({fig['same_id_published_again']} again)",
        ],
        ["**events lost**", f"**{fig['events_lost']}**"],
        ["**transitions published under two ids**", f"**{fig['transitions_under_two_ids']}**"],
        ["seed", fig["seed"]],
        ["duration", f"{fig['seconds']} s"],
    ]
    return table(["", "last run"], rows)


def block_soak(f: dict[str, dict[str, Any]]) -> str:
    rows = [
        [
            fig["sink"],
            fig["transitions"],
            f"{fig['seconds']} s ({fig['transitions_per_second']}/s)",
            mib(fig["rss_start_mib"]),
            mib(fig["rss_after_warmup_mib"]),
            mib(fig["rss_end_mib"]),
            fig["events_lost"],
            fig["transitions_under_two_ids"],
        ]
        for name, fig in f.items()
        if name.startswith("soak_")
    ]
    return table(
        [
            "sink",
            "transitions",
            "time",
            "RSS start",
            "RSS after 10 %",
            "RSS end",
            "lost",
            "under two ids",
        ],
        rows,
    )


def block_security(f: dict[str, dict[str, Any]]) -> str:
    fig = f.get("security_logs")
    if not fig:
        return "_not run_\n"
    return (
        f"{fig['runs']} runs, {fig['log_lines_scanned']} log lines scanned for "
        f"{fig['forbidden_strings_checked']} forbidden strings: "
        f"**{fig['forbidden_strings_found']} found**.\n"
    )


RENDER = {
    "run": block_run,
    "metadata": block_metadata,
    "pubsub": block_pubsub,
    "disk": block_disk,
    "outbox": block_outbox,
    "crash": block_crash,
    "soak": block_soak,
    "security": block_security,
}


def render(figures: dict[str, dict[str, Any]]) -> None:
    text = DOC.read_text()

    def replace(m: re.Match[str]) -> str:
        return m.group(1) + RENDER[m.group(2)](figures) + m.group(3)

    DOC.write_text(BLOCK.sub(replace, text))


if __name__ == "__main__":
    sys.exit(main())
