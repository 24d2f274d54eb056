from __future__ import annotations

from typing import Any

import pytest

from phivault.identity.errors import InvalidToken
from phivault.identity.principal import AuthContext, Role, principal_from_claims
from phivault.identity.scopes import Permission


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": "https://idp.test",
        "sub": "user-1",
        "iat": 1000,
        "exp": 2000,
        "tenant": "t1",
        "roles": ["clinician", "nurse", "wizard"],
        "scope": "openid user/Observation.rs patient/*.r",
        "fhirUser": "https://fhir.example/fhir/Practitioner/123",
        "purpose_of_use": ["TREAT"],
        "amr": ["pwd", "otp"],
        "acr": "urn:acr:2",
        "auth_time": 990,
        "jti": "abc",
        "client_id": "app-1",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def test_principal_from_claims() -> None:
    p = principal_from_claims(claims())
    assert p.subject == "user-1"
    assert p.tenant == "t1"
    assert p.roles == {Role.CLINICIAN, Role.NURSE}  # unknown roles grant nothing
    assert p.fhir_user == "Practitioner/123"
    assert p.purpose_of_use == ("TREAT",)
    assert p.auth == AuthContext(amr=("pwd", "otp"), acr="urn:acr:2", auth_time=990)
    assert p.auth.multi_factor()
    assert p.scope_grants("Observation", Permission.SEARCH)
    assert not p.scope_grants("Observation", Permission.UPDATE)
    assert "openid" in p.other_scopes
    assert p.client_id == "app-1"


def test_default_tenant_and_required_tenant() -> None:
    assert principal_from_claims(claims(tenant=None), default_tenant="default").tenant == "default"
    with pytest.raises(InvalidToken):
        principal_from_claims(claims(tenant=None))


@pytest.mark.parametrize(
    "bad",
    [
        {"sub": "John Smith"},
        {"sub": None},
        {"tenant": "a b"},
        {"fhirUser": "not a reference"},
        {"scope": "user/Patient.xyz"},
        {"roles": 5},
        {"purpose_of_use": ["has space?"]},
        {"exp": "tomorrow"},
        {"cnf": {"x5t": "abc"}},
    ],
)
def test_bad_claims_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(InvalidToken):
        principal_from_claims(claims(**bad))


def test_mfa_rules() -> None:
    assert AuthContext(amr=("mfa",)).multi_factor()
    assert not AuthContext(amr=("pwd",)).multi_factor()
    assert not AuthContext(amr=("pwd", "pwd")).multi_factor()
    assert AuthContext(amr=("pwd",), acr="mfa-acr").multi_factor(frozenset({"mfa-acr"}))


@pytest.mark.parametrize(
    "bad",
    [{"sub": "jane.doe@example.com"}, {"sub": "123-45-6789"}, {"tenant": "1980-01-02"}],
)
def test_phi_shaped_ids_are_refused(bad: dict[str, Any]) -> None:
    # Such a principal could not be recorded in the audit ledger: refuse the token up front.
    with pytest.raises(InvalidToken) as info:
        principal_from_claims(claims(**bad))
    assert info.value.reason == "unauditable-claim"
