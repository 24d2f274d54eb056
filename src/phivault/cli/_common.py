"""What every command shares: the ``--data-dir`` and ``--json`` options, output, errors.

In a terminal, commands print with Rich (tables, progress bars); with ``--json`` they print
only JSON on standard output and nothing else, so scripts can parse it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from phivault.datadir import ENV_VAR, DataDir

if TYPE_CHECKING:
    from phivault.settings import Settings

__all__ = ["ConfigOption", "DataDirOption", "JsonOption", "Output", "fail", "load_settings_or_fail"]

DataDirOption = Annotated[
    Path,
    typer.Option(
        "--data-dir",
        envvar=ENV_VAR,
        help="The phivault data directory.",
        show_default=True,
    ),
]
ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        envvar="PHIVAULT_CONFIG",
        help="A settings file (TOML); PHIVAULT_* environment variables override it.",
        dir_okay=False,
    ),
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Machine-readable JSON output; no decoration.")
]


class _Progress:
    """A progress handle that is a Rich bar in a terminal and silent otherwise."""

    def __init__(self, progress: Progress | None, task: Any) -> None:
        self._progress = progress
        self._task = task

    def advance(self, amount: int = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, amount)

    def reporter(self) -> Callable[[int], None]:
        """A callback taking "items done so far", for code that reports absolute progress."""
        seen = 0

        def update(done: int) -> None:
            nonlocal seen
            self.advance(done - seen)
            seen = done

        return update

    def total(self, total: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, total=total)


class Output:
    """Where a command writes: Rich for people, JSON for machines, errors to stderr."""

    def __init__(self, *, json_mode: bool) -> None:
        self.json_mode = json_mode
        # soft_wrap: keys, notes and paths must print on one line, whatever the terminal width.
        self.console = Console(highlight=False, soft_wrap=True)
        self.err = Console(stderr=True, highlight=False, soft_wrap=True)

    def json(self, value: Any) -> None:
        sys.stdout.write(json.dumps(value, indent=None, sort_keys=False) + "\n")
        sys.stdout.flush()

    def say(self, *objects: Any) -> None:
        if not self.json_mode:
            self.console.print(*objects)

    @contextmanager
    def progress(self, description: str, total: int | None = None) -> Iterator[_Progress]:
        if self.json_mode or not self.err.is_terminal:
            yield _Progress(None, None)
            return
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.err,
            transient=True,
        ) as progress:
            yield _Progress(progress, progress.add_task(description, total=total))


def fail(output: Output, message: str, *, code: int = 1, kind: str = "error") -> NoReturn:
    """Report an error clearly (as JSON with ``--json``) and exit non-zero."""
    if output.json_mode:
        output.json({"ok": False, "error": kind, "message": message})
    else:
        # Text, not markup: a message must print as written, brackets included.
        output.err.print(Text.assemble(("error: ", "bold red"), message))
    raise typer.Exit(code)


def open_data_dir(output: Output, path: Path) -> DataDir:
    from phivault.errors import PhivaultError

    try:
        return DataDir.open(path)
    except PhivaultError as exc:
        fail(output, str(exc), kind="data-dir")


def load_settings_or_fail(output: Output, config: Path | None = None) -> Settings:
    """The settings (``config`` file, then the environment), or a clear error naming every
    problem."""
    from phivault.errors import ConfigurationError
    from phivault.settings import load_settings

    try:
        return load_settings(config)
    except ConfigurationError as exc:
        fail(output, str(exc), kind="settings")
