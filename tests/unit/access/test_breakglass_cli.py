"""``phivault breakglass list|review``: the requests it sends and what it prints (the server is
an httpx mock transport; the e2e test covers the routes themselves)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from phivault.cli import breakglass as cli
from phivault.cli.main import app

GRANT = {
    "grant": "bg-1",
    "user": "dr-er",
    "patient": "Patient/p1",
    "reason": "emergency-treatment",
    "created": "2027-01-15T08:00:00.000Z",
    "expires": "2027-01-15T09:00:00.000Z",
    "state": "expired",
    "review_status": "overdue",
}


@pytest.fixture
def requests(monkeypatch: pytest.MonkeyPatch) -> list[httpx.Request]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.headers["authorization"] != "Bearer po-token":
            return httpx.Response(
                403,
                json={
                    "resourceType": "OperationOutcome",
                    "issue": [{"diagnostics": "only privacy officers review"}],
                },
            )
        if request.method == "GET":
            return httpx.Response(200, json={"status": "unreviewed", "grants": [GRANT]})
        return httpx.Response(200, json={**GRANT, "review_status": "reviewed"})

    def client(url: str, token: str, ca_cert: Path | None) -> httpx.Client:
        return httpx.Client(
            base_url=url,
            headers={"Authorization": f"Bearer {token}"},
            transport=httpx.MockTransport(handler),
        )

    monkeypatch.setattr(cli, "_client", client)
    return seen


def test_list_prints_the_queue(requests: list[httpx.Request]) -> None:
    result = CliRunner().invoke(
        app, ["breakglass", "list", "--status", "overdue", "--token", "po-token", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["grants"][0]["grant"] == "bg-1"
    assert requests[0].url.params["status"] == "overdue"
    table = CliRunner().invoke(app, ["breakglass", "list", "--token", "po-token"])
    assert table.exit_code == 0 and "bg-1" in table.stdout


def test_review_posts_the_outcome_and_a_note_from_stdin(requests: list[httpx.Request]) -> None:
    result = CliRunner().invoke(
        app,
        ["breakglass", "review", "bg-1", "--outcome", "appropriate", "--note", "-"],
        input="called the ED lead\n",
        env={"PHIVAULT_TOKEN": "po-token"},
    )
    assert result.exit_code == 0, result.output
    body: dict[str, Any] = json.loads(requests[0].content)
    assert body == {"outcome": "appropriate", "note": "called the ED lead\n"}
    assert requests[0].url.path == "/admin/break-glass/bg-1/review"


def test_refusals_and_bad_options_exit_non_zero(requests: list[httpx.Request]) -> None:
    refused = CliRunner().invoke(app, ["breakglass", "list", "--token", "nurse", "--json"])
    assert refused.exit_code == 1
    assert "only privacy officers review" in refused.stdout
    bad = CliRunner().invoke(
        app, ["breakglass", "review", "bg-1", "--outcome", "fine", "--token", "po-token"]
    )
    assert bad.exit_code == 1 and requests[-1].method == "GET"
