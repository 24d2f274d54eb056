"""``phivault breakglass list|review``: the privacy officers' review queue, over HTTP.

The ledger has one writer, the running server, so these commands never open the data
directory: they call ``GET /admin/break-glass`` and ``POST /admin/break-glass/{id}/review`` on
``--url`` with a privacy officer's bearer token (``--token`` or ``PHIVAULT_TOKEN``; with MFA,
as the privacy-officer role requires). Every call is recorded in the ledger by the server.

A review note may hold PHI: pass ``--note -`` to read it from standard input rather than
leaving it in the shell's history. Exit codes: 0 done; 1 the server refused or failed (its
OperationOutcome's diagnostics are printed); 2 the server could not be reached.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import httpx
import typer
from rich.table import Table

from phivault.cli._common import JsonOption, Output, fail

__all__ = ["app", "list_grants", "review"]

DEFAULT_URL = "http://127.0.0.1:8000"

app = typer.Typer(
    help="The break-glass review queue (privacy officers), on a running server.",
    no_args_is_help=True,
)

UrlOption = Annotated[
    str, typer.Option("--url", envvar="PHIVAULT_URL", help="The phivault server.")
]
TokenOption = Annotated[
    str,
    typer.Option(
        "--token",
        envvar="PHIVAULT_TOKEN",
        help="A privacy officer's bearer token.",
        show_default=False,
    ),
]
CaCertOption = Annotated[
    Path | None,
    typer.Option("--ca-cert", help="Trust this PEM certificate (a server on HTTPS)."),
]


def _client(url: str, token: str, ca_cert: Path | None) -> httpx.Client:
    return httpx.Client(
        base_url=url.rstrip("/"),
        headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
        verify=str(ca_cert) if ca_cert is not None else True,
        timeout=30.0,
        follow_redirects=False,
    )


def _call(output: Output, client: httpx.Client, method: str, path: str, **kw: Any) -> Any:
    try:
        response = client.request(method, path, **kw)
    except httpx.HTTPError as exc:
        fail(output, f"the server could not be reached ({type(exc).__name__})", code=2)
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code >= 300:
        diagnostics = ""
        if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
            issues = body.get("issue") or [{}]
            diagnostics = f": {issues[0].get('diagnostics', '')}"
        fail(
            output,
            f"the server answered {response.status_code}{diagnostics}",
            kind=f"http-{response.status_code}",
        )
    return body


@app.command("list")
def list_grants(
    status: Annotated[
        str,
        typer.Option("--status", help="unreviewed (overdue included), overdue, reviewed or all."),
    ] = "unreviewed",
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = "",
    ca_cert: CaCertOption = None,
    json_out: JsonOption = False,
) -> None:
    """List break-glass grants (no justifications: see them in the review answer)."""
    output = Output(json_mode=json_out)
    if status not in ("unreviewed", "overdue", "reviewed", "all"):
        fail(output, "--status is one of unreviewed, overdue, reviewed, all", kind="usage")
    if not token:
        fail(output, "a privacy officer's token is needed (--token or PHIVAULT_TOKEN)")
    with _client(url, token, ca_cert) as client:
        body = _call(output, client, "GET", "/admin/break-glass", params={"status": status})
    grants = body.get("grants", []) if isinstance(body, dict) else []
    if json_out:
        output.json(body)
        return
    if not grants:
        output.say(f"no {status} break-glass grants")
        return
    table = Table(title=f"break-glass grants ({status})")
    for column in ("grant", "user", "patient", "reason", "created", "expires", "state", "review"):
        table.add_column(column)
    for grant in grants:
        review = grant.get("review_status", "")
        if grant.get("review_outcome"):
            review = f"{review}: {grant['review_outcome']}"
        table.add_row(
            *(
                str(grant.get(key, ""))
                for key in ("grant", "user", "patient", "reason", "created", "expires", "state")
            ),
            review,
        )
    output.say(table)


@app.command("review")
def review(
    grant_id: Annotated[str, typer.Argument(metavar="ID", help="The grant id.")],
    *,
    outcome: Annotated[
        str, typer.Option("--outcome", help="appropriate or inappropriate.", show_default=False)
    ],
    note: Annotated[
        str | None,
        typer.Option("--note", help="A note for the record (stored sealed); - reads stdin."),
    ] = None,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = "",
    ca_cert: CaCertOption = None,
    json_out: JsonOption = False,
) -> None:
    """Record a privacy officer's review of one grant (a ledger event, once per grant)."""
    output = Output(json_mode=json_out)
    if outcome not in ("appropriate", "inappropriate"):
        fail(output, "--outcome is appropriate or inappropriate", kind="usage")
    if not token:
        fail(output, "a privacy officer's token is needed (--token or PHIVAULT_TOKEN)")
    if note == "-":
        note = sys.stdin.read()
    payload: dict[str, Any] = {"outcome": outcome}
    if note is not None:
        payload["note"] = note
    with _client(url, token, ca_cert) as client:
        body = _call(
            output,
            client,
            "POST",
            f"/admin/break-glass/{quote(grant_id, safe='')}/review",
            json=payload,
        )
    if json_out:
        output.json(body)
        return
    output.say(f"grant {grant_id} reviewed: {outcome}")
