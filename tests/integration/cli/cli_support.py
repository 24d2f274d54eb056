"""Running the `phivault` command the way a user does, for the CLI tests."""

from __future__ import annotations

import subprocess
import sys


def phivault(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "phivault.cli.main", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
