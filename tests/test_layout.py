"""The package's shape, held: a newcomer finds a line's home from file names alone, so no
module borrows a standard-library name, and no file grows past what one reading takes in."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "bridge").rglob("*.py"), *(ROOT / "bench").rglob("*.py")])
MAX_LINES = 600


def test_the_layout_is_what_the_checks_see() -> None:
    assert len(SOURCES) > 20 and ROOT / "bridge" / "daemon.py" in SOURCES


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_shadows_the_standard_library(path: Path) -> None:
    assert path.stem not in sys.stdlib_module_names, f"{path.name} is a standard-library name"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_source_file_over_600_lines(path: Path) -> None:
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{lines} lines: split it by idea"
