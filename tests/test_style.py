"""The code reads as the formatter writes it (STYLE.md 14): `ruff format` leaves every file as it is."""

from __future__ import annotations

import subprocess
import sys

from .conftest import REPO


def test_ruff_format_leaves_the_code_unchanged():
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", "."], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, f"run `make format`:\n{result.stdout}{result.stderr}"


def test_no_line_asks_the_formatter_to_skip_it():
    files = subprocess.run(
        ["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    marker = "fmt: " + "skip"
    assert [f for f in files if marker in (REPO / f).read_text()] == []
