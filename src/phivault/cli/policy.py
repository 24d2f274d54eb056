"""``phivault policy check [FILE]``: validate an access policy and print its access matrix.

For reviewers (Markdown), for tools (JSON) and for CI systems (SARIF 2.1.0). Exit codes:
0 the policy is valid and keeps every invariant; 1 it does not (every problem is listed, each
with its place in the file) or the file cannot be read. Bad input never prints a traceback.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from phivault.cli._common import JsonOption, Output, fail

__all__ = ["app", "check"]

app = typer.Typer(
    help="The access policy: validate it and print its access matrix.", no_args_is_help=True
)

EXIT_INVALID = 1


class Format(StrEnum):
    MARKDOWN = "markdown"
    JSON = "json"
    SARIF = "sarif"


@app.command()
def check(
    file: Annotated[
        Path | None,
        typer.Argument(help="A policy file (TOML); the shipped default if omitted."),
    ] = None,
    output_format: Annotated[
        Format, typer.Option("--format", help="How to print the matrix and the problems.")
    ] = Format.MARKDOWN,
    json_mode: JsonOption = False,
) -> None:
    """Validate a policy, enforce its invariants, and print the access matrix."""
    from phivault.access.matrix import access_matrix, issue_json, matrix_markdown, sarif_report
    from phivault.access.policy import (
        DEFAULT_POLICY_SOURCE,
        check_policy_text,
        default_policy_text,
    )
    from phivault.records.classification import default_classification

    if json_mode and output_format is Format.MARKDOWN:
        output_format = Format.JSON
    output = Output(json_mode=json_mode or output_format is not Format.MARKDOWN)
    if file is None:
        source = DEFAULT_POLICY_SOURCE
        text = default_policy_text()
    else:
        source = file.as_posix()
        try:
            text = file.read_text(encoding="utf-8")
        except FileNotFoundError:
            fail(output, f"{source}: no such file", kind="unreadable")
        except IsADirectoryError:
            fail(output, f"{source}: is a directory, not a policy file", kind="unreadable")
        except UnicodeDecodeError:
            fail(output, f"{source}: not UTF-8 text", kind="unreadable")
        except OSError as exc:
            fail(output, f"{source}: cannot be read ({exc.strerror})", kind="unreadable")
    table = default_classification()
    checked = check_policy_text(text, classification=table)
    issues = checked.issues
    ok = checked.policy is not None and not issues

    if output_format is Format.SARIF:
        output.json(sarif_report(issues, uri=source))
    elif output_format is Format.JSON:
        output.json(
            {
                "ok": ok,
                "source": source,
                "issues": [issue_json(issue) for issue in issues],
                "matrix": None if checked.policy is None else access_matrix(checked.policy, table),
            }
        )
    else:
        if checked.policy is not None:
            typer.echo(matrix_markdown(checked.policy, table, source=source))
        for issue in issues:
            place = source if issue.line is None else f"{source}:{issue.line}"
            output.err.print(
                Text.assemble(
                    ("error: ", "bold red"),
                    f"{place}: {issue.path}: {issue.message} ",
                    (f"[{issue.kind}]", "dim"),
                )
            )
        if issues:
            output.err.print(Text(f"{len(issues)} problem(s) in {source}; the policy is refused."))
        else:
            output.err.print(Text(f"{source}: valid; every invariant holds."))
    if not ok:
        raise typer.Exit(EXIT_INVALID)
