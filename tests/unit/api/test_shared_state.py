"""The scaled shape: two workers (two apps) sharing Redis for replay cache, sessions, limits."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from api_harness import Clock

from phivault.api import create_app
from phivault.identity.testing import DPoPKey, FakeIssuer
from phivault.ledger.testing import InMemoryAuditSink
from phivault.settings import ApiSettings, Settings

pytestmark = pytest.mark.integration
ISSUER = FakeIssuer("https://idp.shared.test")


@pytest.fixture
async def workers() -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient, Clock]]:
    prefix = f"test-api-{uuid.uuid4().hex}"
    settings = Settings(
        api=ApiSettings(
            shared_state="redis",
            redis_url="redis://127.0.0.1:6379/0",
            redis_key_prefix=prefix,
            rate_limit_per_address="1000/minute",
            rate_limit_per_principal="4/minute",
        )
    )
    clock = Clock()
    clients = []
    for _ in range(2):
        app = create_app(
            settings,
            audit_sink=InMemoryAuditSink(),
            key_sources={ISSUER.issuer: ISSUER.key_source()},
            clock=clock,
        )
        clients.append(
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")
        )
    yield clients[0], clients[1], clock
    for client in clients:
        await client.aclose()


async def test_dpop_proof_used_at_one_worker_is_refused_at_the_other(
    workers: tuple[httpx.AsyncClient, httpx.AsyncClient, Clock],
) -> None:
    a, b, clock = workers
    key = DPoPKey()
    token = ISSUER.token(now=clock.t, cnf={"jkt": key.jkt})
    headers = {
        "Authorization": f"DPoP {token}",
        "DPoP": key.proof("GET", "http://testserver/whoami", access_token=token, iat=clock.t),
    }
    assert (await a.get("/whoami", headers=headers)).status_code == 200
    refused = await b.get("/whoami", headers=headers)
    assert refused.status_code == 401
    assert "invalid_dpop_proof" in refused.headers["www-authenticate"]


async def test_rate_limit_is_shared(
    workers: tuple[httpx.AsyncClient, httpx.AsyncClient, Clock],
) -> None:
    a, b, clock = workers
    headers = {"Authorization": f"Bearer {ISSUER.token(now=clock.t)}"}
    statuses = [
        (await (a if i % 2 else b).get("/whoami", headers=headers)).status_code for i in range(5)
    ]
    assert statuses == [200, 200, 200, 200, 429]


async def test_idle_session_ends_everywhere(
    workers: tuple[httpx.AsyncClient, httpx.AsyncClient, Clock],
) -> None:
    a, b, clock = workers
    token = ISSUER.token(now=clock.t, exp=clock.t + 3000, sid=f"s-{uuid.uuid4().hex}")
    headers = {"Authorization": f"Bearer {token}"}
    assert (await a.get("/whoami", headers=headers)).status_code == 200
    clock.t += 901
    assert (await b.get("/whoami", headers=headers)).status_code == 401
    assert (await a.get("/whoami", headers=headers)).status_code == 401


async def test_readyz_with_redis(
    workers: tuple[httpx.AsyncClient, httpx.AsyncClient, Clock],
) -> None:
    a, _, _ = workers
    assert (await a.get("/readyz")).status_code == 200
