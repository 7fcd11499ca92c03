"""Run `maintenance-bridge run` as a real subprocess and read its events as they come."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .harness import wait_for

REPO = Path(__file__).resolve().parents[2]


class BridgeProcess:
    """A bridge subprocess on the stdout sink (or any sink via args); logs go to a file."""

    def __init__(
        self,
        metadata_url: str,
        state_dir: Path,
        *args: str,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.log_path = log_path or state_dir.parent / f"{state_dir.name}.log"
        self.lines: queue.Queue[tuple[float, dict[str, Any]]] = queue.Queue()
        cmd = [
            sys.executable,
            "-m",
            "bridge",
            "run",
            "--metadata-url",
            metadata_url,
            "--state-dir",
            str(state_dir),
            "--absent-interval",
            "0.2",
            "--log-format",
            "json",
            *args,
        ]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
        full_env.update(env or {})
        full_env["PYTHONFAULTHANDLER"] = "1"  # SIGABRT writes every thread's stack to the log
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=self._log
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            arrived = time.monotonic()
            self.lines.put((arrived, json.loads(raw)))

    def next_event(self, timeout: float = 5.0) -> tuple[float, dict[str, Any]]:
        """(monotonic arrival time, structured CloudEvent); raises queue.Empty on timeout."""
        return self.lines.get(timeout=timeout)

    def events(self, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        return [self.next_event(max(0.01, deadline - time.monotonic()))[1] for _ in range(n)]

    def events_until_quiet(self, wait: float = 0.5) -> list[dict[str, Any]]:
        """Every event that arrives until none has for `wait` seconds."""
        got = []
        while True:
            try:
                got.append(self.lines.get(timeout=wait)[1])
            except queue.Empty:
                return got

    def no_more_events(self, wait: float = 0.5) -> bool:
        try:
            self.lines.get(timeout=wait)
        except queue.Empty:
            return True
        return False

    def kill(self) -> None:
        """kill -9: no chance to flush or clean up."""
        self.proc.send_signal(signal.SIGKILL)
        self.wait()

    def terminate(self, timeout: float = 10.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float = 10.0) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGABRT)  # where each thread is, into the log
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
            tail = self.log_path.read_text(errors="replace")[-6000:]
            raise AssertionError(
                f"the bridge did not exit within {timeout:g} s; its log ends with:\n{tail}"
            ) from None
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._reader.join(timeout=2)
            self._log.close()
        return code

    def logs(self) -> list[dict[str, Any]]:
        """The JSON log records written so far."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"severity": "RAW", "message": line})
        return out

    def wait_for_log(self, text: str, timeout: float = 10.0) -> dict[str, Any]:

        def found() -> dict[str, Any] | None:
            return next((r for r in self.logs() if text in r.get("message", "")), None)

        return wait_for(
            f"a log line containing {text!r}",
            found,
            timeout,
            0.05,
            detail=lambda: self.logs()[-10:],
        )
