"""The `maintenance-bridge` command: run, simulate, demo, status, redrive, listen.

Bad configuration is one line on stderr and exit code 2, before anything starts.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from bridge import __version__
from bridge.config import ConfigError, add_run_options, build, default_state_dir


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit 2) like every other config error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"maintenance-bridge: error: {message}\n")


def _number(
    parse: type[int] | type[float], low: float, above: bool = False
) -> Callable[[str], int | float]:
    """An argparse type: a finite number >= low (> low with `above`), one-line error otherwise."""

    def check(text: str) -> int | float:
        value = parse(text)  # a ValueError becomes argparse's one-line "invalid value"
        if not math.isfinite(value) or value < low or (above and value == low):
            sign = ">" if above else ">="
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number {sign} {low:g}")
        return value

    return check


def parser() -> argparse.ArgumentParser:
    top = _Parser(prog="maintenance-bridge", description=__doc__.splitlines()[0])
    top.add_argument("--version", action="version", version=f"maintenance-bridge {__version__}")
    sub = top.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="watch the metadata server and publish events")
    add_run_options(run)

    sim = sub.add_parser("simulate", help="a local metadata server with a control API")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=_number(int, 0), default=8089)
    sim.add_argument("--scenario", help="migrate|terminate|preempt|upcoming or a JSON file")
    sim.add_argument(
        "--speed", type=_number(float, 0, above=True), default=1.0, help="divide the times"
    )
    sim.add_argument("--loop", action="store_true", help="replay the scenario forever")
    sim.add_argument(
        "--plain-alt-json",
        choices=("string", "raw"),
        default="string",
        help='a plain value under alt=json: a JSON string ("NONE") or raw text (NONE)',
    )
    sim.add_argument(
        "--scheduling",
        choices=("json", "booleans", "path_keys", "text", "404", "broken"),  # SCHEDULING_MODES
        default="json",
        help="what instance/scheduling/?recursive=true answers",
    )

    demo = sub.add_parser("demo", help="simulator + bridge + scenario, events printed")
    demo.add_argument("--json", action="store_true", help="print the CloudEvents as JSON lines")
    demo.add_argument(
        "--speed", type=_number(float, 0, above=True), default=1.0, help="scenario speed-up"
    )

    status = sub.add_parser("status", help="what the state dir says about a bridge")
    status.add_argument("--state-dir", default=None, help="[BRIDGE_STATE_DIR]")
    status.add_argument("--json", action="store_true")

    redrive = sub.add_parser("redrive", help="send parked events again, under their own ids")
    redrive.add_argument("--state-dir", default=None, help="[BRIDGE_STATE_DIR]")
    redrive.add_argument(
        "--id", action="append", dest="ids", help="this parked event only (repeatable)"
    )

    listen = sub.add_parser("listen", help="print the events on a topic or a subscription")
    source = listen.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--topic", help="projects/P/topics/T: read through a temporary subscription of its own"
    )
    source.add_argument(
        "--subscription", help="projects/P/subscriptions/S: read, and give back unless --ack"
    )
    listen.add_argument(
        "--ack", action="store_true", help="acknowledge what --subscription delivers (takes it)"
    )
    listen.add_argument(
        "--count", type=_number(int, 0), default=0, help="exit after N messages (0: never)"
    )
    listen.add_argument(
        "--timeout", type=_number(float, 0), default=0.0, help="exit after N s (0: never)"
    )
    listen.add_argument("--json", action="store_true")
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    environ = dict(os.environ)
    try:
        if args.command == "run":
            return _run(args, environ)
        if args.command == "simulate":
            from bridge.simulator import open_simulator, serve

            try:
                sim, steps = open_simulator(
                    args.host,
                    args.port,
                    args.scenario,
                    args.loop,
                    plain_alt_json=args.plain_alt_json,
                    scheduling=args.scheduling,
                )
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            return serve(sim, steps, args.speed, args.loop)
        if args.command == "demo":
            from bridge.demo import demo

            return demo(speed=args.speed, as_json=args.json, environ=environ)
        if args.command in ("status", "redrive"):
            state_dir = Path(
                args.state_dir or environ.get("BRIDGE_STATE_DIR") or default_state_dir(environ)
            )
            if args.command == "redrive":
                from bridge.redrive import redrive

                return redrive(state_dir, args.ids)
            from bridge.status import status

            return status(state_dir, as_json=args.json)
        from bridge.listen import listen

        if args.ack and not args.subscription:
            raise ConfigError("--ack: only with --subscription (a --topic read takes nothing)")
        return listen(
            topic=args.topic,
            subscription=args.subscription,
            ack=args.ack,
            count=args.count,
            timeout=args.timeout,
            as_json=args.json,
        )
    except ConfigError as exc:
        print(f"maintenance-bridge: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, environ: dict[str, str]) -> int:
    from bridge.daemon import run
    from bridge.logs import configure
    from bridge.signals import install_signal_handlers

    config = build(args, environ)
    configure(config.log_format, config.log_level)
    stop = threading.Event()
    install_signal_handlers(stop)
    return run(config, stop, environ=environ)
