"""A fixed-interval poller like the AWS Node Termination Handler's IMDS monitor (every 2 s).

No long poll: it GETs the key on a 2 s ticker over a keep-alive session, compares with the
last value and prints a line when it changed (detection only). Errors wait for the next tick.
Usage: poller.py [KEY] [INTERVAL_SECONDS]; the server comes from GCE_METADATA_HOST.
"""

from __future__ import annotations

import os
import sys
import time

import requests


def main() -> int:
    key = sys.argv[1] if len(sys.argv) > 1 else "instance/maintenance-event"
    interval = float(sys.argv[2]) if len(sys.argv) > 2 else 2.0
    url = f"http://{os.environ['GCE_METADATA_HOST']}/computeMetadata/v1/{key}"
    session = requests.Session()
    session.headers["Metadata-Flavor"] = "Google"
    last: str | None = None
    tick = time.monotonic()
    while True:
        try:
            r = session.get(url, timeout=2)
            if r.status_code == 200:
                if last is None:
                    print(f"first: {r.text}", flush=True)  # the benchmark's "ready"
                elif r.text != last:
                    print(f"changed: {r.text}", flush=True)
                last = r.text
        except requests.RequestException:
            pass
        tick += interval
        time.sleep(max(0.0, tick - time.monotonic()))


if __name__ == "__main__":
    raise SystemExit(main())
