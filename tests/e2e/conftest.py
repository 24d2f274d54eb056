"""The ``live`` fixture: the real front door, served by uvicorn over loopback HTTP."""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from live_server import Live, serve_app

from phivault.api import MountedRouter, create_app
from phivault.datadir import DataDir
from phivault.identity.dev_provider import DevIdentityProvider, DevProviderWarning
from phivault.identity.testing import FakeIssuer
from phivault.ledger.testing import InMemoryAuditSink
from phivault.settings import ApiSettings, IdentitySettings, Settings


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Live]:
    from canary_routes import canary_router

    # A dev data directory, so the dev identity provider's endpoints are served too.
    data_dir = DataDir.create(tmp_path / "dev", dev=True)
    DevIdentityProvider.initialize(data_dir)
    issuer = FakeIssuer("https://idp.e2e.test")
    sink = InMemoryAuditSink()
    logs = io.StringIO()
    settings = Settings(
        identity=IdentitySettings(mfa_acr_values=["urn:mfa"]),
        api=ApiSettings(max_body_bytes=4096),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DevProviderWarning)
        app = create_app(
            settings,
            audit_sink=sink,
            data_dir=data_dir,
            key_sources={issuer.issuer: issuer.key_source()},
            routers=[MountedRouter(canary_router(), prefix="/t")],
            log_stream=logs,
        )
    with serve_app(app) as url:
        yield Live(url=url, app=app, issuer=issuer, sink=sink, logs=logs)
