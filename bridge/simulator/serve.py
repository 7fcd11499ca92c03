"""`maintenance-bridge simulate`: a simulator in the foreground, a scenario, signals."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Sequence

from bridge.signals import on_stop_signals
from bridge.simulator.scenarios import Step, load_scenario
from bridge.simulator.state import Simulator


def _on_signals(done: threading.Event) -> Callable[[], None]:
    """Make the stop signals set ``done``; returns the undo."""
    return on_stop_signals(lambda *_: done.set())


def open_simulator(
    host: str,
    port: int,
    scenario: str | None,
    loop: bool,
    *,
    plain_alt_json: str = "string",
    scheduling: str = "json",
) -> tuple[Simulator, list[Step]]:
    """The bound simulator and its scenario, for ``serve``; ValueError names what is wrong."""
    try:
        steps = load_scenario(scenario) if scenario else []
    except OSError as exc:
        raise ValueError(f"--scenario {scenario}: cannot read it ({exc.strerror or exc})") from None
    except ValueError as exc:  # invalid JSON (JSONDecodeError, UnicodeDecodeError) or steps
        raise ValueError(f"--scenario {scenario}: {exc}") from None
    if loop and steps and not any(step.at > 0 for step in steps):
        raise ValueError("--loop needs a scenario that lasts longer than 0 s")
    try:
        sim = Simulator(host, port, plain_alt_json=plain_alt_json, scheduling=scheduling)
    except (OSError, OverflowError) as exc:  # port in use or out of range, unknown host
        reason = getattr(exc, "strerror", None) or exc
        raise ValueError(f"cannot listen on {host}:{port}: {reason}") from None
    return sim, steps


def serve(sim: Simulator, steps: Sequence[Step], speed: float, loop: bool) -> int:
    """Run ``sim`` in the foreground (``maintenance-bridge simulate``) until a signal."""
    sim.start()
    done = threading.Event()
    restore = _on_signals(done)
    print(f"simulator: listening on {sim.url}", file=sys.stderr, flush=True)

    def player() -> None:
        while True:
            sim.play(steps, speed, done)
            if not loop or done.is_set():
                return

    if steps:
        threading.Thread(target=player, name="simulator-scenario", daemon=True).start()
    try:
        # A timed wait: on Windows an untimed one cannot be interrupted by Ctrl+C.
        while not done.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        sim.stop()
        restore()
    return 0
