"""Running the `phivault` command the way a user does, for the CLI tests (each command its
own process: tests/cli_process_support.py)."""

from __future__ import annotations

import subprocess

from cli_process_support import run_phivault


def phivault(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return run_phivault(list(args), stdin=stdin)
