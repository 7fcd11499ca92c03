"""Where the Google Cloud CLI's emulators are on this machine, found rather than assumed.

The SDK root differs between installs (Debian package, tarball, Homebrew), so it is asked of
`gcloud info`; PUBSUB_EMULATOR_BIN names the Pub/Sub emulator's launcher directly where there is
no gcloud. BRIDGE_TEST_EMULATORS=required (set by .ci/run on a machine with gcloud) turns a
missing emulator into an error at the start of the run instead of skipped tests.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

USED: list[str] = []  # one line per emulator started, for the run's terminal summary
PUBSUB_LAUNCHER = Path("platform/pubsub-emulator/bin/cloud-pubsub-emulator")
FIRESTORE_DIR = Path("platform/cloud-firestore-emulator")


@dataclass(frozen=True)
class Emulator:
    """One emulator: its launcher and version when found, else why it is not usable."""

    name: str
    path: Path | None
    version: str | None
    missing: str | None  # the reason, or None when found

    def started(self, host_port: str) -> None:
        """Note for the run's summary that a test started this emulator."""
        USED.append(f"{self.name} {self.version} ({self.path}) on {host_port}")

    def describe(self) -> str:
        if self.missing:
            return f"{self.name}: NOT FOUND ({self.missing})"
        return f"{self.name}: {self.path} (version {self.version})"


@functools.cache
def sdk_root() -> Path | None:
    """The Google Cloud CLI's installation root, or None without gcloud."""
    gcloud = shutil.which("gcloud")
    if gcloud is None:
        return None
    out = subprocess.run(
        [gcloud, "info", "--format=value(installation.sdk_root)"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    ).stdout.strip()
    return Path(out) if out else None


def _jar_version(folder: Path, stem: str) -> str:
    for jar in sorted(folder.glob(f"{stem}*.jar")):
        if m := re.search(r"-(\d[\d.]*\d)", jar.name):
            return m.group(1)
    return "unknown"


@functools.cache
def pubsub_emulator() -> Emulator:
    name = "official Pub/Sub emulator"
    explicit = os.environ.get("PUBSUB_EMULATOR_BIN")
    if explicit:
        launcher = Path(explicit)
        if not launcher.is_file():
            return Emulator(name, None, None, f"PUBSUB_EMULATOR_BIN={explicit} is not a file")
    else:
        root = sdk_root()
        if root is None:
            return Emulator(name, None, None, "no gcloud on PATH and PUBSUB_EMULATOR_BIN unset")
        launcher = root / PUBSUB_LAUNCHER
        if not launcher.is_file():
            return Emulator(
                name,
                None,
                None,
                f"{launcher} missing: `gcloud components install pubsub-emulator`"
                " (or apt install google-cloud-cli-pubsub-emulator)",
            )
    return Emulator(
        name, launcher, _jar_version(launcher.parent.parent / "lib", "cloud-pubsub-"), None
    )


@functools.cache
def firestore_emulator() -> Emulator:
    """Started through `gcloud emulators firestore start`; `path` is the component's folder."""
    name = "official Firestore emulator"
    root = sdk_root()
    if root is None:
        return Emulator(name, None, None, "no gcloud on PATH")
    folder = root / FIRESTORE_DIR
    if not any(folder.glob("*.jar")):
        return Emulator(
            name,
            None,
            None,
            f"{folder} has no emulator: `gcloud components install cloud-firestore-emulator`"
            " (or apt install google-cloud-cli-firestore-emulator)",
        )
    return Emulator(name, folder, _component_version(root), None)


def _component_version(root: Path) -> str:
    """The jar's name carries no version; the component's install snapshot does."""
    snapshot = root / ".install" / "cloud-firestore-emulator.snapshot.json"
    with contextlib.suppress(OSError, ValueError, KeyError, IndexError):
        return str(json.loads(snapshot.read_text())["components"][0]["version"]["version_string"])
    return "unknown"


def emulators_required() -> bool:
    return os.environ.get("BRIDGE_TEST_EMULATORS") == "required"
