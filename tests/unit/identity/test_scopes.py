from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from phivault.errors import InvalidInput
from phivault.identity.scopes import Permission, ScopeContext, parse_scope, parse_scopes


def test_v2_scope_parses() -> None:
    scope = parse_scope("patient/Observation.rs?category=laboratory")
    assert scope is not None
    assert scope.context is ScopeContext.PATIENT
    assert scope.resource == "Observation"
    assert scope.permissions == {Permission.READ, Permission.SEARCH}
    assert scope.query == "category=laboratory"
    assert str(scope) == "patient/Observation.rs?category=laboratory"


def test_wildcard_and_all_permissions() -> None:
    scope = parse_scope("user/*.cruds")
    assert scope is not None
    assert scope.grants("Patient", Permission.DELETE)
    assert scope.grants("Observation", Permission.CREATE)


@pytest.mark.parametrize(
    ("v1", "v2"),
    [
        ("user/Patient.read", "user/Patient.rs"),
        ("system/*.write", "system/*.cud"),
        ("patient/*.*", "patient/*.cruds"),
    ],
)
def test_v1_scopes_map_to_v2(v1: str, v2: str) -> None:
    assert str(parse_scope(v1)) == v2


@pytest.mark.parametrize(
    "bad",
    [
        "patient/Observation.sr",
        "user/Patient.rr",
        "user/Patient.x",
        "user/patient.rs",
        "system/.rs",
        "user/Patient",
    ],
)
def test_malformed_resource_scopes_are_refused(bad: str) -> None:
    with pytest.raises(InvalidInput):
        parse_scope(bad)


def test_other_scopes_are_kept_opaque() -> None:
    resource, other = parse_scopes("openid fhirUser launch/patient offline_access user/Patient.rs")
    assert [str(s) for s in resource] == ["user/Patient.rs"]
    assert other == {"openid", "fhirUser", "launch/patient", "offline_access"}


def test_read_scope_does_not_grant_write() -> None:
    scope = parse_scope("patient/Observation.rs")
    assert scope is not None
    assert not scope.grants("Observation", Permission.UPDATE)
    assert not scope.grants("Patient", Permission.READ)


@given(st.lists(st.sampled_from("cruds"), min_size=1, max_size=5, unique=True))
def test_permissions_round_trip_only_in_order(perms: list[str]) -> None:
    text = "user/Patient." + "".join(perms)
    if perms == sorted(perms, key="cruds".index):
        scope = parse_scope(text)
        assert scope is not None
        assert {p.value for p in scope.permissions} == set(perms)
    else:
        with pytest.raises(InvalidInput):
            parse_scope(text)
