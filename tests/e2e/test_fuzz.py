"""Schemathesis over the app's own OpenAPI document: whatever is sent, never a 5xx.

Bounded (a few dozen examples per operation) to keep the suite fast; run with
``--hypothesis-profile`` or a larger ``max_examples`` locally to fuzz longer.
"""

from __future__ import annotations

from typing import Any

import schemathesis
from canary_routes import canary_router
from hypothesis import HealthCheck, settings

from phivault.api import MountedRouter, create_app
from phivault.identity.testing import FakeIssuer
from phivault.ledger.testing import InMemoryAuditSink
from phivault.settings import ApiSettings, Settings

ISSUER = FakeIssuer("https://idp.fuzz.test")
SINK = InMemoryAuditSink()
APP = create_app(
    Settings(
        api=ApiSettings(
            rate_limit_per_address="100000/minute", rate_limit_per_principal="100000/minute"
        )
    ),
    audit_sink=SINK,
    key_sources={ISSUER.issuer: ISSUER.key_source()},
    routers=[MountedRouter(canary_router(), prefix="/t")],
)
SCHEMA = schemathesis.openapi.from_asgi("/openapi.json", APP)
TOKEN = ISSUER.token(exp=2_000_000_000, roles=["service"])


@SCHEMA.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_authenticated(case: schemathesis.Case[Any]) -> None:
    response = case.call(headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert response.json()["resourceType"] == "OperationOutcome"


@SCHEMA.parametrize()
@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_anonymous(case: schemathesis.Case[Any]) -> None:
    response = case.call()
    assert response.status_code < 500, response.text
