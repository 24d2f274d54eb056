"""A resource server fetching another server's JWKS over HTTP: discovery-free, real sockets."""

from __future__ import annotations

import warnings
from pathlib import Path

import httpx
import pytest
from live_server import serve_app

from phivault.api import create_app
from phivault.datadir import DataDir
from phivault.identity.dev_provider import DevIdentityProvider, DevProviderWarning
from phivault.identity.principal import Role
from phivault.identity.testing import FakeIssuer
from phivault.ledger.testing import InMemoryAuditSink
from phivault.settings import IdentitySettings, Settings, TrustedIssuer

pytestmark = pytest.mark.filterwarnings("ignore::phivault.identity.dev_provider.DevProviderWarning")


def test_tokens_verified_with_keys_fetched_over_http(tmp_path: Path) -> None:
    data_dir = DataDir.create(tmp_path / "dev", dev=True)
    DevIdentityProvider.initialize(data_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DevProviderWarning)
        provider = DevIdentityProvider.open(data_dir, Settings())
    idp_app = create_app(Settings(), audit_sink=InMemoryAuditSink(), data_dir=data_dir)
    with serve_app(idp_app) as idp_url:
        settings = Settings(
            identity=IdentitySettings(
                issuers=[
                    TrustedIssuer(
                        issuer=provider.issuer, jwks_url=f"{idp_url}/.well-known/jwks.json"
                    )
                ]
            )
        )
        resource_app = create_app(settings, audit_sink=InMemoryAuditSink())
        with serve_app(resource_app) as url:
            assert httpx.get(f"{url}/readyz").status_code == 200  # keys fetched
            token = provider.mint(user="u-1", roles=[Role.NURSE], audience="phivault")
            response = httpx.get(f"{url}/whoami", headers={"Authorization": f"Bearer {token}"})
            assert response.status_code == 200, response.text
            assert response.json()["issuer"] == provider.issuer


def test_unreachable_jwks_is_not_ready_and_fails_closed() -> None:
    settings = Settings(
        identity=IdentitySettings(
            issuers=[
                TrustedIssuer(issuer="https://idp.invalid", jwks_url="http://127.0.0.1:9/jwks")
            ],
            jwks_min_refresh_s=0,
        )
    )
    with serve_app(create_app(settings, audit_sink=InMemoryAuditSink())) as url:
        assert httpx.get(f"{url}/readyz").status_code == 503
        assert httpx.get(f"{url}/healthz").status_code == 200
        token = FakeIssuer("https://idp.invalid").token()
        response = httpx.get(f"{url}/whoami", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 503
        assert response.json()["resourceType"] == "OperationOutcome"
