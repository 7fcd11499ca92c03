"""Google's sample loop, verbatim, pointed at the simulator: the baseline to beat.

From "ライブ マイグレーションの通知を取得する" (Getting live migration notices,
../shared/reference/live-migration-notice.ja.txt). Changes, all marked `# bench:`: the
metadata URL comes from GCE_METADATA_HOST, the key may be given as argv[1], and the callback
flushes its line (stdout is a pipe here) so that the benchmark sees the detection at once.
Detection only: nothing is published or stored. Kept as Google wrote it, hence the lint waiver.
"""
# ruff: noqa: I001, UP035, UP045, SIM108

import os  # bench:
import sys  # bench:
import time
from typing import Callable, NoReturn, Optional

import requests


METADATA_URL = f"http://{os.environ['GCE_METADATA_HOST']}/computeMetadata/v1/"  # bench:
METADATA_HEADERS = {"Metadata-Flavor": "Google"}
KEY = sys.argv[1] if len(sys.argv) > 1 else "instance/maintenance-event"  # bench:


def wait_for_maintenance(callback: Callable[[Optional[str]], None]) -> NoReturn:
    """
    Start an infinite loop waiting for maintenance signal.

    Args:
        callback: Function to be called when a maintenance is scheduled.

    Returns:
        Never returns, unless there's an error.
    """
    url = METADATA_URL + KEY  # bench: was "instance/maintenance-event"
    last_maintenance_event = None
    last_etag = "0"

    while True:
        r = requests.get(
            url,
            params={"last_etag": last_etag, "wait_for_change": True},
            headers=METADATA_HEADERS,
        )

        # During maintenance the service can return a 503, so these should
        # be retried.
        if r.status_code == 503:
            time.sleep(1)
            continue
        r.raise_for_status()

        last_etag = r.headers["etag"]

        if r.text == "NONE":
            maintenance_event = None
        else:
            maintenance_event = r.text

        if maintenance_event != last_maintenance_event:
            last_maintenance_event = maintenance_event
            callback(maintenance_event)


def maintenance_callback(event: Optional[str]) -> None:
    """
    Example callback function to handle the maintenance event.

    Args:
        event: details about scheduled maintenance.
    """
    if event:
        print(f"Undergoing host maintenance: {event}", flush=True)  # bench: flush
    else:
        print("Finished host maintenance", flush=True)  # bench: flush


def main():
    wait_for_maintenance(maintenance_callback)


if __name__ == "__main__":
    main()
