"""``phivault token`` through its Typer command (phivault.cli.main registers it)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from phivault.cli.token import token
from phivault.datadir import DataDir
from phivault.identity.dev_provider import DevIdentityProvider
from phivault.identity.principal import Role, principal_from_claims
from phivault.identity.testing import DPoPKey
from phivault.identity.tokens import TokenValidator, TrustedIssuerKeys
from phivault.settings import Settings

app = typer.Typer()
app.command()(token)
runner = CliRunner()
pytestmark = pytest.mark.filterwarnings("ignore::phivault.identity.dev_provider.DevProviderWarning")


@pytest.fixture
def dev_dir(tmp_path: Path) -> DataDir:
    data_dir = DataDir.create(tmp_path / "dev", dev=True)
    DevIdentityProvider.initialize(data_dir)
    return data_dir


def claims_of(data_dir: DataDir, access_token: str) -> dict[str, object]:
    provider = DevIdentityProvider.open(data_dir, Settings())
    validator = TokenValidator(
        [TrustedIssuerKeys(provider.issuer, provider.key_source())],
        audience="phivault",
        algorithms=["ES256"],
        skew_s=5,
    )
    return asyncio.run(validator.validate(access_token, now=time.time()))


def test_token_for_a_demo_user(dev_dir: DataDir) -> None:
    result = runner.invoke(app, ["--role", "clinician", "--data-dir", str(dev_dir.path)])
    assert result.exit_code == 0, result.output
    access_token = result.stdout.strip().splitlines()[-1]
    principal = principal_from_claims(claims_of(dev_dir, access_token))
    assert principal.subject == "dr-alice"
    assert principal.roles == {Role.CLINICIAN}
    assert principal.fhir_user == "Practitioner/dr-alice"


def test_token_with_every_option_as_json(dev_dir: DataDir, tmp_path: Path) -> None:
    key = DPoPKey()
    key_file = tmp_path / "dpop.jwk"
    key_file.write_text(json.dumps(key.key.as_dict(private=True)))
    args = ["--user", "u-77", "--role", "admin", "--role", "privacy-officer", "--tenant", "t-9"]
    args += ["--fhir-user", "Practitioner/77", "--scope", "user/AuditEvent.rs", "--mfa"]
    args += ["--purpose", "HOPERAT", "--ttl", "120", "--dpop-key", str(key_file)]
    result = runner.invoke(app, [*args, "--json", "--data-dir", str(dev_dir.path)])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["token_type"] == "DPoP" and doc["expires_in"] == 120
    principal = principal_from_claims(claims_of(dev_dir, doc["access_token"]))
    assert principal.subject == "u-77" and principal.tenant == "t-9"
    assert principal.roles == {Role.ADMIN, Role.PRIVACY_OFFICER}
    assert principal.auth.multi_factor()
    assert principal.purpose_of_use == ("HOPERAT",)
    assert principal.dpop_jkt == key.jkt
    assert [str(s) for s in principal.scopes] == ["user/AuditEvent.rs"]


def test_refuses_non_dev_and_production(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prod = DataDir.create(tmp_path / "prod", dev=False)
    result = runner.invoke(app, ["--role", "nurse", "--json", "--data-dir", str(prod.path)])
    assert result.exit_code == 1
    assert "--dev" in json.loads(result.stdout)["message"]
    dev = DataDir.create(tmp_path / "dev2", dev=True)
    DevIdentityProvider.initialize(dev)
    monkeypatch.setenv("PHIVAULT_ENVIRONMENT", "production")
    result = runner.invoke(app, ["--role", "nurse", "--json", "--data-dir", str(dev.path)])
    assert result.exit_code == 1
    assert "production" in json.loads(result.stdout)["message"]


def test_unknown_role(dev_dir: DataDir) -> None:
    result = runner.invoke(app, ["--role", "wizard", "--data-dir", str(dev_dir.path)])
    assert result.exit_code == 1
