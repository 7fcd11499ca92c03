"""Stop signals, one way for every command: SIGTERM (systemd, `timeout`, kill), SIGINT (Ctrl+C)
and SIGBREAK (Windows). Main thread only: elsewhere nothing changes."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable
from typing import Any


def on_stop_signals(handler: Callable[[int, Any], None]) -> Callable[[], None]:
    """SIGTERM and SIGINT (and SIGBREAK on Windows) call `handler`: what systemd, `timeout`,
    kill and Ctrl+C send. Main thread only (elsewhere nothing changes); returns what puts the
    previous handlers back."""
    previous: dict[int, Any] = {}
    for name in ("SIGTERM", "SIGINT", "SIGBREAK"):
        sig = getattr(signal, name, None)
        if sig is not None:
            # ValueError/OSError: not the main thread, or not settable on this platform.
            with contextlib.suppress(ValueError, OSError):
                previous[sig] = signal.signal(sig, handler)

    def restore() -> None:
        for sig, old in previous.items():
            if old is not None:
                signal.signal(sig, old)

    return restore


def install_signal_handlers(stop: threading.Event) -> None:
    """The stop signals stop the bridge, for the rest of the process."""
    on_stop_signals(lambda *_: stop.set())
