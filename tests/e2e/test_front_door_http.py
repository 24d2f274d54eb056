"""Rate limit, idle timeout, MFA, step-up, body limit and media type over real HTTP."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import APIRouter
from live_server import serve_app

from phivault.api import MountedRouter, SteppedUp, create_app
from phivault.identity.testing import FakeIssuer
from phivault.ledger.testing import InMemoryAuditSink
from phivault.settings import ApiSettings, IdentitySettings, Settings


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


@dataclass
class Server:
    url: str
    issuer: FakeIssuer
    clock: Clock

    def auth(self, **claims: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.issuer.token(now=self.clock.t, **claims)}"}


@pytest.fixture
def server() -> Iterator[Server]:
    router = APIRouter()

    @router.post("/sensitive")
    async def sensitive(principal: SteppedUp) -> dict[str, str]:
        return {"ok": principal.subject}

    issuer = FakeIssuer("https://idp.http.test")
    clock = Clock()
    settings = Settings(
        identity=IdentitySettings(mfa_acr_values=["urn:mfa"]),
        api=ApiSettings(rate_limit_per_principal="5/minute", max_body_bytes=1024),
    )
    app = create_app(
        settings,
        audit_sink=InMemoryAuditSink(),
        key_sources={issuer.issuer: issuer.key_source()},
        routers=[MountedRouter(router, prefix="/t")],
        clock=clock,
        log_stream=io.StringIO(),
    )
    with serve_app(app) as url:
        yield Server(url, issuer, clock)


def outcome(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, response.text
    assert response.json()["resourceType"] == "OperationOutcome"


def test_rate_limit(server: Server) -> None:
    headers = server.auth()
    with httpx.Client() as client:
        for _ in range(5):
            assert client.get(f"{server.url}/whoami", headers=headers).status_code == 200
        limited = client.get(f"{server.url}/whoami", headers=headers)
    outcome(limited, 429)
    assert int(limited.headers["retry-after"]) >= 1


def test_idle_timeout(server: Server) -> None:
    headers = server.auth(exp=server.clock.t + 3600, sid="http-idle")
    assert httpx.get(f"{server.url}/whoami", headers=headers).status_code == 200
    server.clock.t += 16 * 60
    expired = httpx.get(f"{server.url}/whoami", headers=headers)
    outcome(expired, 401)
    assert 'error="invalid_token"' in expired.headers["www-authenticate"]


def test_mfa_and_step_up(server: Server) -> None:
    no_mfa = httpx.get(f"{server.url}/whoami", headers=server.auth(roles=["admin"], amr=["pwd"]))
    outcome(no_mfa, 401)
    assert "insufficient_user_authentication" in no_mfa.headers["www-authenticate"]
    stale = server.auth(amr=["pwd", "otp"], auth_time=server.clock.t - 3600)
    challenge = httpx.post(f"{server.url}/t/sensitive", headers=stale)
    outcome(challenge, 401)
    assert 'max_age="300"' in challenge.headers["www-authenticate"]
    fresh = server.auth(amr=["pwd", "otp"], auth_time=server.clock.t)
    assert httpx.post(f"{server.url}/t/sensitive", headers=fresh).status_code == 200


def test_body_limit_media_type_and_malformed_json(server: Server) -> None:
    headers = {**server.auth(), "Content-Type": "application/fhir+json"}
    outcome(httpx.post(f"{server.url}/t/sensitive", headers=headers, content=b"{" * 2000), 413)
    plain = {**server.auth(), "Content-Type": "text/plain"}
    outcome(httpx.post(f"{server.url}/t/sensitive", headers=plain, content=b"hello"), 415)
    outcome(httpx.put(f"{server.url}/whoami", headers=headers, content=b"{}"), 405)
