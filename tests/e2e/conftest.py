"""The ``live`` fixture: the real front door, served by uvicorn over loopback HTTP."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest
from live_server import Live, serve_app

from phivault.api import MountedRouter, create_app
from phivault.identity.testing import FakeIssuer
from phivault.ledger.testing import InMemoryAuditSink
from phivault.settings import ApiSettings, IdentitySettings, Settings


@pytest.fixture
def live() -> Iterator[Live]:
    from canary_routes import canary_router

    issuer = FakeIssuer("https://idp.e2e.test")
    sink = InMemoryAuditSink()
    logs = io.StringIO()
    settings = Settings(
        identity=IdentitySettings(mfa_acr_values=["urn:mfa"]),
        api=ApiSettings(max_body_bytes=4096),
    )
    app = create_app(
        settings,
        audit_sink=sink,
        key_sources={issuer.issuer: issuer.key_source()},
        routers=[MountedRouter(canary_router(), prefix="/t")],
        log_stream=logs,
    )
    with serve_app(app) as url:
        yield Live(url=url, app=app, issuer=issuer, sink=sink, logs=logs)
