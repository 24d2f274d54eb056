from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from phivault.datadir import DataDir
from phivault.identity.dev_provider import (
    DEMO_USERS,
    DevIdentityProvider,
    DevProviderRefused,
    DevProviderWarning,
    dpop_thumbprint,
)
from phivault.identity.principal import Role, principal_from_claims
from phivault.identity.testing import DPoPKey
from phivault.identity.tokens import TokenValidator, TrustedIssuerKeys
from phivault.settings import Environment, Settings


def test_dev_provider_round_trip(tmp_path: Path) -> None:
    data_dir = DataDir.create(tmp_path / "d", dev=True)
    DevIdentityProvider.initialize(data_dir)
    key_file = data_dir.identity_dir / "signing-key.jwk"
    assert key_file.stat().st_mode & 0o077 == 0
    with pytest.warns(DevProviderWarning):
        idp = DevIdentityProvider.open(data_dir, Settings())
    assert set(idp.jwks()["keys"][0]) == {"kid", "use", "alg", "kty", "crv", "x", "y"}
    token = idp.mint(
        user="u-1", roles=[Role.ADMIN], audience="phivault", mfa=True, fhir_user="Practitioner/9"
    )
    v = TokenValidator(
        [TrustedIssuerKeys(idp.issuer, idp.key_source())],
        audience="phivault",
        algorithms=["ES256"],
        skew_s=0,
    )

    claims = asyncio.run(v.validate(token, now=time.time()))
    p = principal_from_claims(claims)
    assert p.roles == {Role.ADMIN}
    assert p.auth.multi_factor()
    assert p.fhir_user == "Practitioner/9"


def test_refuses_production_and_non_dev(tmp_path: Path) -> None:
    dev = DataDir.create(tmp_path / "dev", dev=True)
    DevIdentityProvider.initialize(dev)
    with pytest.raises(DevProviderRefused):
        DevIdentityProvider.open(dev, Settings(environment=Environment.PRODUCTION))
    prod = DataDir.create(tmp_path / "prod", dev=False)
    with pytest.raises(DevProviderRefused):
        DevIdentityProvider.initialize(prod)
    with pytest.raises(DevProviderRefused):
        DevIdentityProvider.open(prod, Settings())
    with pytest.raises(DevProviderRefused):
        DevIdentityProvider.initialize(dev)  # never replaces the key


def test_demo_user_for_every_role() -> None:
    assert set(DEMO_USERS) == set(Role)


def test_dpop_thumbprint_from_jwk_and_pem() -> None:
    key = DPoPKey()
    assert dpop_thumbprint(json.dumps(key.key.as_dict(private=True))) == key.jkt
    assert dpop_thumbprint(key.key.as_pem(private=False).decode()) == key.jkt
